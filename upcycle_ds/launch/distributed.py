"""torch.distributed for one rank: the process group (nccl on GPU, gloo on CPU), this rank's device, and a second
group for waiting on disk I/O.

Two timeouts, because two kinds of waiting happen in a job:
- collectives of the training step (all_reduce, all_to_all, ZeRO's reduce-scatter) run under `timeout_s`
  (`--dist-timeout-s`, default 1800 s): a rank that stops answering ends the job instead of hanging it;
- a rank that waits for another rank's file I/O (rank 0 writing an HF export, the sft checkpoints) waits in a barrier
  of the I/O group: a gloo group with its own timeout (`--io-timeout-s`, default 24 h). Gloo's barrier runs on the
  host, so NCCL's watchdog never aborts it, however long a 100 GB export takes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Mapping
from datetime import timedelta

import torch
import torch.distributed as dist

from .dist_env import dist_env, free_port, setup_dist_env  # noqa: F401  (free_port re-exported for tests)

_IO_GROUP = None


def local_device_index(local_rank: int | None = None, visible: int | None = None) -> int:
    """The accelerator index of this rank: LOCAL_RANK modulo the CUDA devices this process sees (a Slurm job that
    binds one GPU per task, `--gpus-per-task=1`, shows each rank a single device 0, whatever its LOCAL_RANK).
    `local_rank` / `visible` default to LOCAL_RANK and torch's device count; without CUDA it is LOCAL_RANK."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if visible is None:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return local_rank % visible if visible else local_rank


def process_group_device(environ: Mapping[str, str], visible: int) -> torch.device | None:
    """The device the default process group is bound to (`init_process_group(device_id=...)`) for a rank started
    with `environ` (a launcher's or a Slurm task's variables, `dist_env`) that sees `visible` CUDA devices: its own
    GPU, `cuda:local_device_index()`, when there are CUDA devices and more than one rank; None on CPU and for a
    single rank (binding a device makes torch build every later group with ncclCommSplit, which a one-rank job has
    no peer for; DeepSpeed skips it there too)."""
    de = dist_env(environ)
    if not visible or de.world_size == 1:
        return None
    return torch.device("cuda", local_device_index(de.local_rank, visible))


def init_distributed(timeout_s: float = 1800, io_timeout_s: float = 24 * 3600) -> torch.device:
    """Initialise torch.distributed once, hand it to DeepSpeed, and return this rank's device (no-op if done).

    Reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT as set by `deepspeed` or `torchrun`, derives them from Slurm under
    `srun`, and with neither starts a one-process group on a free local port (`launch.dist_env`). DeepSpeed's
    accelerator must be the hardware's (`accelerator.check_deepspeed`: a stale DS_ACCELERATOR stops here with one
    line). On GPU the rank is bound to `local_device_index()` and the NCCL group is created here, bound to that
    device (`process_group_device`): DeepSpeed 0.19's own `init_process_group` binds `cuda:LOCAL_RANK`, which does
    not exist where a Slurm task sees one GPU; `deepspeed.init_distributed` then adopts the existing group. On CPU
    it uses gloo and skips DeepSpeed's shared-memory all-reduce op, whose first use JIT-compiles for 50-85 s and
    which serves only inference.
    """
    global _IO_GROUP
    import deepspeed
    import deepspeed.comm as ds_comm

    from .accelerator import check_deepspeed

    if dist.is_initialized():
        return device()
    setup_dist_env()  # RANK/WORLD_SIZE/... from a launcher, from Slurm (srun), or a single process
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_deepspeed(visible)
    if visible:
        torch.cuda.set_device(local_device_index(visible=visible))
    else:
        # `import deepspeed.comm.torch as m` would bind the *torch* package (deepspeed.comm has a `torch` attribute)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    backend, timeout = ("nccl" if visible else "gloo"), timedelta(seconds=timeout_s)
    bound = process_group_device(os.environ, visible)
    dist.init_process_group(backend, timeout=timeout, **({"device_id": bound} if bound is not None else {}))
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    assert ds_comm.is_initialized()
    _IO_GROUP = dist.new_group(backend="gloo", timeout=timedelta(seconds=io_timeout_s))
    return device()


def device() -> torch.device:
    """This rank's device: cuda:<local index> on GPU machines, cpu otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_device_index())
    return torch.device("cpu")


def wait_for_io() -> None:
    """Barrier of every rank in the I/O group (host-side, its own long timeout): use it where ranks wait for another
    rank's disk writes instead of `dist.barrier()`, whose timeout is sized for the training step's collectives."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=_IO_GROUP)


def any_rank(flag: bool) -> bool:
    """Collective: whether `flag` is true on any rank — one int all-reduced over the host-side I/O group (no device
    sync, no NCCL op)."""
    t = torch.tensor([int(flag)], dtype=torch.int32)  # host-side on purpose (gloo group)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_IO_GROUP)
    return bool(t[0])


@contextlib.contextmanager
def one_error_for_all(what: str = "setup"):
    """Collective: run a block on every rank; if any rank raises a UserError in it, every rank raises one after it —
    rank 0 the first failing rank's message (printed once, by rank 0), the others `ReportedByAnotherRank` (exit 2,
    silent). The block must hold no collective: a rank that fails inside it would leave the others waiting."""
    from ..errors import ReportedByAnotherRank, UserError

    error = None
    try:
        yield
    except UserError as e:
        error = str(e)
    world = dist.get_world_size() if dist.is_initialized() else 1
    errors = [error]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error, group=_IO_GROUP)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        if (dist.get_rank() if dist.is_initialized() else 0) == 0:
            raise UserError(message if rank == 0 else f"{message} (rank {rank})")
        raise ReportedByAnotherRank(message)


def shutdown(wait_for_others: bool = True) -> None:
    """Barrier + destroy the process group (without the barrier some CPU runs stall 30-60 s at exit). After an error
    (`wait_for_others=False`) no barrier: the other ranks may be stuck in a collective this rank will never join,
    and the job's launcher (deepspeed, torchrun, srun --kill-on-bad-exit) ends them when this rank exits."""
    global _IO_GROUP
    if dist.is_initialized():
        try:
            if wait_for_others:
                wait_for_io()
        finally:
            _IO_GROUP = None
            if wait_for_others:
                dist.destroy_process_group()
