"""UpIT expert expansion (docs/upit.md, stage 2): grow one MoE layer's expert pool to E experts by a genetic algorithm.

Pure functions, no I/O. An expert is a dict {"gate", "up", "down"} of weight tensors; its *delta* is its difference
from the dense base MLP, flattened and concatenated in (gate, up, down) order, in float32.

Per new expert, until the pool holds E experts:
  parents   the two most dissimilar experts of the current pool (new experts included): the pair with the lowest
            cosine similarity of their deltas, a pair already used as parents skipped, ties to the lowest (j, k);
  crossover α ~ U(0,1): merged = α·Δ_j + (1−α)·Δ_k;
  mutation  DARE: drop each element of the merged delta with probability p, rescale survivors by 1/(1−p);
  result    base + mutated delta, cast to the experts' dtype.
Every draw of new expert n in layer L comes from a generator seeded from (seed, layer L, n): the result does not
depend on the order layers are processed in, or on which machine does it.

Legend: P = number of MLP parameters of one expert (3·H·I), N = pool size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import UserError
from .. import checks
from ..upcycle import derive_seed

PROJS = ("gate", "up", "down")

Expert = dict[str, torch.Tensor]


def flat_delta(expert: Expert, base: Expert) -> torch.Tensor:
    """(P,) float32: expert − base, flattened and concatenated in (gate, up, down) order."""
    for p in PROJS:
        if expert[p].shape != base[p].shape:
            raise UserError(f"expert {p} shape {tuple(expert[p].shape)} differs from the base MLP's "
                            f"{tuple(base[p].shape)}")
    return torch.cat([(expert[p].float() - base[p].float()).reshape(-1) for p in PROJS])


def unflatten(delta_P: torch.Tensor, like: Expert) -> Expert:
    """Inverse of the concatenation in `flat_delta`: split (P,) back into {gate, up, down} shaped like `like`."""
    out, off = {}, 0
    for p in PROJS:
        n = like[p].numel()
        out[p] = delta_P[off:off + n].reshape(like[p].shape)
        off += n
    return out


def cosine(a_P: torch.Tensor, b_P: torch.Tensor) -> float:
    """Cosine similarity (float64 accumulation); 0 when either vector is all zeros (e.g. the base's own delta)."""
    na, nb = a_P.double().norm(), b_P.double().norm()
    if na == 0 or nb == 0:
        return 0.0
    return float(torch.dot(a_P.double(), b_P.double()) / (na * nb))


def delta_cosine_matrix(deltas: list[torch.Tensor]) -> torch.Tensor:
    """(N, N) float64 cosine similarities of the deltas; 1 on the diagonal."""
    n = len(deltas)
    cos_NN = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            cos_NN[i, j] = cos_NN[j, i] = cosine(deltas[i], deltas[j])
    return cos_NN


def choose_parents(cos_NN: torch.Tensor, used_pairs: set[tuple[int, int]]) -> tuple[int, int]:
    """The pair (j, k), j < k, with the lowest cosine similarity (= highest 1 − cos) not in `used_pairs`.

    Ties go to the lexicographically lowest (j, k). Raises if every pair has been used.
    """
    n = cos_NN.shape[0]
    best, best_cos = None, None
    for j in range(n):
        for k in range(j + 1, n):
            if (j, k) in used_pairs:
                continue
            c = float(cos_NN[j, k])
            if best is None or c < best_cos:
                best, best_cos = (j, k), c
    if best is None:
        raise UserError(f"expert expansion: every pair of the {n} experts has already been used as parents")
    return best


def crossover(delta_j: torch.Tensor, delta_k: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·Δ_j + (1−α)·Δ_k."""
    return alpha * delta_j + (1.0 - alpha) * delta_k


def dare(delta: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2024): zero each element with probability p, divide the survivors by (1 − p).

    The drop mask is `torch.rand(delta.shape, generator) < p`; survivors are exactly `delta / (1 - p)`.
    """
    checks.fraction("--dare-p", p)
    if p == 0:
        return delta.clone()
    drop = torch.rand(delta.shape, generator=generator) < p
    return torch.where(drop, torch.zeros((), dtype=delta.dtype), delta / (1.0 - p))


class Expansion(NamedTuple):
    new_experts: list[Expert]
    """The experts added to the pool, in order (pool indices len(experts), len(experts)+1, ...)."""
    provenance: list[dict]
    """Per new expert: {"expert", "parents": [j, k], "alpha", "parent_cosine"}."""
    cosine: torch.Tensor
    """(E, E) cosine similarities of the deltas of the final pool (given experts first, then the new ones)."""


def expand_pool(base: Expert, experts: list[Expert], target_e: int, *, seed: int, layer: int, p: float = 0.3
                ) -> Expansion:
    """Grow `experts` (one layer's pool) to `target_e` experts by dissimilar-parent crossover + DARE mutation."""
    if target_e > len(experts) and len(experts) < 2:
        raise UserError(f"expert expansion needs at least 2 experts to merge (got {len(experts)}); "
                        f"save more checkpoints, or use `upcycle-ds upcycle` for copies of one MLP")
    deltas = [flat_delta(e, base) for e in experts]
    cos_NN = delta_cosine_matrix(deltas)
    used: set[tuple[int, int]] = set()
    new_experts, provenance = [], []
    while len(deltas) < target_e:
        n = len(deltas)
        j, k = choose_parents(cos_NN, used)
        used.add((j, k))
        g = torch.Generator().manual_seed(derive_seed(seed, "upit-expand", layer, n))
        alpha = float(torch.rand((), generator=g, dtype=torch.float64))
        merged = dare(crossover(deltas[j], deltas[k], alpha), p, g)
        parts = unflatten(merged, base)
        new_experts.append({q: (base[q].float() + parts[q]).to(experts[0][q].dtype) for q in PROJS})
        provenance.append({"expert": n, "parents": [j, k], "alpha": alpha, "parent_cosine": float(cos_NN[j, k])})
        # the pool's delta is what was actually stored (after the dtype cast), so cosines describe the real expert
        deltas.append(flat_delta(new_experts[-1], base))
        grown = torch.eye(n + 1, dtype=torch.float64)
        grown[:n, :n] = cos_NN
        for i in range(n):
            grown[i, n] = grown[n, i] = cosine(deltas[i], deltas[n])
        cos_NN = grown
    return Expansion(new_experts, provenance, cos_NN)
