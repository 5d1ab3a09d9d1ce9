"""Convert between checkpoint formats, streaming tensor by tensor (memory does not grow with model size):

  ds -> hf-moe        a DeepSpeed MoE checkpoint (save dir with `latest`, or one tag dir) -> HF MoE (Mixtral /
                      Qwen2-MoE / Qwen3-MoE hub layout) that AutoModelForCausalLM loads; --weights master takes the
                      fp32 master weights from the ZeRO optimizer files
  hf-dense -> ds      upcycle straight into a module-only DeepSpeed checkpoint the trainer loads (--num-experts ...)
  hf-moe -> ds        an HF MoE checkpoint as a module-only DeepSpeed checkpoint
  ds -> ds            re-write at another --ep-size (module only), or with --with-optimizer the optimizer state
                      too (fp32 masters, AdamW moments, steps, LR schedule and data position, layout-free):
                      `upcycle-ds train --resume` continues from it at any world size, ep size, ZeRO stage, dtype
  hf-moe/ds -> hf-dense   merge each MoE layer into one MLP: --merge average (mean of the experts; for granular
                      upcycling the concatenation of the slices: the exact inverse of upcycling), --merge
                      router-weighted (weights = routing frequencies on --calib-data), or --expert i (one
                      expert / copy); with --calib-data the MoE's and the merged model's calibration losses are
                      reported (merge_report.json)
The input format is detected. Output is written atomically (nothing is left at --out on error).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from ..errors import UserError
from ..options import MergeOptions, UpcycleOptions, check_shard_size


@dataclass(kw_only=True)
class Args(MergeOptions, UpcycleOptions):
    model: str = field(metadata={"aliases": ["input"]})
    """Input checkpoint dir: HF dense, HF MoE, a DeepSpeed save dir (with `latest`) or one of its tag dirs."""
    out: str = field(metadata={"aliases": ["output"]})
    """Output dir (must not exist unless --overwrite)."""
    to: Literal["hf-moe", "hf-dense", "ds"]
    """Output format."""
    ep_size: int = 1
    """--to ds: expert-parallel size the checkpoint will be loaded at (must divide the number of experts; the
    per-expert file layout itself is the same for every ep size)."""
    tag: str | None = None
    """DeepSpeed input: the tag (checkpoint) to read; default: the one named in `latest`."""
    out_tag: str | None = None
    """--to ds: tag dir name of the written checkpoint (default global_step0; with --with-optimizer the input's)."""
    with_optimizer: bool = False
    """ds -> ds: keep the optimizer state (fp32 masters, AdamW moments and steps, LR schedule, data position), so that
    `train --resume` on the output continues the run (at any layout) instead of restarting Adam."""
    weights: Literal["module", "master"] = "module"
    """DeepSpeed input: `module` = the model weights as saved (training dtype); `master` = fp32 master weights from
    the ZeRO 1/2 optimizer files."""
    expert: int | None = None
    """--to hf-dense: take this expert's weights instead of merging (a granular MoE: copy i's G slices)."""
    dry_run: bool = False
    """Print the plan (tensor, shape, dtype, bytes, total) and write nothing."""
    overwrite: bool = False
    """Replace --out if it exists (only after the new checkpoint is complete)."""
    max_shard_gb: float = 2.0
    """HF output: largest safetensors shard, in GiB."""


    def __post_init__(self):
        from ..io.paths import check_name

        self.validate()
        check_shard_size(self.max_shard_gb)
        if self.ep_size < 1:
            raise UserError(f"--ep-size must be >= 1 (got {self.ep_size})")
        if self.expert is not None and self.expert < 0:
            raise UserError(f"--expert must be >= 0 (got {self.expert})")
        if self.out_tag is not None:
            check_name(self.out_tag, "--out-tag")
        if self.tag is not None:
            check_name(self.tag, "--tag")


def run(args: Args) -> int:
    from ..convert import convert

    plan = convert(args.model, args.out, args.to, ep_size=args.ep_size, tag=args.tag, weights=args.weights,
                   expert=args.expert, dry_run=args.dry_run, overwrite=args.overwrite, upcycle=args,
                   max_shard_bytes=int(args.max_shard_gb * 1024**3), out_tag=args.out_tag, merge=args,
                   with_optimizer=args.with_optimizer)
    if args.dry_run:
        print(plan.describe())
    else:
        print(f"wrote {args.to} checkpoint ({len(plan.entries)} tensors, {plan.total_bytes / 1e9:.3f} GB) to "
              f"{args.out}", file=sys.stderr)
    return 0
