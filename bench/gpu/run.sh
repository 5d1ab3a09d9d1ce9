#!/usr/bin/env bash
# The GPU acceptance run: on a machine with one CUDA GPU and no network, <= 8 minutes, logs under $OUT.
#
#   bash bench/gpu/prepare.sh            # before, on a machine with PyPI access: wheels -> bench/gpu/wheels
#   OUT=/some/dir bash bench/gpu/run.sh [PARTS]     # PARTS: comma list of tests,step,quality,upit
#                                                    # (default tests,step,quality: ~8 min; upit: ~5 min more)
#
# 1. installs what the machine lacks from bench/gpu/wheels (pip --no-index --no-deps), puts this checkout on
#    PYTHONPATH;
# 2. tests:   pytest -m gpu (tests/test_gpu.py): our MoE layer == transformers on CUDA (fp32, bf16), grouped == loop
#             experts, 5 bf16 training steps at ZeRO-1 and ZeRO-2, exact resume, the HF export loads;
# 3. step:    bench/step_time.py --device cuda --preset gpu: a 1B-class Llama upcycled to 8 experts top-2, bf16,
#             seq 2048: dense vs MoE step time and MFU, grouped vs loop experts, and peak GPU memory next to
#             `upcycle-ds plan`'s prediction for the same setup;
# 4. quality: bench/upcycle_quality.py --size gpu (sparse upcycling vs dense continuation, held-out loss);
# 5. upit:    bench/upit_quality.py run --size gpu (UpIT vs vanilla vs dense SFT from part 4's checkpoint; needs
#             bench/quality/data from prepare.sh).
# The last lines printed are a short table of every part's result. Exit code: 0 if every part passed.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_out}
PARTS=${1:-tests,step,quality}
mkdir -p "$OUT"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu/run.sh: needs CUDA: torch.cuda.is_available() is False here (run it on the GPU machine)" >&2
    exit 2
fi
T0=$(date +%s)
"$PY" - <<'PY' 2>&1 | tee "$OUT/install.log"
import importlib, importlib.util, pathlib, subprocess, sys
wheels = pathlib.Path("bench/gpu/wheels")
need = {"deepspeed": "deepspeed", "datasets": "datasets", "dill": "dill", "multiprocess": "multiprocess",
        "xxhash": "xxhash", "fsspec": "fsspec", "hjson": "hjson", "cpuinfo": "py_cpuinfo", "msgpack": "msgpack",
        "ninja": "ninja", "einops": "einops", "pydantic": "pydantic", "pydantic_core": "pydantic_core",
        "annotated_types": "annotated_types", "typing_inspection": "typing_inspection", "pandas": "pandas",
        "pytz": "pytz", "tzdata": "tzdata", "dateutil": "python_dateutil"}
missing = [w for mod, w in need.items() if importlib.util.find_spec(mod) is None]
files = [str(f) for w in missing for f in wheels.glob("*.whl") if f.name.lower().startswith(w.lower() + "-")]
print("missing here:", missing or "nothing")
if files:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *files])
for mod in ("torch", "transformers", "deepspeed", "datasets"):
    m = importlib.import_module(mod)
    print(f"{mod} {m.__version__}")
import torch
print("device:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

declare -A RESULT
run_part() {  # name, timeout seconds, command...
    local name=$1 limit=$2
    shift 2
    local t=$(date +%s)
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    RESULT[$name]="rc=$rc $(( $(date +%s) - t ))s"
    tail -25 "$OUT/$name.log"
}
[[ ,$PARTS, == *,tests,* ]] && run_part tests 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
[[ ,$PARTS, == *,step,* ]] && run_part step 150 "$PY" bench/step_time.py --device cuda --preset gpu \
    --json "$OUT/step_time.json"
[[ ,$PARTS, == *,offload,* ]] && run_part offload 150 "$PY" bench/offload_step.py --device cuda --preset gpu --zero 2 \
    --no-deepspeed-adam --json "$OUT/offload_step.json"
[[ ,$PARTS, == *,quality,* ]] && run_part quality 300 "$PY" bench/upcycle_quality.py --size gpu --out "$OUT/quality"
[[ ,$PARTS, == *,upit,* ]] && run_part upit 330 "$PY" bench/upit_quality.py run --size gpu --out "$OUT/upit"

echo
echo "=== bench/gpu/run.sh summary ($(date -Is), $(( $(date +%s) - T0 ))s, logs in $OUT)"
for name in tests step quality upit; do
    [[ -n ${RESULT[$name]:-} ]] && printf '%-8s %s\n' "$name" "${RESULT[$name]}"
done
[[ -f $OUT/tests.log ]] && grep -E "passed|failed" "$OUT/tests.log" | tail -1
[[ -f $OUT/step.log ]] && sed -n '/^| /p' "$OUT/step.log" | tail -12
[[ -f $OUT/quality.log ]] && tail -8 "$OUT/quality.log"
[[ -f $OUT/upit.log ]] && tail -8 "$OUT/upit.log"
for name in "${!RESULT[@]}"; do [[ ${RESULT[$name]} == rc=0* ]] || exit 1; done
exit 0
