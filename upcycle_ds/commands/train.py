"""Train an MoE model with DeepSpeed: expert parallelism + ZeRO 0/1/2, bf16 or fp32, gradient accumulation,
checkpoints with bit-exact --resume, eval loss, W&B (offline by default) tracking of expert load, and a final HF MoE
export in OUT/hf.

One node: `upcycle-ds train --nproc N ...` starts N ranks with the `deepspeed` launcher. Under `deepspeed`,
`torchrun` or `srun` (slurm/train.sbatch) it runs as one rank of that job. `--config run.yaml` supplies any field;
flags override it.
"""

from __future__ import annotations

from ..train.config import TrainArgs

Args = TrainArgs


def run(args: TrainArgs) -> int:
    from ..launch.local import launched_by_a_launcher

    if args.nproc is not None and not launched_by_a_launcher():
        from ..train.preflight import launch_checked

        return launch_checked(args)
    from ..train.trainer import run_rank

    return run_rank(args)
