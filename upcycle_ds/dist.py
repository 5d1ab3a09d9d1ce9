"""torch.distributed set-up for DeepSpeed on CPU (gloo) or GPU (nccl), also for a single process."""

from __future__ import annotations

import importlib
import os

import torch

from .launch.dist_env import free_port, setup_dist_env  # noqa: F401  (free_port re-exported for tests)


def init_distributed(timeout_s: int = 300) -> None:
    """Initialise torch.distributed through DeepSpeed once (no-op if already done).

    Reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT as set by `deepspeed` or `torchrun`, derives them from Slurm under
    `srun`, and with neither starts a one-process group on a free local port (`launch.dist_env`). On CPU it uses gloo and skips DeepSpeed's shared-memory
    allreduce op, whose first use JIT-compiles for 50-85 s (PLATFORM.md) and which serves only inference all-reduce.
    """
    import deepspeed
    import deepspeed.comm as ds_comm
    from datetime import timedelta

    if torch.distributed.is_initialized():
        return
    setup_dist_env()  # RANK/WORLD_SIZE/... from a launcher, from Slurm (srun), or a single process
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # `import deepspeed.comm.torch as m` would bind the *torch* package (deepspeed.comm has a `torch` attribute)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", timeout=timedelta(seconds=timeout_s))
    assert ds_comm.is_initialized()


def shutdown() -> None:
    """Barrier + destroy the process group (without it some CPU runs stall 30-60 s at exit; PLATFORM.md)."""
    if torch.distributed.is_initialized():
        try:
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()
