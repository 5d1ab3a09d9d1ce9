"""UpIT genetic expert expansion (upcycle_ds.upit.expand): parents, crossover, DARE, determinism."""

from __future__ import annotations

import pytest
import torch

from upcycle_ds.errors import UserError
from upcycle_ds.upit.expand import (PROJS, choose_parents, cosine, crossover, dare, delta_cosine_matrix, expand_pool,
                                    flat_delta)

H, I = 8, 12


def expert_from_delta(base, delta_P):
    out, off = {}, 0
    for p in PROJS:
        n = base[p].numel()
        out[p] = base[p] + delta_P[off:off + n].reshape(base[p].shape)
        off += n
    return out


def make_base(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"gate": torch.randn(I, H, generator=g), "up": torch.randn(I, H, generator=g),
            "down": torch.randn(H, I, generator=g)}


def test_flat_delta_order_and_zero_cosine():
    base = make_base()
    e = {p: base[p] + (i + 1) for i, p in enumerate(PROJS)}
    d = flat_delta(e, base)
    assert d.shape == (3 * H * I,)
    assert torch.allclose(d[:I * H], torch.full((I * H,), 1.0)) and torch.allclose(d[-H * I:], torch.full((H * I,), 3.0))
    assert cosine(torch.zeros(5), torch.ones(5)) == 0.0  # the base's own delta: orthogonal to everything


def test_most_dissimilar_pair_is_chosen_and_not_reused():
    base = make_base()
    P = 3 * H * I
    a = torch.zeros(P); a[: P // 2] = torch.randn(P // 2)
    b = torch.zeros(P); b[P // 2:] = torch.randn(P - P // 2)  # b ⟂ a
    c = -a + 0.1 * b  # nearly opposite to a: (0, 2) is the most dissimilar pair
    pool = [expert_from_delta(base, v) for v in (a, b, c)]
    cos = delta_cosine_matrix([flat_delta(e, base) for e in pool])
    assert cos[0, 2] < -0.9 and abs(cos[0, 1]) < 1e-6 and cos[1, 2] > 0
    assert choose_parents(cos, set()) == (0, 2)
    assert choose_parents(cos, {(0, 2)}) == (0, 1)  # next lowest cosine (0 < cos(1, 2))
    assert choose_parents(cos, {(0, 2), (0, 1)}) == (1, 2)
    with pytest.raises(UserError, match="every pair"):
        choose_parents(cos, {(0, 1), (0, 2), (1, 2)})

    exp = expand_pool(base, pool, 8, seed=3, layer=0, p=0.3)
    assert len(exp.new_experts) == 5
    assert exp.provenance[0]["parents"] == [0, 2]
    pairs = [tuple(p["parents"]) for p in exp.provenance]
    assert len(set(pairs)) == len(pairs)  # a pair used as parents is never chosen again
    for prov in exp.provenance:  # each choice was the most dissimilar unused pair at that moment
        n = prov["expert"]
        used = {tuple(q["parents"]) for q in exp.provenance if q["expert"] < n}
        assert tuple(prov["parents"]) == choose_parents(exp.cosine[:n, :n], used)
    assert exp.cosine.shape == (8, 8)
    assert torch.allclose(exp.cosine, exp.cosine.T)


def test_crossover_is_the_alpha_mix():
    a, b = torch.randn(100), torch.randn(100)
    assert torch.equal(crossover(a, b, 0.25), 0.25 * a + 0.75 * b)
    assert torch.equal(crossover(a, b, 1.0), a)


def test_dare_drops_p_and_rescales_survivors_exactly():
    g = torch.Generator().manual_seed(0)
    delta = torch.rand(200_000, generator=g) + 0.5  # no zeros: a zero in the output means dropped
    for p in (0.3, 0.9):
        out = dare(delta, p, torch.Generator().manual_seed(1))
        kept = out != 0
        assert abs((~kept).float().mean().item() - p) < 0.01
        assert torch.equal(out[kept], delta[kept] / (1 - p))
        # the survivors keep the expected sum (DARE's point): mean(out) ≈ mean(delta)
        assert abs(out.mean().item() / delta.mean().item() - 1) < 0.02
    assert torch.equal(dare(delta, 0.0, g), delta)
    with pytest.raises(UserError, match="dare-p"):
        dare(delta, 1.0, g)


def test_new_expert_is_base_plus_dare_of_crossover():
    base = make_base()
    pool = [expert_from_delta(base, torch.randn(3 * H * I)) for _ in range(2)]
    p = 0.5
    exp = expand_pool(base, pool, 3, seed=7, layer=2, p=p)
    (prov,) = exp.provenance
    j, k = prov["parents"]
    alpha = prov["alpha"]
    assert 0 < alpha < 1
    d = flat_delta(exp.new_experts[0], base)
    merged = alpha * flat_delta(pool[j], base) + (1 - alpha) * flat_delta(pool[k], base)
    dropped = d == 0
    assert abs(dropped.float().mean().item() - p) < 0.1  # only 288 elements
    torch.testing.assert_close(d[~dropped], merged[~dropped] / (1 - p), rtol=1e-5, atol=1e-5)


def test_same_seed_same_experts_different_seed_or_layer_differs():
    base = make_base()
    pool = [expert_from_delta(base, torch.randn(3 * H * I, generator=torch.Generator().manual_seed(i)))
            for i in range(3)]
    a = expand_pool(base, pool, 6, seed=1, layer=0)
    b = expand_pool(base, pool, 6, seed=1, layer=0)
    c = expand_pool(base, pool, 6, seed=2, layer=0)
    d = expand_pool(base, pool, 6, seed=1, layer=1)
    for x, y in zip(a.new_experts, b.new_experts):
        assert all(torch.equal(x[p], y[p]) for p in PROJS)
    assert a.provenance == b.provenance
    for other in (c, d):
        assert not torch.equal(a.new_experts[0]["gate"], other.new_experts[0]["gate"])
        assert a.provenance[0]["alpha"] != other.provenance[0]["alpha"]


def test_dtype_kept_and_needs_two_experts():
    base = {p: t.to(torch.bfloat16) for p, t in make_base().items()}
    pool = [{p: (t + 0.5 * i).to(torch.bfloat16) for p, t in base.items()} for i in (1, 2)]
    new = expand_pool(base, [pool[0], pool[1]], 3, seed=0, layer=0).new_experts[0]
    assert all(new[p].dtype == torch.bfloat16 for p in PROJS)
    with pytest.raises(UserError, match="at least 2"):
        expand_pool(base, pool[:1], 3, seed=0, layer=0)
