"""Who am I in the job? RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for torch.distributed.

Sources, first match wins:
1. a launcher already set them (torchrun, `deepspeed`, `srun torchrun`, `srun deepspeed --no_ssh`): RANK + WORLD_SIZE
   are in the environment; LOCAL_WORLD_SIZE may be spelled LOCAL_SIZE (deepspeed's launcher).
2. one process per rank started by `srun` (slurm/*.sbatch): SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS),
   SLURM_LOCALID, tasks per node from SLURM_STEP_TASKS_PER_NODE / SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE;
   the master is the first host of the step's node list, at its NodeAddr (`scontrol show node`), and the port comes
   from SLURM_JOB_ID. A MASTER_ADDR / MASTER_PORT already in the environment (the sbatch scripts export them once
   per job) wins over the derived ones.
   Only inside a job *step* (SLURM_STEP_ID set): the batch script itself and an `salloc` shell also carry
   SLURM_PROCID=0 and SLURM_NTASKS=N, and a process started there without `srun` is one process, not rank 0 of N.
3. otherwise: one process (rank 0 of 1 on 127.0.0.1, MASTER_PORT or a free port, so parallel runs do not collide).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Literal

from . import slurm

DEFAULT_ADDR, DEFAULT_PORT = "127.0.0.1", 29500


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: Literal["launcher", "slurm", "single"]
    """Where the values came from."""

    def __post_init__(self):
        if not (0 <= self.rank < self.world_size and 0 <= self.local_rank < self.local_world_size):
            raise ValueError(f"inconsistent distributed environment: {self}")

    def as_environ(self) -> dict[str, str]:
        """The variables torch.distributed's `env://` init (and deepspeed.init_distributed) read."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def free_port(host: str = DEFAULT_ADDR) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            return int(env[name])
    return None


def dist_env(environ: Mapping[str, str] | None = None, *,
             hostnames: Callable[[str], list[str]] = slurm.hostnames,
             node_addr: Callable[[str], str] = slurm.node_addr) -> DistEnv:
    """Derive this process's place in the job from `environ` (default: os.environ); changes nothing.

    `hostnames` / `node_addr` expand a Slurm node list and map a node to its address (scontrol by default).
    """
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR") or None
    port = _int(env, "MASTER_PORT")

    if env.get("RANK", "").strip() and env.get("WORLD_SIZE", "").strip():
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_world = _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE") or world
        return DistEnv(rank=rank, world_size=world, local_rank=_int(env, "LOCAL_RANK") or 0,
                       local_world_size=local_world, master_addr=addr or DEFAULT_ADDR,
                       master_port=port or DEFAULT_PORT, source="launcher")

    if env.get("SLURM_STEP_ID", "").strip() and env.get("SLURM_PROCID", "").strip():
        world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
        if world is None:
            raise ValueError("inside a Slurm step but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS is set")
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE") \
            or env.get("SLURM_TASKS_PER_NODE") or str(world)
        counts = slurm.parse_tasks_per_node(per_node)
        node_id = _int(env, "SLURM_NODEID") or 0
        local_world = counts[node_id] if node_id < len(counts) else counts[0]
        if addr is None:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            addr = node_addr(hostnames(nodelist)[0]) if nodelist else DEFAULT_ADDR
        if port is None:
            port = slurm.master_port_for_job(env["SLURM_JOB_ID"]) if env.get("SLURM_JOB_ID") else DEFAULT_PORT
        return DistEnv(rank=int(env["SLURM_PROCID"]), world_size=world, local_rank=_int(env, "SLURM_LOCALID") or 0,
                       local_world_size=local_world, master_addr=addr, master_port=port, source="slurm")

    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr=addr or DEFAULT_ADDR,
                   master_port=port or free_port(), source="single")


def setup_dist_env(environ: MutableMapping[str, str] | None = None) -> DistEnv:
    """`dist_env()`, then write the six variables into `environ` (default os.environ) for `env://` init."""
    env = os.environ if environ is None else environ
    de = dist_env(env)
    env.update(de.as_environ())
    return de
