"""Index-based token dispatch over DeepSpeed's expert-parallel group (dropless, no padding).

Each token-slot goes to exactly one expert. Slots are sorted by expert id; with ep_size > 1 the sorted tokens are
exchanged with a variable-split all_to_all over the expert-parallel group (the same group DeepSpeed-MoE creates),
each rank runs its local experts on exactly the tokens they received, and a second all_to_all brings the outputs
back. Unlike DeepSpeed's GShard dispatch this never pads experts to a common capacity (PLATFORM.md: 1.24x vs 1.47x
of the FLOP-ideal step time). Both all_to_alls are autograd functions, so gradients flow back the same way.

Every local expert runs on every forward, also on zero tokens, so each expert parameter always gets a gradient
(ZeRO's gradient hooks expect that).

Performance (bench/step_time.py, docs/benchmarks.md): every row movement is a gather (`index_select`), forward and
backward. Slots reach expert order through one permutation of the T*K slots and come back through its inverse, so
the backward of each gather is a gather too; scatters with accumulation (`index_add_`, and `index_put_` with
accumulate, which autograd uses for the backward of `x[idx]`) are avoided. A token's K slots are then summed with
K-1 plain additions in ascending expert id, the order transformers adds them in.
Shape suffixes: T tokens, K slots per token, F token-major slots (t * K + j), S sorted (kept) slots, H hidden,
E experts, L local experts, R ep ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


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


def run_local_experts(x_SH: torch.Tensor, counts_L: list[int], experts: nn.ModuleList) -> torch.Tensor:
    """x_SH is sorted by local expert with counts_L rows each; returns the experts' outputs in the same order."""
    outs = [expert(chunk) for chunk, expert in zip(torch.split(x_SH, counts_L), experts)]
    return torch.cat(outs) if outs else x_SH


def dispatch_compute_combine(x_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor,
                             keep_TK: torch.Tensor | None, experts: nn.ModuleList, *, num_experts: int,
                             ep_group=None, ep_size: int = 1) -> torch.Tensor:
    T, K = experts_TK.shape
    L = num_experts // ep_size
    # a token's slots in ascending expert id (the combine order); slot f = t * K + j
    experts_TK, by_id = torch.sort(experts_TK, dim=1)
    weights_TK = weights_TK.gather(1, by_id)
    expert_F = experts_TK.reshape(-1)
    if keep_TK is not None:  # dropped slots sort last (pseudo-expert num_experts) and are not computed
        expert_F = torch.where(keep_TK.gather(1, by_id).reshape(-1), expert_F, num_experts)
    order_F = torch.argsort(expert_F, stable=True)  # within an expert: token order
    inv_F = _inverse(order_F)
    counts = torch.bincount(expert_F, minlength=num_experts + 1)[:num_experts]
    counts_E = counts.tolist()
    n = sum(counts_E)
    x_SH = _TakeRows.apply(x_TH, order_F, inv_F, n, K)

    if ep_size == 1:
        y_SH = run_local_experts(x_SH, counts_E, experts)
    else:
        send_RL = counts.view(ep_size, L)
        recv_RL = torch.empty_like(send_RL)
        dist.all_to_all_single(recv_RL, send_RL, group=ep_group)
        send_splits, recv_splits = send_RL.sum(1).tolist(), recv_RL.sum(1).tolist()
        x_recv = _AllToAll.apply(x_SH, recv_splits, send_splits, ep_group)
        # received rows are grouped by (source rank, local expert); regroup by local expert
        local_id = torch.arange(L, device=x_TH.device).repeat(ep_size).repeat_interleave(recv_RL.reshape(-1))
        by_expert = torch.argsort(local_id, stable=True)
        inv_by_expert = _inverse(by_expert)
        x_sorted = _TakeRows.apply(x_recv, by_expert, inv_by_expert, by_expert.numel(), 1)
        y_sorted = run_local_experts(x_sorted, recv_RL.sum(0).tolist(), experts)
        y_recv = _PutRows.apply(y_sorted, by_expert, inv_by_expert)
        y_SH = _AllToAll.apply(y_recv, send_splits, recv_splits, ep_group)

    # back to (token, slot) order, dropped slots as zero rows; weight; add a token's slots in ascending expert id
    y_TKH = _PutRows.apply(y_SH, order_F, inv_F).view(T, K, x_TH.shape[-1])
    y_TKH = (y_TKH * weights_TK[:, :, None]).to(x_TH.dtype)
    out_TH = y_TKH[:, 0]
    for j in range(1, K):
        out_TH = out_TH + y_TKH[:, j]
    return out_TH
