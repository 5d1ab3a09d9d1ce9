#!/usr/bin/env bash
# The GPU acceptance run: one CUDA GPU (H100 80 GB or H200), no network, logs under $OUT, a short table last.
#
#   bash bench/gpu/prepare.sh                        # before, with PyPI access: wheels -> bench/gpu/wheels
#   OUT=DIR bash bench/gpu/run.sh [PARTS]            # on the GPU machine. PARTS: comma list of tests,step,quality,
#                                                    # upit,offload (default tests,step,quality: <= 7 min by
#                                                    # construction)
#   OUT=DIR bash bench/gpu/run.sh upit               # then, if the session has >= 6 min left: <= 5 min, from the
#                                                    # quality part's checkpoint in the same OUT (offload: <= 2.5 min)
#   REHEARSE=cpu OUT=DIR bash bench/gpu/run.sh       # the CPU rehearsal: every part (default all four) through the
#                                                    # same script and code at toy sizes, in a fresh venv shaped like
#                                                    # the GPU machine (needs PY_VERSION=local WHEELS=bench/gpu/
#                                                    # wheels-local NO_UPIT_DATA=1 bash bench/gpu/prepare.sh first)
#
# 1. install: checks the carried wheels (bench/gpu/wheels, MANIFEST.txt) against this Python and every requirement
#    they have against what the machine has (one line per mismatch, exit 2), installs those the machine lacks into
#    a folder of their own, $SITE (pip --no-index --no-deps --target); the checkout and $SITE go on PYTHONPATH
#    (there is no console script: everything runs as `python -m ...`); DS_ACCELERATOR is unset (the launcher picks
#    the accelerator from the hardware);
# 2. tests:   pytest -m gpu (tests/test_gpu.py): our MoE layer == transformers on the device (fp32, bf16), grouped ==
#             loop experts without a weight copy, bf16 training through the launcher at ZeRO-1 with the HF export,
#             exact resume at ZeRO-2 (4 training processes);
# 3. step:    bench/step_time.py --preset gpu --zero 1: a 1B-class Llama upcycled to 8 experts top-2, bf16, seq 2048:
#             dense vs grouped vs loop step time and MFU, forward memory grouped vs loop, peak GPU memory next to
#             `upcycle-ds plan`'s figure;
# 4. quality: bench/upcycle_quality.py --size gpu --suite $QUALITY_SUITE, shortened (QUALITY_SET), the runs'
#             parallelism sized from the plan with >= 30 % headroom (bench/gpu/fit.py);
# 5. upit:    bench/upit_quality.py run --size gpu from part 4's checkpoint (needs bench/quality/data/upit from
#             prepare.sh), parallelism from bench/gpu/fit.py;
# 6. offload: bench/offload_step.py --preset gpu --zero 2: the offloaded step's parts against the plan.
# Each part runs under `timeout` at its limit and prints its own elapsed time; the limits of the default parts and
# of the install add up to <= 7 min, so a slow start still leaves a result. Exit code: 0 if every part passed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)

# limits (s): install + tests + step + quality = 30 + 115 + 85 + 170 = 400 s, + 4 x 5 s for `timeout -k` = 7 min;
# upit is a call of its own
declare -A LIMIT=([install]=30 [tests]=115 [step]=85 [quality]=170 [upit]=300 [offload]=150) REAL_LIMIT
for k in "${!LIMIT[@]}"; do REAL_LIMIT[$k]=${LIMIT[$k]}; done
# the quality part: which suite of bench/upcycle_quality.py, its arms ("" = all of the suite's), the size overrides
QUALITY_SUITE=${QUALITY_SUITE:-equal-steps} QUALITY_ARMS=${QUALITY_ARMS:-}
QUALITY_SET="pretrain_steps=150 steps=80 seeds=0,1 bpe_chars=3000000"
if [[ ${REHEARSE:-} == cpu ]]; then
    MODE="cpu rehearsal"
    PARTS=${1:-tests,step,quality,upit}
    WHEELS=${WHEELS:-bench/gpu/wheels-local}
    if [[ ! -f $WHEELS/MANIFEST.txt ]]; then
        echo "bench/gpu/run.sh: no $WHEELS/MANIFEST.txt: run PY_VERSION=local WHEELS=$WHEELS NO_UPIT_DATA=1" \
             "bash bench/gpu/prepare.sh first (PyPI access)" >&2
        exit 2
    fi
    # a fresh venv with only what the GPU machine has (its packages, linked from this environment); the carried
    # wheels go into it below, as on the GPU machine
    "${PYTHON:-.venv/bin/python}" bench/gpu/carry.py venv "$OUT/venv" > "$OUT/venv.log" 2>&1 \
        || { cat "$OUT/venv.log" >&2; exit 2; }
    PY=$OUT/venv/bin/python
    SITE=${SITE:-$OUT/site}
    export CUDA_VISIBLE_DEVICES="" UPCYCLE_DS_GPU_TESTS_DEVICE=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    DEVICE=cpu STEP_PRESET=rehearse QSIZE=rehearse QUALITY_SET="" USIZE=rehearse UPIT_DATA=$OUT/upit-data
    [[ $QUALITY_SUITE == equal-steps ]] && QUALITY_ARMS=${QUALITY_ARMS:-upcycled}  # (c) is (b)'s path again
    OFFLOAD_PRESET=cpu
    LIMIT=([install]=120 [tests]=240 [step]=120 [quality]=240 [upit]=300 [offload]=300)  # a shared 2-core machine
else
    MODE="cuda"
    PARTS=${1:-tests,step,quality}
    PY=${PYTHON:-python3}
    WHEELS=${WHEELS:-bench/gpu/wheels}
    SITE=${SITE:-$PWD/bench/gpu/site}
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "bench/gpu/run.sh: needs CUDA: torch.cuda.is_available() is False here (run it on the GPU machine, or" \
             "rehearse it on the CPU with REHEARSE=cpu)" >&2
        exit 2
    fi
    DEVICE=cuda STEP_PRESET=gpu QSIZE=gpu USIZE=gpu UPIT_DATA=$PWD/bench/quality/data/upit OFFLOAD_PRESET=gpu
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" WANDB_MODE=disabled \
    TOKENIZERS_PARALLELISM=false
unset DS_ACCELERATOR  # a stale value must not steer DeepSpeed: the launcher picks it from the hardware

declare -A RC SECS CPU
ORDER=()
children_cpu() {  # CPU seconds (user + system) of this shell's finished children so far
    awk -v hz="$(getconf CLK_TCK)" '{print int(($16 + $17) / hz)}' /proc/$$/stat
}
run_part() {  # name, command... : under `timeout` at the part's limit, log in $OUT/name.log, elapsed time printed
    local name=$1 t c
    shift
    t=$(date +%s)
    c=$(children_cpu)
    echo "=== $name (limit ${LIMIT[$name]} s): $*"
    timeout -k 5 "${LIMIT[$name]}" bash -c '"$@"' "$name" "$@" > "$OUT/$name.log" 2>&1  # (functions too)
    RC[$name]=$?
    SECS[$name]=$(($(date +%s) - t))
    CPU[$name]=$(($(children_cpu) - c))
    ORDER+=("$name")
    tail -n 15 "$OUT/$name.log"
    echo "=== $name: exit ${RC[$name]} after ${SECS[$name]} s (limit ${LIMIT[$name]} s; CPU ${CPU[$name]} s)"
}

install_wheels() {
    "$PY" bench/gpu/carry.py install "$WHEELS" "$SITE" || return
    "$PY" - "$DEVICE" <<'PY'
import importlib, shutil, sys

import torch

for mod in ("torch", "transformers", "deepspeed", "datasets"):
    print(f"{mod} {importlib.import_module(mod).__version__}")
absent = [m for m in ("wandb", "accelerate", "triton") if importlib.util.find_spec(m) is None]
script = shutil.which("upcycle-ds")
print(f"python {sys.version.split()[0]} ({sys.executable}); absent: {', '.join(absent) or 'none'}; "
      f"upcycle-ds console script: {script or 'none'} (everything runs as python -m)")
if sys.argv[1] == "cuda":
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB")
else:
    print("device: cpu (rehearsal)")
PY
}

quality() {
    local par
    # shellcheck disable=SC2086  # QUALITY_SET is a list of FIELD=VALUE words
    par=$("$PY" bench/gpu/fit.py quality --size "$QSIZE" --set $QUALITY_SET) || return
    # shellcheck disable=SC2086
    "$PY" bench/upcycle_quality.py --size "$QSIZE" --suite "$QUALITY_SUITE" ${QUALITY_ARMS:+--arms $QUALITY_ARMS} \
        --out "$OUT/quality" --work "$OUT/quality/work" --set $QUALITY_SET parallel="$par"
}

upit() {
    local par
    if [[ ${REHEARSE:-} == cpu ]]; then  # made-up rows in the real format (no wheel, nothing downloaded)
        "$PY" bench/upit_quality.py prepare --toy --data "$UPIT_DATA" --test-per-task 4 --train-per-task 16 || return
    fi
    par=$("$PY" bench/gpu/fit.py upit --size "$USIZE") || return
    # shellcheck disable=SC2046  # the rehearsal leaves out (a'), the path of (a) again
    "$PY" bench/upit_quality.py run --size "$USIZE" --base "$OUT/quality/work/pretrain/hf" --data "$UPIT_DATA" \
        --work "$OUT/upit/work" --out "$OUT/upit" --parallel "$par" $([[ ${REHEARSE:-} == cpu ]] && echo --no-control)
}

export PY WHEELS SITE DEVICE OUT QSIZE QUALITY_SUITE QUALITY_SET QUALITY_ARMS USIZE UPIT_DATA REHEARSE=${REHEARSE:-}
export -f install_wheels quality upit
run_part install install_wheels
if [[ ${RC[install]} == 0 ]]; then
    [[ ,$PARTS, == *,tests,* ]] && run_part tests "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
    [[ ,$PARTS, == *,step,* ]] && run_part step "$PY" bench/step_time.py --device "$DEVICE" --preset "$STEP_PRESET" \
        --zero 1 --warmup 2 --steps 5 --json "$OUT/step_time.json"
    [[ ,$PARTS, == *,quality,* ]] && run_part quality quality
    [[ ,$PARTS, == *,upit,* ]] && run_part upit upit
    [[ ,$PARTS, == *,offload,* ]] && run_part offload "$PY" bench/offload_step.py --device "$DEVICE" \
        --preset "$OFFLOAD_PRESET" --zero 2 --no-deepspeed-adam --json "$OUT/offload_step.json"
fi

echo
echo "=== bench/gpu/run.sh summary: $MODE, $(date -Is), $(($(date +%s) - T0)) s in all, logs in $OUT"
echo "| part | result | elapsed s | limit s | CPU s |"
echo "|---|---|---|---|---|"
ok=1
for name in "${ORDER[@]}"; do
    case ${RC[$name]} in
        0) result=passed ;;
        124|137) result="TIMED OUT" ;;
        *) result="FAILED (exit ${RC[$name]})" ;;
    esac
    [[ ${RC[$name]} == 0 ]] || ok=0
    echo "| $name | $result | ${SECS[$name]} | ${LIMIT[$name]} | ${CPU[$name]} |"
done
echo "budget of the real run's default parts: install ${REAL_LIMIT[install]} + tests ${REAL_LIMIT[tests]} + step" \
     "${REAL_LIMIT[step]} + quality ${REAL_LIMIT[quality]} s, + 4 x 5 s kill grace = $((REAL_LIMIT[install] +
     REAL_LIMIT[tests] + REAL_LIMIT[step] + REAL_LIMIT[quality] + 20)) s (upit, a call of its own: ${REAL_LIMIT[upit]} s)"
ran() { [[ " ${ORDER[*]} " == *" $1 "* ]]; }
ran install && grep -E "^(bench/gpu/run.sh: (installed|already)|device:|python )" "$OUT/install.log"
ran tests && grep -E "passed|failed|error" "$OUT/tests.log" | tail -1
ran step && grep -E "^(\| |model:)" "$OUT/step.log" | tail -6
ran quality && grep -E "^bench/gpu/fit.py" "$OUT/quality.log" && sed -n '/held-out loss after/,$p' "$OUT/quality.log" | head -8
ran upit && grep -E "^bench/gpu/fit.py" "$OUT/upit.log" && sed -n '/^| | n |/,/^$/p' "$OUT/upit.log" | head -6
ran offload && grep -E "^\| " "$OUT/offload.log" | tail -8
[[ $ok == 1 ]] && exit 0
exit 1
