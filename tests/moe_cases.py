"""One random `UpcycledMoE` layer, its inputs, and a forward + backward that returns the output and every gradient:
shared by test_experts.py and dist_scripts/moe_layer_ep2.py."""

from __future__ import annotations

import torch

from upcycle_ds.moe.layer import UpcycledMoE

H, I, E = 64, 96, 4


def make_layer(k: int, *, capacity_factor=None, starve=(), hidden=H, inter=I, seed=0) -> UpcycledMoE:
    """A random layer; experts in `starve` never win a slot (inputs from `make_input` have x[:, 0] = 1)."""
    torch.manual_seed(seed)
    moe = UpcycledMoE(hidden_size=hidden, intermediate_size=inter, num_experts=E, top_k=k,
                      capacity_factor=capacity_factor)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
        moe.router.weight.normal_(0, 0.5)
        for e in starve:
            moe.router.weight[e, 0] = -1e3
    return moe.train()


def shard_layer(full: UpcycledMoE, ep_size: int, rank: int) -> UpcycledMoE:
    """The expert-parallel slice of `full` for `rank`: same router, global experts rank * L ... (rank + 1) * L - 1.
    torch.distributed must be initialised."""
    r = full.router
    moe = UpcycledMoE(hidden_size=full.hidden_size, intermediate_size=full.intermediate_size,
                      num_experts=full.num_experts, top_k=full.top_k, ep_size=ep_size,
                      capacity_factor=r.capacity_factor)
    moe.router.min_capacity = r.min_capacity
    moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.router.weight.copy_(r.weight)
        for local, gid in enumerate(moe.global_expert_ids()):
            moe.local_experts[local].load_state_dict(full.local_experts[gid].state_dict())
    return moe.train(full.training)


def make_input(T: int, hidden=H, seed=1, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(T, hidden, generator=torch.Generator().manual_seed(seed))
    x[:, 0] = 1.0
    return x.to(dtype)


def run(moe: UpcycledMoE, x: torch.Tensor, impl: str, *, proj_seed: int = 7, aux_coef: float = 0.01):
    """Forward + backward of a fixed projection of the output plus the aux loss; returns (out, grads)."""
    moe.expert_impl = impl
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = moe(x)
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(proj_seed)).to(out.dtype)
    ((out * proj).sum() + aux_coef * moe.router.aux_loss).backward()
    grads = {"input": x.grad, **{n: p.grad for n, p in moe.named_parameters()}}
    return out.detach(), grads


def assert_close_at_scale(x: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "") -> None:
    """|x - ref| <= tol * max(1, max |ref|) elementwise."""
    bound = tol * max(1.0, ref.float().abs().max().item()) if ref.numel() else 0.0
    torch.testing.assert_close(x, ref, rtol=0, atol=bound, msg=lambda m: f"{name}: {m}")


def assert_same(a, b, *, tol: float):
    """Outputs and all gradients of two `run`s equal within tol * max(1, largest magnitude of the tensor)."""
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert grads_a.keys() == grads_b.keys()
    for name, x, y in [("output", out_a, out_b)] + [(n, grads_a[n], grads_b[n]) for n in grads_a]:
        assert x is not None and y is not None, f"{name} got no gradient"
        assert_close_at_scale(x, y, tol, name)
