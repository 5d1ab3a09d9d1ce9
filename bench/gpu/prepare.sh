#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), before a session that may be lent a GPU: the wheels the GPU machine lacks
# -> $WHEELS (default bench/gpu/wheels, git-ignored; carried to the GPU machine with the working tree, <= 50 MiB),
# and the UpIT data -> bench/quality/data (for run.sh's optional `upit` part).
#
#   bash bench/gpu/prepare.sh                                # wheels for the GPU machine's Python 3.12
#   PY_VERSION=local WHEELS=DIR NO_UPIT_DATA=1 bash bench/gpu/prepare.sh   # for this Python: the CPU rehearsal
#
# What is carried is computed, not listed: `bench/gpu/carry.py plan` = deepspeed and datasets (what the runs import
# beyond the machine's own packages; wandb is not needed, the runs use --wandb-mode disabled) and what they require
# beyond what the machine surely has, at the versions of this environment (the set the tests pass with). Those
# name==version lines go to $WHEELS/MANIFEST.txt, and exactly their wheels are fetched: deepspeed ships only an
# sdist, so it is built here into a pure-Python wheel (no ops prebuilt; DeepSpeed JIT-compiles the few it needs);
# the rest are downloaded as binary wheels for the target Python. run.sh installs those wheels (the ones the machine
# lacks, with --no-index) after checking every requirement they have against what the machine has.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
W=${WHEELS:-bench/gpu/wheels}
PYV=${PY_VERSION:-3.12}
rm -rf "$W"
mkdir -p "$W"
"$PY" bench/gpu/carry.py plan > "$W/.manifest"
grep -q '^deepspeed==' "$W/.manifest"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "$(grep '^deepspeed==' "$W/.manifest")" -w "$W"
if [ "$PYV" = local ]; then
    target=()
    PYV=$("$PY" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
else
    target=(--python-version "$PYV" --implementation cp --platform manylinux2014_x86_64
            --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64)
fi
# shellcheck disable=SC2046  # one requirement per word
"$PY" -m pip download -q --no-deps --only-binary=:all: "${target[@]}" -d "$W" $(grep -v '^deepspeed==' "$W/.manifest")
{ echo "# bench/gpu/prepare.sh for Python $PYV: the wheels in this folder, one name==version each"; cat "$W/.manifest"; } \
    > "$W/MANIFEST.txt"
rm "$W/.manifest"
if [ -z "${NO_UPIT_DATA:-}" ]; then  # the optional `upit` part: the evals tasks as compact jsonl (~3 MiB, git-ignored)
    "$PY" -m pip download -q --no-deps "evals==3.0.1.post1" -d bench/quality/wheels
    "$PY" bench/upit_quality.py prepare
fi
size_kib=$(du -sk "$W" | cut -f1)
echo "bench/gpu/prepare.sh: $(ls -1 "$W"/*.whl | wc -l) wheels for Python $PYV, $((size_kib / 1024)) MiB in $W:" \
    "$(grep -v '^#' "$W/MANIFEST.txt" | tr '\n' ' ')"
data=" and bench/quality/data"
[ -n "${NO_UPIT_DATA:-}" ] && data=""
if [ ${#target[@]} -eq 0 ]; then
    echo "bench/gpu/prepare.sh: for this Python: REHEARSE=cpu WHEELS=$W bash bench/gpu/run.sh rehearses with them"
else
    echo "bench/gpu/prepare.sh: carry $W$data to the GPU machine"
fi
if [ "$size_kib" -gt $((50 * 1024)) ]; then
    echo "bench/gpu/prepare.sh: error: $W is larger than 50 MiB (the GPU machine takes at most 64 MiB in all)" >&2
    exit 1
fi
