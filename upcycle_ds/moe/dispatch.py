"""Index-based token dispatch over DeepSpeed's expert-parallel group (dropless, no padding).

Each token-slot goes to exactly one expert. Slots are sorted by expert id; with ep_size > 1 the sorted tokens are
exchanged with a variable-split all_to_all over the expert-parallel group (the same group DeepSpeed-MoE creates),
each rank runs its local experts on exactly the tokens they received, and a second all_to_all brings the outputs
back. Unlike DeepSpeed's GShard dispatch this never pads experts to a common capacity (PLATFORM.md: 1.24x vs 1.47x
of the FLOP-ideal step time). Both all_to_alls are autograd functions, so gradients flow back the same way.

Every local expert runs on every forward, also on zero tokens, so each expert parameter always gets a gradient
(ZeRO's gradient hooks expect that).
Shape suffixes: T tokens, K slots per token, S sorted slots, H hidden, E experts, L local experts, R ep ranks.
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


def run_local_experts(x_SH: torch.Tensor, counts_L: list[int], experts: nn.ModuleList) -> torch.Tensor:
    """x_SH is sorted by local expert with counts_L rows each; returns the experts' outputs in the same order."""
    outs = [expert(chunk) for chunk, expert in zip(torch.split(x_SH, counts_L), experts)]
    return torch.cat(outs) if outs else x_SH


def dispatch_compute_combine(x_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor,
                             keep_TK: torch.Tensor | None, experts: nn.ModuleList, *, num_experts: int,
                             ep_group=None, ep_size: int = 1) -> torch.Tensor:
    T, K = experts_TK.shape
    L = num_experts // ep_size
    token_S = torch.arange(T, device=x_TH.device).repeat_interleave(K)
    expert_S = experts_TK.reshape(-1)
    weight_S = weights_TK.reshape(-1)
    if keep_TK is not None:
        kept = keep_TK.reshape(-1)
        token_S, expert_S, weight_S = token_S[kept], expert_S[kept], weight_S[kept]
    order = torch.argsort(expert_S, stable=True)
    token_S, expert_S, weight_S = token_S[order], expert_S[order], weight_S[order]
    counts_E = torch.bincount(expert_S, minlength=num_experts)
    x_SH = x_TH[token_S]

    if ep_size == 1:
        y_SH = run_local_experts(x_SH, counts_E.tolist(), experts)
    else:
        send_RL = counts_E.view(ep_size, L)
        recv_RL = torch.empty_like(send_RL)
        dist.all_to_all_single(recv_RL, send_RL, group=ep_group)
        send_splits, recv_splits = send_RL.sum(1).tolist(), recv_RL.sum(1).tolist()
        x_recv = _AllToAll.apply(x_SH, recv_splits, send_splits, ep_group)
        # received rows are grouped by (source rank, local expert); regroup by local expert
        local_id = torch.arange(L, device=x_TH.device).repeat(ep_size).repeat_interleave(recv_RL.reshape(-1))
        by_expert = torch.argsort(local_id, stable=True)
        y_sorted = run_local_experts(x_recv[by_expert], recv_RL.sum(0).tolist(), experts)
        y_recv = torch.empty_like(y_sorted).index_copy(0, by_expert, y_sorted)
        y_SH = _AllToAll.apply(y_recv, send_splits, recv_splits, ep_group)

    # combine in expert order (as transformers does: per token, experts added in ascending id)
    y_SH = (y_SH * weight_S[:, None]).to(x_TH.dtype)
    return torch.zeros_like(x_TH).index_add_(0, token_S, y_SH)
