"""UpIT stages 1-2: assemble dense SFT checkpoints (same model, different training steps; oldest first) into one HF
MoE checkpoint whose expert i is checkpoint i's MLP. With more checkpoints than --num-experts the last E given are
used; with fewer, the pool is grown per layer by genetic expansion (dissimilar parents, crossover, DARE mutation).
Non-expert weights come from the last checkpoint (or their average); the router is random (train it with
router-init). --granularity G splits every such MLP into G fine-grained experts (virtual-group routers). Writes OUT
atomically, with upit_report.json (expert sources, delta cosine similarities per layer).
"""

from __future__ import annotations

import sys

from ..upit.config import AssembleConfig

Args = AssembleConfig


def run(args: AssembleConfig) -> int:
    from ..upit.assemble import run_assemble

    res = run_assemble(args)
    view = res.view
    if not res.base_given and args.copies > len(view.used):
        print("note: no --base given; expansion deltas were taken from the first checkpoint "
              f"({args.checkpoints[0]}); pass the pre-SFT dense model as --base to follow UpIT", file=sys.stderr)
    n_ck = len(view.used)
    grain = f"; each MLP split into {args.granularity} experts" if args.granularity > 1 else ""
    print(f"wrote {view.config['model_type']} checkpoint with {args.num_experts} experts (top-{args.top_k}; "
          f"{n_ck} MLPs from checkpoints, {max(0, args.copies - n_ck)} by expansion{grain}) in layers "
          f"{list(view.moe_layers)} to {args.out} ({res.nbytes / 1e9:.2f} GB)", file=sys.stderr)
    return 0
