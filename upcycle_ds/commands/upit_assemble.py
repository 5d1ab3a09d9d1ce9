"""UpIT stages 1-2: assemble dense SFT checkpoints (same model, different training steps; oldest first) into one HF
MoE checkpoint whose expert i is checkpoint i's MLP. With more checkpoints than --num-experts the last E given are
used; with fewer, the pool is grown per layer by genetic expansion (dissimilar parents, crossover, DARE mutation).
Non-expert weights come from the last checkpoint (or their average); the router is random (train it with
router-init). --granularity G splits every such MLP into G fine-grained experts (virtual-group routers). Writes OUT
atomically, with upit_report.json (expert sources, delta cosine similarities per layer).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass


from ..io.hf import HFCheckpoint, check_output_dir, write_hf_checkpoint
from ..upit.assemble import REPORT, AssembledView, AssembleOptions, open_checkpoints


@dataclass(kw_only=True)
class Args(AssembleOptions):
    checkpoints: list[str]
    """HF dense checkpoint dirs, oldest first (same model at different SFT steps); expert i = checkpoint i."""
    out: str
    """Output dir for the HF MoE checkpoint (must not exist unless --overwrite)."""
    base: str | None = None
    """The dense model before SFT: expansion deltas are taken from it (recommended). Default: the first checkpoint."""
    overwrite: bool = False
    """Replace OUT if it exists (only after the new checkpoint is complete)."""
    max_shard_gb: float = 2.0
    """Largest safetensors shard, in GiB."""


    def __post_init__(self):
        from .upcycle import check_shard_size

        self.validate()
        check_shard_size(self.max_shard_gb)


def run(args: Args) -> int:
    inputs = (*args.checkpoints, args.base)
    check_output_dir(args.out, args.overwrite, inputs=inputs)
    cks = open_checkpoints(args.checkpoints)
    base = HFCheckpoint(args.base) if args.base else None
    view = AssembledView(cks, args, base)
    if base is None and args.copies > len(view.used):
        print("note: no --base given; expansion deltas are taken from the first checkpoint "
              f"({cks[0].path}); pass the pre-SFT dense model as --base to follow UpIT", file=sys.stderr)
    nbytes = write_hf_checkpoint(view, args.out, overwrite=args.overwrite, side_dir=view.path, desc="upit-assemble",
                                 max_shard_bytes=int(args.max_shard_gb * 1024**3), inputs=inputs,
                                 extra=lambda tmp: (tmp / REPORT).write_text(json.dumps(view.report(), indent=2) + "\n"))
    n_ck = len(view.used)
    grain = f"; each MLP split into {args.granularity} experts" if args.granularity > 1 else ""
    print(f"wrote {view.config['model_type']} checkpoint with {args.num_experts} experts (top-{args.top_k}; "
          f"{n_ck} MLPs from checkpoints, {max(0, args.copies - n_ck)} by expansion{grain}) in layers "
          f"{list(view.moe_layers)} to {args.out} ({nbytes / 1e9:.2f} GB)", file=sys.stderr)
    return 0
