"""Upcycle an HF dense checkpoint (Llama, Mistral, Qwen2, Qwen3) into an HF MoE checkpoint (Mixtral, Qwen2-MoE,
Qwen3-MoE) whose experts start as copies of the dense MLP, so it computes exactly what the dense model did
(unless --noise-std / --reinit-ratio ask for diversity). Streams tensor by tensor; writes OUT atomically.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..options import ALIGN, UpcycleOptions, check_shard_size, valid_granularities


@dataclass(kw_only=True)
class Args(UpcycleOptions):
    model: str
    """HF dense checkpoint dir (config.json + model.safetensors or sharded with an index)."""
    out: str
    """Output dir for the HF MoE checkpoint (must not exist unless --overwrite)."""
    overwrite: bool = False
    """Replace OUT if it exists (only after the new checkpoint is complete)."""
    max_shard_gb: float = 2.0
    """Largest safetensors shard, in GiB."""


    def __post_init__(self):
        self.validate()
        check_shard_size(self.max_shard_gb)


def run(args: Args) -> int:
    from ..io.hf import HFCheckpoint, check_output_dir, write_hf_checkpoint
    from ..upcycle import UpcycledView

    check_output_dir(args.out, args.overwrite, inputs=(("--model", args.model),))
    view = UpcycledView(HFCheckpoint(args.model), args)
    nbytes = write_hf_checkpoint(view, args.out, overwrite=args.overwrite, side_dir=view.path, desc="upcycle",
                                 max_shard_bytes=int(args.max_shard_gb * 1024**3), inputs=(("--model", args.model),))
    grain = ""
    if args.is_granular:
        grain = f" of intermediate size {view.expert_intermediate}"
        if view.shared_intermediate:
            grain += f" + a shared expert of {view.shared_intermediate}"
    print(f"wrote {view.config['model_type']} checkpoint with {args.num_experts} experts{grain} (top-{args.top_k}) "
          f"in layers {list(view.moe_layers)} to {args.out} ({nbytes / 1e9:.2f} GB)", file=sys.stderr)
    if args.is_granular and view.expert_intermediate % ALIGN:
        good = valid_granularities(view.dense_intermediate, align=ALIGN)
        print(f"note: experts of {view.expert_intermediate} neurons (not a multiple of {ALIGN}): grouped-GEMM kernels, "
              f"e.g. transformers' default MoE experts in bf16, need a multiple of {ALIGN}; load with "
              f"experts_implementation='eager' there, or use --granularity {good or [1]}", file=sys.stderr)
    return 0
