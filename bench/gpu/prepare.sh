#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), before a session that may be lent a GPU: put the wheels the GPU machine
# lacks into bench/gpu/wheels (git-ignored; carried to the GPU machine with the working tree, <= 50 MiB).
#
# The GPU machine (one H200, no network) has python3.12 with torch (CUDA), transformers, accelerate, safetensors,
# pyyaml, tqdm, matplotlib, numpy, pyarrow, psutil, pytest -- but not deepspeed, datasets or wandb.
# deepspeed ships only an sdist: it is built here into a pure-Python wheel (no ops prebuilt; DeepSpeed JIT-compiles
# the few it needs). The rest, at the versions of this checkout's environment (the set the tests pass with), are
# downloaded as cp312 manylinux / pure wheels; run.sh installs only what is missing there.
# wandb is not carried: the GPU runs use --wandb-mode disabled.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
W=bench/gpu/wheels
rm -rf "$W"
mkdir -p "$W"
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(ver deepspeed)" -w "$W"
"$PY" -m pip download -q --no-deps -d "$W" --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    "datasets==$(ver datasets)" "dill==$(ver dill)" "multiprocess==$(ver multiprocess)" "xxhash==$(ver xxhash)" \
    "fsspec==$(ver fsspec)" "hjson==$(ver hjson)" "py-cpuinfo==$(ver py-cpuinfo)" "msgpack==$(ver msgpack)" \
    "ninja==$(ver ninja)" "einops==$(ver einops)" "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" \
    "annotated-types==$(ver annotated-types)" "typing-inspection==$(ver typing-inspection)" "pandas==$(ver pandas)" \
    "tzdata==$(ver tzdata)" "python-dateutil==$(ver python-dateutil)" pytz
# UpIT quality part (optional `upit` part of run.sh): the evals tasks as compact jsonl (~3 MiB, git-ignored)
"$PY" -m pip download -q --no-deps "evals==3.0.1.post1" -d bench/quality/wheels
"$PY" bench/upit_quality.py prepare
size_kib=$(du -sk "$W" | cut -f1)
ls -1 "$W"
echo "bench/gpu/prepare.sh: $(ls -1 "$W" | wc -l) wheels, $((size_kib / 1024)) MiB in $W"
echo "bench/gpu/prepare.sh: carry bench/gpu/wheels and bench/quality/data to the GPU machine"
if [ "$size_kib" -gt $((50 * 1024)) ]; then
    echo "bench/gpu/prepare.sh: error: $W is larger than 50 MiB (the GPU machine takes at most 64 MiB in all)" >&2
    exit 1
fi
