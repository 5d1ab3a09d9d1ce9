"""Granular (fine-grained) upcycling: a dense SwiGLU MLP split into G neuron groups, one expert per group.

The dense MLP is a sum over its intermediate neurons i, f(x) = sum_i down[:, i] * silu(gate_i . x) * (up_i . x), so
any partition of the neurons into groups S_1..S_G gives f = sum_g f_g, where f_g uses only the rows of gate/up and
the columns of down in S_g. With C copies of the G slices (E = C*G experts, expert e = c*G + g), every expert's
`down` multiplied by G, and the G experts of one copy sharing one router row (a "virtual group"), softmax -> top-k
-> renormalise with k = G*k' selects whole copies and gives each selected slice the weight p_c / (G * sum p), so the
MoE computes exactly f(x) (docs/granular.md has the proof and the cases where it cannot be exact). A shared expert
(Qwen2-MoE) takes a fraction of the neurons; its sigmoid gate starts at 0 (sigmoid = 1/2), so its `down` is doubled.

This module knows which neurons go where (`NeuronSplit`, `split_neurons`), how one slice becomes an expert
(`slice_mlp`), and the sizes involved (`split_sizes`). No I/O; `upcycle.UpcycledView` and `upit.assemble` use it,
`merge` inverts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UserError
from . import checks
from .options import ALIGN, SPLITS, split_sizes, valid_granularities  # noqa: F401  (the sizes live with the options)

SHARED_GATE_INIT = 0.5
"""sigmoid(0): the shared expert's gate value at initialisation (its gate weights are zero)."""


@dataclass(frozen=True)
class NeuronSplit:
    """Which dense intermediate neurons each routed group and the shared expert take (int64 index tensors)."""

    groups: tuple[torch.Tensor, ...]
    """G index tensors of equal size (the routed experts' intermediate size), each sorted ascending."""
    shared: torch.Tensor
    """the shared expert's neurons, sorted ascending (empty without a shared expert)."""


def split_neurons(gate: torch.Tensor, up: torch.Tensor, *, granularity: int, shared_fraction: float,
                  method: str, generator: torch.Generator) -> NeuronSplit:
    """Partition the rows of `gate`/`up` (the intermediate neurons) into G routed groups and the shared expert.

    contiguous: group g = neurons [g*m, (g+1)*m), shared = the last I_s neurons (so concatenating the groups and then
    the shared expert gives back the dense order). random: one seeded permutation; shared = its last I_s neurons,
    groups = consecutive chunks of the rest. cluster: shared as in random, the routed neurons grouped by balanced
    k-means on their L2-normalised [gate_i, up_i] rows (MoEfication-style parameter clustering), so neurons with
    similar input weights land in the same expert.
    """
    checks.one_of("--split", method, SPLITS)
    I = gate.shape[0]
    m, n_shared = split_sizes(I, granularity, shared_fraction)
    n_routed = I - n_shared
    order = torch.arange(I) if method == "contiguous" else torch.randperm(I, generator=generator)
    routed, shared = order[:n_routed], order[n_routed:].sort().values
    if method == "cluster" and granularity > 1:
        feats = torch.cat([gate[routed].float(), up[routed].float()], dim=1)
        labels = balanced_kmeans(feats, granularity, generator=generator)
        groups = [routed[labels == g].sort().values for g in range(granularity)]
        groups.sort(key=lambda t: int(t[0]))
    else:
        groups = [routed[g * m:(g + 1) * m].sort().values for g in range(granularity)]
    return NeuronSplit(groups=tuple(groups), shared=shared)


def balanced_kmeans(x: torch.Tensor, k: int, *, generator: torch.Generator, iters: int = 20) -> torch.Tensor:
    """Cluster the rows of `x` (n x d, n divisible by k) into k clusters of exactly n/k rows each; cosine similarity
    to L2-normalised centroids. Returns the cluster id of every row. Deterministic for a given generator state.

    Assignment under the size constraint is a vectorised proposal round: every unassigned row proposes to its most
    similar cluster with room left, each cluster keeps its most similar proposers up to its room; repeat (at most k+1
    rounds, as every round fills a cluster or assigns every proposer)."""
    n = x.shape[0]
    cap = n // k
    x = torch.nn.functional.normalize(x, dim=1)
    centroids = x[torch.randperm(n, generator=generator)[:k]].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        sim = x @ centroids.t()
        new = _balanced_assign(sim, cap)
        if torch.equal(new, labels):
            break
        labels = new
        centroids = torch.nn.functional.normalize(torch.zeros_like(centroids).index_add_(0, labels, x), dim=1)
    return labels


def _balanced_assign(sim: torch.Tensor, cap: int) -> torch.Tensor:
    n, k = sim.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), cap, dtype=torch.long)
    while True:
        free = (labels < 0).nonzero().flatten()
        if free.numel() == 0:
            return labels
        s = sim[free].masked_fill(room.eq(0).unsqueeze(0), float("-inf"))
        best = s.argmax(1)
        for c in best.unique().tolist():
            cand = free[best == c]
            order = torch.sort(sim[cand, c], descending=True, stable=True).indices
            take = cand[order[: int(room[c])]]
            labels[take] = c
            room[c] -= take.numel()


def scale_(t: torch.Tensor, factor: float) -> torch.Tensor:
    """t * factor, in place on a tensor we own: exact in t's dtype for a power of two (a shift of the exponent),
    otherwise computed in fp32 and rounded once to t's dtype."""
    if factor == 1:
        return t
    if math.frexp(factor)[0] == 0.5 or t.dtype in (torch.float32, torch.float64):
        return t.mul_(factor)
    return t.copy_(t.float().mul_(factor))


def take(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """t's entries `idx` along `dim`: a view when idx is a contiguous range along dim 0 (rows of a contiguous tensor
    stay contiguous), otherwise a new tensor."""
    n = idx.numel()
    if n and int(idx[-1]) - int(idx[0]) == n - 1 and bool((idx.diff() == 1).all()):
        view = t.narrow(dim, int(idx[0]), n)
        return view if view.is_contiguous() else view.contiguous()
    return t.index_select(dim, idx)


def slice_mlp(mlp: dict[str, torch.Tensor], idx: torch.Tensor, down_scale: float) -> dict[str, torch.Tensor]:
    """The SwiGLU MLP restricted to neurons `idx` (rows of gate/up, columns of down), `down` times `down_scale`.
    gate/up may be views of `mlp` (read-only use); `down` is always a new tensor (it is scaled in place)."""
    down = take(mlp["down"], 1, idx)
    if down_scale != 1 and down.untyped_storage().data_ptr() == mlp["down"].untyped_storage().data_ptr():
        down = down.clone()  # all columns: a view, which must not be scaled in place
    return {"gate": take(mlp["gate"], 0, idx), "up": take(mlp["up"], 0, idx), "down": scale_(down, down_scale)}
