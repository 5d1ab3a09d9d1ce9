#!/usr/bin/env bash
# prepare -> (a) dense SFT, (b) vanilla upcycling, (c) UpIT -> eval on held-out test rows -> results table.
#   bash examples/upit_smollm2/run.sh examples/upit_smollm2/small.yaml      (from the repo root)
# Environment: PY (python, default .venv/bin/python), NPROC (ranks per training stage, default 1),
# PREPARE_ARGS (prepare.py flags), EVAL_ARGS (`upcycle-ds eval` flags). The three arms train on the same train.jsonl:
#   (a) dense SFT      = the UpIT recipe's stage-1 model (sft/hf): `sft.epochs` over the data
#   (b) vanilla        = `upcycle-ds upcycle` of the base model (E, top_k of the recipe), then `upcycle-ds train`
#                        with the recipe's `common` + `train` fields: `train.epochs` over the data
#   (c) UpIT           = `upcycle-ds upit --config CONFIG`: experts from the sft checkpoints, router init,
#                        then `train.epochs` of post-training (same fields as (b))
set -euo pipefail
CONFIG=${1:?usage: run.sh CONFIG.yaml}
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-1}
CLI="$PY -m upcycle_ds.cli"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=disabled
EX=examples/upit_smollm2
get() { $PY -c "import yaml,sys; print(yaml.safe_load(open('$CONFIG'))$1)"; }
OUT=$(dirname "$(get "['out']")")          # runs/NAME
DATA=$(get "['data']")
DENSE=$(get "['model']")
WORK=$(dirname "$DENSE")
T0=$(date +%s)
stamp() { echo "[$(date +%T) +$(( $(date +%s) - T0 ))s] $*"; }

stamp "prepare"
$PY $EX/prepare.py --work "$WORK" --data-name "$(basename "$(dirname "$DATA")")" ${PREPARE_ARGS:-}

stamp "(c) UpIT recipe (its sft stage is also arm (a))"
$CLI upit --config "$CONFIG" --nproc "$NPROC"

stamp "(b) vanilla upcycling"
if [ ! -f "$OUT/vanilla_moe/config.json" ]; then
  $CLI upcycle --model "$DENSE" --out "$OUT/vanilla_moe" --num-experts "$(get "['num_experts']")" \
      --top-k "$(get "['top_k']")" --layers "$(get "['layers']")" --seed "$(get "['seed']")"
fi
$PY - "$CONFIG" "$OUT" <<'PYEOF'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1])); out = sys.argv[2]
train = {"lr": 2e-5, "epochs": 2.0, **(cfg.get("common") or {}), **(cfg.get("train") or {})}  # recipe defaults
train.update(model=f"{out}/vanilla_moe", data=cfg["data"], out=f"{out}/vanilla", seed=cfg.get("seed", 0),
             resume=True)
yaml.safe_dump(train, open(f"{out}/vanilla_train.yaml", "w"))
PYEOF
if [ ! -f "$OUT/vanilla/hf/config.json" ]; then
  $CLI train --config "$OUT/vanilla_train.yaml" --nproc "$NPROC"
fi

stamp "eval"
U=$(get "['out']")
# greedy answers, exact match per task with standard errors, paired tests against the base (docs/eval.md)
$CLI eval --data "$(dirname "$DATA")/test.jsonl" --out "$OUT/results.json" --max-new-tokens 40 --micro-batch-size 16 \
  ${EVAL_ARGS:-} --model "base (no training)=$DENSE" "(a) dense SFT=$U/sft/hf" \
  "(b) vanilla upcycling=$OUT/vanilla/hf" "(c) UpIT=$U/train/hf"
stamp "done"
