"""`--offload-optimizer` before any rank starts: the node's host memory must hold what ZeRO-Offload puts there.

The launcher (`upcycle-ds train --nproc N`, one node) computes the host bytes of its N ranks with `upcycle-ds plan`'s
arithmetic (`plan.host_states`: fp32 masters, AdamW moments, the fp32 gradient partition, the weight buffer, the
gradient staging buffer and, with --grad-accum > 1, the gradient accumulator) and compares them with the node's RAM
less plan's default margin (10%), so a job that would be killed by the host's out-of-memory killer after minutes of
start-up stops at once with one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..plan import GIB, Setup, count_params, host_states, largest_param, shape_from_config, upcycled_shape

HOST_MARGIN = 0.10
"""Fraction of host RAM kept free for everything else on the node (the ranks' own processes, the data loader, the
page cache); `upcycle-ds plan --margin`'s default."""


def machine_memory_bytes() -> int:
    """RAM this process may use: the machine's physical memory, or the cgroup's limit where one is set (a Slurm job
    with --mem, a container)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def host_bytes_per_rank(args, config: dict, world_size: int) -> float:
    """The offloaded bytes one rank of this run holds in host memory (`plan.host_states`), for the MoE model the
    ranks will build from `config` (an HF MoE config, or a dense one upcycled on the fly with --num-experts)."""
    from ..families import family_for

    _, is_moe = family_for(config)
    shape = shape_from_config(config) if is_moe else upcycled_shape(
        config, num_experts=args.num_experts, top_k=args.top_k, layers=args.layers)
    counts = count_params(shape)
    setup = Setup(nodes=1, gpus_per_node=world_size, ep_size=args.ep_size, zero_stage=args.zero_stage,
                  dtype=args.dtype, grad_accum=args.grad_accum, offload_optimizer=True)
    rows = host_states(counts.non_expert, counts.expert, setup, largest_param(shape))
    return sum(a + b for a, b in rows.values())


def check_host_memory(args, config: dict, world_size: int) -> None:
    """With --offload-optimizer: the offloaded state of this node's `world_size` ranks fits its host memory
    (--host-memory-gb, default this machine's) less HOST_MARGIN; else one UserError line."""
    if not args.offload_optimizer:
        return
    per_rank = host_bytes_per_rank(args, config, world_size)
    given = args.host_memory_gb
    host = given * GIB if given is not None else machine_memory_bytes()
    usable = host * (1 - HOST_MARGIN)
    need = world_size * per_rank
    if need > usable:
        what = f"--host-memory-gb {given:g}" if given is not None else "this machine's memory"
        raise UserError(f"--offload-optimizer: {world_size} ranks need {_size(need)} of host memory for the offloaded "
                        f"optimizer ({_size(per_rank)} per rank: fp32 masters, AdamW moments, gradient and weight "
                        f"buffers), more than the {_size(usable)} usable ({what}, {HOST_MARGIN:.0%} kept free); use "
                        f"more nodes (ZeRO partitions the state over all ranks), or see `upcycle-ds plan "
                        f"--offload-optimizer`")


def _size(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB / 100 else f"{b / 2**20:.2f} MiB"
