#!/usr/bin/env bash
# Create .venv and install upcycle_ds with its test dependencies (CPU torch 2.13.0 first, then the rest pinned to it,
# so pip never pulls a CUDA build). ~1-2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -c constraints.txt -e '.[test]'
