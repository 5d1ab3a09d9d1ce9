#!/usr/bin/env bash
# Train an MoE model on one node with upcycle_ds: copy this file, set the variables (or export them), run it.
#
#   NPROC   ranks on this node: one per GPU (CPU ranks on a machine without GPUs)   default: number of GPUs, else 1
#   MODEL   what to train: an HF MoE dir from `upcycle-ds upcycle`, an HF dense dir (then add --num-experts N
#           --top-k K to the extra flags to upcycle on the fly), or a DeepSpeed checkpoint dir      required
#   DATA    training data: .jsonl/.json/.parquet/.arrow or a save_to_disk dir                     required
#   OUT     run dir: checkpoints/, metrics.jsonl, wandb/, load heatmaps, hf/ (final HF export)    required
#   EP      expert-parallel size (must divide NPROC and the number of experts)                   default: 1
#   ZERO    ZeRO stage 0, 1 or 2 (DeepSpeed-MoE does not support 3)                               default: 1
#   DTYPE   bf16 or fp32                                                                          default: bf16
#   EXTRA_ARGS  more `upcycle-ds train` flags (word-split), e.g. "--max-steps 2000 --lr 1e-4 --save-every 200"
# Arguments given to this script are passed on as extra flags too (`upcycle-ds train --help` lists them all).
# `upcycle-ds` (and the `deepspeed` launcher) must be on PATH: activate the environment first.
#
# Requeue friendly: when OUT/checkpoints/latest exists the script adds --resume, so running the very same command
# again (a preempted or requeued job, a wall-time limit with --exit-after-steps) continues from the last complete
# checkpoint, bit-exactly (weights, optimizer, LR schedule, RNG, data position).
set -euo pipefail

NPROC="${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}"
[ "${NPROC:-0}" -ge 1 ] 2>/dev/null || NPROC=1
: "${MODEL:?set MODEL (HF MoE / HF dense / DeepSpeed checkpoint dir)}"
: "${DATA:?set DATA (training data file or dir)}"
: "${OUT:?set OUT (run dir)}"
EP="${EP:-1}"
ZERO="${ZERO:-1}"
DTYPE="${DTYPE:-bf16}"

RESUME=()
if [ -f "$OUT/checkpoints/latest" ]; then
  echo "[train_single_node] $OUT/checkpoints/latest exists: resuming from $(cat "$OUT/checkpoints/latest")" >&2
  RESUME=(--resume)
fi

# shellcheck disable=SC2086  # EXTRA_ARGS is meant to be word-split
exec upcycle-ds train --nproc "$NPROC" --model "$MODEL" --data "$DATA" --out "$OUT" \
  --ep-size "$EP" --zero-stage "$ZERO" --dtype "$DTYPE" ${EXTRA_ARGS:-} "${RESUME[@]}" "$@"
