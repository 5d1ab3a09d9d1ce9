"""Top-k router: the routing semantics of every MoE model we build and export (no communication here).

Semantics, identical to transformers' Mixtral / Qwen3-MoE / Qwen2-MoE (`norm_topk_prob=True`) routers:
    logits = x @ W^T (computed in fp32)  ->  p = softmax(logits) over all E experts  ->  top-k of p
    ->  renormalise the k selected weights to sum to 1 (also for k=1, so a copy-upcycled model equals the dense one).
No noise, ever, in eval. Dropless by default; with a capacity factor (training only) each expert keeps at most
ceil(cf * T * k / E) token-slots, first choices before second choices, in token order; dropped slots get weight 0.

Losses (recorded on the module after each forward, with gradients):
    aux  = E * sum_i f_i * P_i   (Switch / HF `load_balancing_loss_func`; f_i = fraction of tokens routed to i,
                                  summed over the k slots; P_i = mean router probability of i)
    z    = mean_t logsumexp(logits_t)^2   (ST-MoE router z-loss)
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
    """Detached per-forward routing statistics (summed over micro-batches by the trainer)."""

    tokens_per_expert: torch.Tensor
    """(E,) int64 token-slots routed to each expert, before capacity drops (on the input's device)."""
    dropped: torch.Tensor
    """() int64 token-slots dropped by capacity."""
    slots: int
    """token-slots routed (T * k; a host int from shapes)."""
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    entropy: torch.Tensor
    """() fp32 mean router entropy over tokens (nats); the three detached, on the input's device."""


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, normalize: bool = True,
                 capacity_factor: float | None = None, min_capacity: int = 4):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.aux_loss: torch.Tensor | None = None
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
        counts_E = torch.bincount(experts_TK.reshape(-1), minlength=E)
        keep_TK = None
        if self.training and self.capacity_factor is not None and T > 0:
            capacity = max(self.min_capacity, math.ceil(self.capacity_factor * T * K / E))
            onehot_KTE = F.one_hot(experts_TK.t(), E)  # slot-major: all first choices before second choices
            position_KTE = onehot_KTE.reshape(K * T, E).cumsum(0).reshape(K, T, E) * onehot_KTE
            keep_TK = (position_KTE.sum(-1) <= capacity).t()
            weights_TK = weights_TK * keep_TK

        if T > 0:
            f_E = counts_E.float() / T
            self.aux_loss = E * torch.sum(f_E * probs_TE.mean(0))
            self.z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean()
            entropy = -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1).mean()
        else:
            self.aux_loss = self.z_loss = logits_TE.sum() * 0
            entropy = logits_TE.new_zeros(())
        dropped = counts_E.new_zeros(()) if keep_TK is None else (~keep_TK).sum()
        self.stats = RouterStats(tokens_per_expert=counts_E.detach(), dropped=dropped, slots=T * K,
                                 aux_loss=self.aux_loss.detach().float(), z_loss=self.z_loss.detach().float(),
                                 entropy=entropy.detach().float())
        return Routing(weights_TK=weights_TK, experts_TK=experts_TK, keep_TK=keep_TK)
