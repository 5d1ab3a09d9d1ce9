"""The batch order: deterministic, rank-sharded, resumable — and independent of the world size.

For one epoch:

1. permute the rows by (seed, epoch) (`shuffle=False`: keep row order) — the same permutation on every rank;
2. cut the permuted rows into *groups* of `micro_batch_size` consecutive rows;
3. keep whole optimizer steps: `micro_batch_size * world_size * grad_accum` rows per step, the remainder dropped
   (`pad_remainder=True` instead pads with empty rows, index -1: all padding, no loss — for eval passes);
4. deal the groups round-robin: rank r's j-th micro-batch is group ``j * world_size + r``.

Optimizer step s therefore consumes groups ``[s*W*A, (s+1)*W*A)`` whatever the split between ranks (W) and
accumulation (A): a run on 2 ranks with grad_accum 1 and one on 1 rank with grad_accum 2 see the same micro-batches
in the same optimizer steps. The data position is a number of groups (`start * world_size` for a rank that
consumed `start` micro-batches this epoch), so a run can resume on a different number of ranks as long as
`W * A` is unchanged (or the position is a whole number of the new steps).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _check(micro_batch_size: int, world_size: int, grad_accum: int, rank: int = 0) -> None:
    if micro_batch_size < 1 or world_size < 1 or grad_accum < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad sharding: micro_batch_size={micro_batch_size} rank={rank} world_size={world_size} "
                         f"grad_accum={grad_accum}")


def epoch_groups(n_rows: int, *, micro_batch_size: int, world_size: int, seed: int, epoch: int,
                 grad_accum: int = 1, shuffle: bool = True, pad_remainder: bool = False) -> np.ndarray:
    """All groups of the epoch, [num_groups, micro_batch_size] row indices (-1 = empty padding row), in order."""
    _check(micro_batch_size, world_size, grad_accum)
    order = np.random.default_rng([seed, epoch]).permutation(n_rows) if shuffle else np.arange(n_rows)
    per_step = micro_batch_size * world_size * grad_accum
    if pad_remainder:
        order = np.concatenate([order, np.full(-n_rows % per_step, -1, dtype=order.dtype)])
    else:
        order = order[: n_rows // per_step * per_step]
    return order.reshape(-1, micro_batch_size)


def num_batches(n_rows: int, *, micro_batch_size: int, world_size: int, grad_accum: int = 1,
                pad_remainder: bool = False) -> int:
    """Micro-batches per rank per epoch (the same on every rank; a multiple of grad_accum)."""
    _check(micro_batch_size, world_size, grad_accum)
    per_step = micro_batch_size * world_size * grad_accum
    steps = -(-n_rows // per_step) if pad_remainder else n_rows // per_step
    return steps * grad_accum


def rank_groups(n_rows: int, *, micro_batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                grad_accum: int = 1, shuffle: bool = True, pad_remainder: bool = False) -> np.ndarray:
    """This rank's micro-batches of the epoch as row indices, [num_batches, micro_batch_size]."""
    _check(micro_batch_size, world_size, grad_accum, rank)
    groups = epoch_groups(n_rows, micro_batch_size=micro_batch_size, world_size=world_size, seed=seed, epoch=epoch,
                          grad_accum=grad_accum, shuffle=shuffle, pad_remainder=pad_remainder)
    return groups[rank::world_size]


def batches(dataset, *, micro_batch_size: int, rank: int, world_size: int, seed: int, epoch: int, start: int = 0,
            shuffle: bool = True, pad_remainder: bool = False,
            grad_accum: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches for one epoch (module docs): `dataset.batch(rows)` for each, from micro-batch
    `start` on (`start` = micro-batches this rank already consumed this epoch: exact resume)."""
    mine = rank_groups(len(dataset), micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=seed,
                       epoch=epoch, grad_accum=grad_accum, shuffle=shuffle, pad_remainder=pad_remainder)
    if not 0 <= start <= len(mine):
        raise ValueError(f"start={start} is outside this epoch's {len(mine)} micro-batches")
    return (dataset.batch(mine[j]) for j in range(start, len(mine)))
