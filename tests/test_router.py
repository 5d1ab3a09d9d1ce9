"""Router semantics and losses against independent references (transformers' own functions / definitions)."""

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from upcycle_ds.moe.router import TopKRouter


def _router(E=8, k=2, H=16, **kw):
    torch.manual_seed(0)
    r = TopKRouter(H, E, k, **kw)
    torch.nn.init.normal_(r.weight, std=1.0)
    return r


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_renormalised_like_mixtral(k):
    r = _router(k=k).eval()
    x = torch.randn(50, 16)
    routing = r(x)
    probs = torch.softmax(x @ r.weight.t(), -1)
    top, idx = probs.topk(k, -1)
    assert torch.equal(routing.experts_TK, idx)
    torch.testing.assert_close(routing.weights_TK, top / top.sum(-1, keepdim=True), rtol=0, atol=1e-6)
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(50), rtol=0, atol=1e-6)
    assert routing.keep_TK is None


def test_aux_and_z_loss_match_references():
    r = _router(E=8, k=2)
    x = torch.randn(64, 16)
    r(x)
    logits = x @ r.weight.t()
    ref_aux = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    torch.testing.assert_close(r.aux_loss, ref_aux, rtol=1e-6, atol=1e-6)
    ref_z = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(r.z_loss, ref_z, rtol=1e-6, atol=1e-6)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(r.stats.entropy, -(probs * probs.log()).sum(-1).mean().detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(r.stats.aux_loss, ref_aux.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r.stats.z_loss, ref_z.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(r.stats.tokens_per_expert, torch.bincount(logits.topk(2, -1).indices.reshape(-1), minlength=8))
    assert r.stats.slots == 64 * 2 and r.stats.dropped.item() == 0
    # the aux loss has gradients w.r.t. the router weight (through P_i)
    r.weight.grad = None
    r.aux_loss.backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_capacity_drops_in_training_only_first_choices_first():
    r = _router(E=4, k=2, capacity_factor=0.5, min_capacity=1)
    x = torch.randn(40, 16)
    cap = math.ceil(0.5 * 40 * 2 / 4)
    routing = r.train()(x)
    keep = routing.keep_TK
    assert keep is not None
    for e in range(4):
        assert int(((routing.experts_TK == e) & keep).sum()) <= cap
    # a first choice is dropped only if that expert is full of first choices
    for e in range(4):
        firsts = int((routing.experts_TK[:, 0] == e).sum())
        kept_firsts = int(((routing.experts_TK[:, 0] == e) & keep[:, 0]).sum())
        assert kept_firsts == min(firsts, cap)
    assert torch.all(routing.weights_TK[~keep] == 0)
    assert r.stats.dropped.item() == int((~keep).sum()) > 0
    # eval is dropless (what the HF export computes)
    assert r.eval()(x).keep_TK is None


def test_no_noise_and_deterministic_in_eval():
    r = _router().eval()
    x = torch.randn(30, 16)
    a, b = r(x), r(x)
    assert torch.equal(a.weights_TK, b.weights_TK) and torch.equal(a.experts_TK, b.experts_TK)


def test_empty_batch():
    r = _router().train()
    routing = r(torch.randn(0, 16))
    assert routing.experts_TK.shape == (0, 2)
    s = r.stats
    assert s.slots == 0 and s.tokens_per_expert.tolist() == [0] * 8 and s.dropped.item() == 0
    assert s.entropy.item() == 0 and r.aux_loss.item() == 0 and r.z_loss.item() == 0
