"""Copy the cluster scripts shipped with upcycle_ds out for editing: OUT/slurm/train.sbatch and upit.sbatch
(multi-node Slurm jobs: requeue, resume), OUT/launchers/train_single_node.sh and deepspeed_direct.sh (one node).
Edit the marked lines for your cluster; see docs/slurm.md."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(kw_only=True)
class Args:
    out: str
    """Directory to create with slurm/ and launchers/ inside (must not exist unless --overwrite)."""
    overwrite: bool = False
    """Replace OUT if it exists."""


def run(args: Args) -> int:
    from ..cluster import copy_scripts

    for path in copy_scripts(args.out, args.overwrite):
        print(path)
    print(f"upcycle-ds scripts: wrote the cluster scripts to {args.out}; edit the #SBATCH lines for your cluster",
          file=sys.stderr)
    return 0
