"""Dispatch and combine (of route -> dispatch -> compute -> combine): index-based, dropless, no padding.

Each token-slot goes to exactly one expert. Slots are sorted by expert id; with ep_size > 1 the sorted tokens are
exchanged with a variable-split all_to_all over the expert-parallel group (the same group DeepSpeed-MoE creates),
each rank runs its local experts (`experts.py`, grouped GEMM or loop) on exactly the tokens they received, and a
second all_to_all brings the outputs back. Unlike DeepSpeed's GShard dispatch this never pads experts to a common
capacity (docs/benchmarks.md). Both all_to_alls are autograd functions, so gradients flow back the same way.

Every local expert runs on every forward, also on zero tokens, so each expert parameter always gets a gradient
(ZeRO's gradient hooks expect that).

Host reads: at ep_size > 1 exactly one per forward, the `.tolist()` of [sent, received] per-(rank, local expert)
counts that the all_to_all splits need (the counts themselves are exchanged on the device first). At ep_size = 1 the
grouped path reads nothing: all T*K slots stay in the sorted buffer, slots dropped by capacity last, computed by
the last expert and weighted 0 by the combine (their contribution to the output and to every gradient is exactly
0); the loop path reads the per-expert counts once (torch.split needs them).
Nothing in backward reads the host.

Performance (bench/step_time.py, bench/moe_layer.py, docs/benchmarks.md): every row movement is a gather
(`index_select`), forward and backward. Slots reach expert order through one permutation of the T*K slots and come
back through its inverse, so the backward of each gather is a gather too; scatters with accumulation (`index_add_`,
and `index_put_` with accumulate, which autograd uses for the backward of `x[idx]`) are avoided. A token's K slots
are then summed with K-1 plain additions in ascending expert id, the order transformers adds them in.
Shape suffixes: T tokens, K slots per token, F token-major slots (t * K + j), S sorted slots, H hidden,
E experts, L local experts, R ep ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .experts import run_experts_grouped, run_experts_loop
from .router import tokens_per_expert


class _AllToAll(torch.autograd.Function):
    """Variable-split all_to_all over `group`; its backward is the reverse all_to_all."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


class _TakeRows(torch.autograd.Function):
    """x[perm[:n] // rep]: the first n rows of a permutation `perm` of x's rows, each repeated `rep` times.

    Backward is a gather too: row j of the repeated x gets the gradient of output row inv[j] (zero if inv[j] >= n,
    i.e. a dropped slot), then the `rep` copies of each row of x are summed. `inv` is the inverse of `perm`.
    """

    @staticmethod
    def forward(ctx, x, perm, inv, n: int, rep: int):
        ctx.save_for_backward(inv)
        ctx.rep = rep
        idx = perm[:n] if rep == 1 else perm[:n].div(rep, rounding_mode="floor")
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        grad = _pad_rows(grad, inv.numel()).index_select(0, inv)
        if ctx.rep > 1:
            grad = grad.view(-1, ctx.rep, *grad.shape[1:]).sum(1)
        return grad, None, None, None, None


class _PutRows(torch.autograd.Function):
    """The transpose of `_TakeRows` with rep=1: row i of y (i < n) goes to row perm[i] of an N-row output, zeros
    in the other N - n rows. Backward gathers the gradient rows back with perm[:n]."""

    @staticmethod
    def forward(ctx, y, perm, inv):
        ctx.save_for_backward(perm)
        ctx.n = y.shape[0]
        return _pad_rows(y, inv.numel()).index_select(0, inv)

    @staticmethod
    def backward(ctx, grad):
        (perm,) = ctx.saved_tensors
        return grad.index_select(0, perm[:ctx.n]), None, None


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def dispatch_compute_combine(x_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor,
                             keep_TK: torch.Tensor | None, experts: nn.ModuleList, *, num_experts: int,
                             ep_group=None, ep_size: int = 1, expert_impl: str = "loop") -> torch.Tensor:
    """Output rows of the MoE (without shared expert) for x_TH routed as (weights_TK, experts_TK, keep_TK).

    `expert_impl` is the resolved implementation ("grouped" or "loop", see `experts.resolve_expert_impl`)."""
    T, K = experts_TK.shape
    L = num_experts // ep_size
    # a token's slots in ascending expert id (the combine order); slot f = t * K + j
    experts_TK, by_id = torch.sort(experts_TK, dim=1)
    weights_TK = weights_TK.gather(1, by_id)
    expert_F = experts_TK.reshape(-1)
    if keep_TK is not None:  # dropped slots sort last (pseudo-expert num_experts)
        expert_F = torch.where(keep_TK.gather(1, by_id).reshape(-1), expert_F, num_experts)
    order_F = torch.argsort(expert_F, stable=True)  # within an expert: token order
    inv_F = _inverse(order_F)
    counts_E = tokens_per_expert(expert_F, num_experts + 1)[:num_experts]

    if ep_size == 1 and expert_impl == "grouped" and T > 0:  # static shapes: no host read
        x_SH = _TakeRows.apply(x_TH, order_F, inv_F, T * K, K)
        ends_E = counts_E.cumsum(0).to(torch.int32)
        if keep_TK is not None:  # dropped slots (sorted last) ride with the last expert; their combine weight is 0
            ends_E = torch.cat([ends_E[:-1], ends_E.new_full((1,), T * K)])
        y_SH = run_experts_grouped(x_SH, ends_E, experts)
    elif ep_size == 1:
        counts = counts_E.tolist() if T > 0 else [0] * num_experts  # the one host read
        x_SH = _TakeRows.apply(x_TH, order_F, inv_F, sum(counts), K)
        y_SH = run_experts_loop(x_SH, counts, experts)
    else:
        send_RL = counts_E.view(ep_size, L)
        recv_RL = torch.empty_like(send_RL)
        dist.all_to_all_single(recv_RL, send_RL, group=ep_group)
        sent, received = torch.stack([send_RL, recv_RL]).tolist()  # the one host read
        send_splits, recv_splits = [sum(r) for r in sent], [sum(r) for r in received]
        x_SH = _TakeRows.apply(x_TH, order_F, inv_F, sum(send_splits), K)
        x_recv = _AllToAll.apply(x_SH, recv_splits, send_splits, ep_group)
        # received rows are grouped by (source rank, local expert); regroup by local expert
        local_id = torch.arange(L, device=x_TH.device).repeat(ep_size).repeat_interleave(
            recv_RL.reshape(-1), output_size=sum(recv_splits))
        by_expert = torch.argsort(local_id, stable=True)
        inv_by_expert = _inverse(by_expert)
        x_sorted = _TakeRows.apply(x_recv, by_expert, inv_by_expert, by_expert.numel(), 1)
        if expert_impl == "grouped" and x_sorted.shape[0] > 0:  # (zero rows: the loop, every expert on none)
            y_sorted = run_experts_grouped(x_sorted, recv_RL.sum(0).cumsum(0).to(torch.int32), experts)
        else:
            y_sorted = run_experts_loop(x_sorted, [sum(col) for col in zip(*received)], experts)
        y_recv = _PutRows.apply(y_sorted, by_expert, inv_by_expert)
        y_SH = _AllToAll.apply(y_recv, send_splits, recv_splits, ep_group)

    # back to (token, slot) order, dropped slots as zero rows; weight; add a token's slots in ascending expert id
    y_TKH = _PutRows.apply(y_SH, order_F, inv_F).view(T, K, x_TH.shape[-1])
    y_TKH = (y_TKH * weights_TK[:, :, None]).to(x_TH.dtype)
    out_TH = y_TKH[:, 0]
    for j in range(1, K):
        out_TH = out_TH + y_TKH[:, j]
    return out_TH
