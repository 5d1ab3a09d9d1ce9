"""UpIT stage 1 (expert preparation): instruction-tune an HF dense model with DeepSpeed (ZeRO 0/1/2, bf16 or fp32,
the data pipeline of `upcycle-ds train`) and save complete HF dense checkpoints at a fixed fraction of an epoch:
OUT/checkpoints_hf/ckpt-XXXX (XXXX = optimizer step), each with config, tokenizer and sft_checkpoint.json. They are
the experts of `upcycle-ds upit-assemble` (pass them oldest first). OUT/checkpoints holds the DeepSpeed checkpoints
for --resume; OUT/hf is the final model.

Weights saved (--hf-weights): `master` (default) = the fp32 master weights of the optimizer (under --dtype bf16
gathered from the ZeRO partitions of all ranks: collective), so small SFT deltas are not rounded away; `module` = the
module's own weights (bf16 under --dtype bf16, what forward computes with). Under --dtype fp32 the two are identical.
Each checkpoint dir is written by rank 0 into a temp dir and renamed into place (never half-written).
"""

from __future__ import annotations

from ..upit.sft import HF_DIR, META, SFTConfig, hf_save_steps, list_checkpoints, run_sft  # noqa: F401

Args = SFTConfig


def run(args: SFTConfig) -> int:
    return run_sft(args)
