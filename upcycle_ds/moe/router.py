"""Route (of route -> dispatch -> compute -> combine): the top-k router, the routing semantics of every MoE model we
build and export. No communication, and no value read back to the host: losses and statistics stay on the device.

Semantics, identical to transformers' Mixtral / Qwen3-MoE / Qwen2-MoE (`norm_topk_prob=True`) routers:
    logits = x @ W^T (computed in fp32)  ->  p = softmax(logits) over all E experts  ->  top-k of p
    ->  renormalise the k selected weights to sum to 1 (also for k=1, so a copy-upcycled model equals the dense one).
No noise, ever, in eval. Dropless by default; with a capacity factor (training only) each expert keeps at most
ceil(cf * T * k / E) token-slots, first choices before second choices, in token order; dropped slots get weight 0.

Losses (recorded on the module after each forward, with gradients):
    aux  = E * sum_i f_i * P_i   (Switch / HF `load_balancing_loss_func`; f_i = fraction of tokens routed to i,
                                  summed over the k slots; P_i = mean router probability of i): this forward's
                                  tokens only. `balance.GlobalAuxLoss` replaces it by the global-batch loss
                                  (`--aux-loss-scope global`), from `mean_probs_E` and the counts in `stats`.
    z    = mean_t logsumexp(logits_t)^2   (ST-MoE router z-loss)
Statistics of each forward are left on `stats` (`RouterStats`, detached device tensors).
Shape suffixes: T tokens, E experts, K top-k slots, H hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    weights_TK: torch.Tensor
    """fp32 combine weights of the selected experts (0 for slots dropped by capacity)."""
    experts_TK: torch.Tensor
    """selected expert ids (int64)."""
    keep_TK: torch.Tensor | None
    """bool mask of slots kept under the capacity limit; None = dropless."""


@dataclass
class RouterStats:
    """Detached routing statistics of one forward, all on the input's device: reading them is the consumer's
    choice (the trainer sums them over micro-batches on the device and reads them once per logging step)."""

    tokens_per_expert: torch.Tensor
    """(E,) int64: token-slots routed to each expert, before capacity drops."""
    dropped: torch.Tensor
    """() int64: token-slots dropped by capacity."""
    slots: int
    """token-slots routed, T * K (a host int from shapes)."""
    aux_loss: torch.Tensor
    """() fp32, detached."""
    z_loss: torch.Tensor
    """() fp32, detached."""
    entropy: torch.Tensor
    """() fp32, detached: mean router entropy over tokens (nats)."""


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, normalize: bool = True,
                 capacity_factor: float | None = None, min_capacity: int = 4, device: torch.device | None = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device))
        nn.init.normal_(self.weight, std=0.02)
        self.aux_loss: torch.Tensor | None = None
        self.mean_probs_E: torch.Tensor | None = None
        """P_i of the last forward: (E,) fp32 mean router probability over its tokens, with gradients."""
        self.z_loss: torch.Tensor | None = None
        self.stats: RouterStats | None = None
        self.record_logits = False
        """When True, each forward leaves its fp32 logits_TE (with gradients) on `self.logits_TE` (UpIT router-init's
        BCE loss reads them); off by default so no graph outlives its step."""
        self.logits_TE: torch.Tensor | None = None

    def _set_ep_group(self, group) -> None:  # called by DeepSpeed's MOELayer; routing needs no group
        pass

    def forward(self, x_TH: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_TH.float(), self.weight.float())
        if self.record_logits:
            self.logits_TE = logits_TE
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, experts_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)

        T, E, K = x_TH.shape[0], self.num_experts, self.top_k
        counts_E = tokens_per_expert(experts_TK, E)
        keep_TK = None
        if self.training and self.capacity_factor is not None and T > 0:
            capacity = max(self.min_capacity, math.ceil(self.capacity_factor * T * K / E))
            # slot-major: all first choices before second choices, each in token order
            onehot_KTE = experts_TK.new_zeros(K, T, E).scatter_(-1, experts_TK.t().unsqueeze(-1), 1)
            position_KTE = onehot_KTE.reshape(K * T, E).cumsum(0).reshape(K, T, E) * onehot_KTE
            keep_TK = (position_KTE.sum(-1) <= capacity).t()
            weights_TK = weights_TK * keep_TK

        if T > 0:
            f_E = counts_E.float() / T
            self.mean_probs_E = probs_TE.mean(0)
            self.aux_loss = E * torch.sum(f_E * self.mean_probs_E)
            self.z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean()
            entropy = -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1).mean()
        else:
            self.aux_loss = self.z_loss = logits_TE.sum() * 0
            self.mean_probs_E = probs_TE.sum(0)  # zeros, still attached to the graph
            entropy = logits_TE.new_zeros(())
        dropped = counts_E.new_zeros(()) if keep_TK is None else (~keep_TK).sum()
        self.stats = RouterStats(tokens_per_expert=counts_E, dropped=dropped, slots=T * K,
                                 aux_loss=self.aux_loss.detach(), z_loss=self.z_loss.detach(),
                                 entropy=entropy.detach())
        return Routing(weights_TK=weights_TK, experts_TK=experts_TK, keep_TK=keep_TK)


def tokens_per_expert(experts_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(num_experts,) int64 count of each id in `experts_N` (any shape), on its device.

    A scatter-add into a tensor of known size: `torch.bincount` would read the maximum back to the host on CUDA to
    size its output."""
    ids = experts_N.reshape(-1)
    return ids.new_zeros(num_experts).scatter_add_(0, ids, torch.ones_like(ids))
