"""`upcycle-ds train/sft/router-init --nproc N`: resolve the run in the launcher process — every check of
`setup.resolve`, so that bad input is one line on stderr (exit 2) before any rank starts, and the data is tokenised
once — then start the ranks with `launch.local.launch_local`, which re-checks the run dir under OUT's lock.
"""

from __future__ import annotations

from ..launch.local import launch_local
from ..launch.run_lock import check_free
from .resume import plan_resume
from .setup import LAUNCHER, resolve
from .stage import TRAIN, Stage


def launch_checked(args, stage: Stage = TRAIN) -> int:
    """Resolve the run for `args.nproc` ranks, then launch them with the resolved settings."""
    check_free(args.out)
    setup = resolve(args, args.nproc, stage, LAUNCHER)

    def recheck() -> None:  # under the lock: another job may have written OUT/checkpoints meanwhile
        plan_resume(setup.args, setup.world, stage.command, setup.config, setup.num_experts, deep=False)

    return launch_local(setup.args, stage.command, check=recheck)
