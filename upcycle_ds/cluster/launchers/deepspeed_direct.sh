#!/usr/bin/env bash
# The same training run as train_single_node.sh, started by the `deepspeed` launcher directly (no upcycle-ds parent
# process: e.g. to add your own `deepspeed` launcher options such as --hostfile/--include). Each rank runs
# `python -m upcycle_ds.cli train ...` and checks the flags itself (errors then come from every rank).
#
#   NPROC   ranks on this node: one per GPU (CPU ranks on a machine without GPUs)   default: number of GPUs, else 1
#   MODEL   HF MoE dir, HF dense dir (+ --num-experts N in the extra flags) or DeepSpeed checkpoint dir   required
#   DATA    training data: .jsonl/.json/.parquet/.arrow or a save_to_disk dir                     required
#   OUT     run dir: checkpoints/, metrics.jsonl, wandb/, load heatmaps, hf/                       required
#   EP      expert-parallel size (must divide NPROC and the number of experts)                   default: 1
#   ZERO    ZeRO stage 0, 1 or 2                                                                  default: 1
#   DTYPE   bf16 or fp32                                                                          default: bf16
#   MASTER_PORT  rendezvous port of the ranks                                                     default: 29500
#   UPCYCLE_DS_VERBOSE=1  also the launcher's INFO lines and the libraries' notices (as --verbose)
#   EXTRA_ARGS  more `upcycle-ds train` flags (word-split); arguments to this script are passed on too.
# `deepspeed` must be on PATH (activate the environment). Without GPUs set DS_ACCELERATOR=cpu (done below) and
# OMP_NUM_THREADS (default here: cores / NPROC; the deepspeed launcher does not set it).
#
# Requeue friendly: adds --resume when OUT/checkpoints/latest exists.
set -euo pipefail

NPROC="${NPROC:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}"
[ "${NPROC:-0}" -ge 1 ] 2>/dev/null || NPROC=1
: "${MODEL:?set MODEL (HF MoE / HF dense / DeepSpeed checkpoint dir)}"
: "${DATA:?set DATA (training data file or dir)}"
: "${OUT:?set OUT (run dir)}"
EP="${EP:-1}"
ZERO="${ZERO:-1}"
DTYPE="${DTYPE:-bf16}"
MASTER_PORT="${MASTER_PORT:-29500}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
fi

QUIET=(--quiet)  # the launcher's INFO lines and hostfile warning: only with UPCYCLE_DS_VERBOSE=1
[ "${UPCYCLE_DS_VERBOSE:-0}" = 0 ] || QUIET=()

RESUME=()
if [ -f "$OUT/checkpoints/latest" ]; then
  echo "[deepspeed_direct] $OUT/checkpoints/latest exists: resuming from $(cat "$OUT/checkpoints/latest")" >&2
  RESUME=(--resume)
fi

# shellcheck disable=SC2086  # EXTRA_ARGS is meant to be word-split
exec deepspeed "${QUIET[@]}" --num_gpus "$NPROC" --master_port "$MASTER_PORT" --no_local_rank --module upcycle_ds.cli train \
  --model "$MODEL" --data "$DATA" --out "$OUT" --ep-size "$EP" --zero-stage "$ZERO" --dtype "$DTYPE" \
  ${EXTRA_ARGS:-} "${RESUME[@]}" "$@"
