"""Global-batch load balancing (`--aux-loss-scope global`): the Switch aux loss with expert frequencies counted over
all ranks' micro-batches of the optimizer step instead of one micro-batch of one rank.

Why: the per-micro-batch loss pushes every micro-batch (a few sequences, often of one domain) towards uniform
expert use, which works against experts specialising by domain; balancing over the global batch only asks for
uniform use overall (Qiu et al. 2025, "Demons in the Detail: On Implementing Load Balancing Loss for Training
Specialized Mixture-of-Expert Models", arXiv 2501.11873; Megatron-Core's `global_aux_loss`).

Definition, for one MoE layer with E experts and top-k, a step of M micro-steps on N ranks (the data-parallel group
of the router weights: every rank of the job). After micro-step m's forward on rank j:

    C_i(m) = sum over ranks j' and micro-steps m' <= m of the token-slots routed to expert i   (one all_reduce)
    T(m)   = sum_i C_i(m) / k                 tokens routed so far in this step, all ranks
    f_i(m) = C_i(m) / T(m)                    (sums to k, as the per-micro-batch f_i)
    aux(j, m) = E * sum_i f_i(m) * P_i(j, m)  P_i(j, m): mean router probability of i over rank j's micro-batch m

DeepSpeed averages the gradients of the M x N losses (1/M for accumulation, 1/N over ranks), so with M = 1 the
optimised loss is exactly the Switch loss of the global batch, E * sum_i f_i * P_i with both f and P over all N
ranks' tokens, value and gradients (f is a count: no gradient, as in the micro scope). With M > 1, micro-step m
sees the frequencies of micro-steps 1..m of every rank (the last one the whole global batch): micro-step m's
backward runs before micro-step m+1 exists, so a loss that waited for the whole step would have to keep every
micro-step's graph alive. This is Megatron-Core's running mean over accumulation steps.

Cost: one all_reduce of an (MoE layers x E) int64 tensor per micro-step, on the device (no host sync); the routers
themselves stay free of communication (`router.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .router import TopKRouter

AUX_LOSS_SCOPES = ("micro", "global")


class GlobalAuxLoss:
    """Called after every training-mode forward of the model (a forward hook, `install`): replaces each router's
    `aux_loss` (and `stats.aux_loss`) by the global-batch loss of the module docstring. Every `grad_accum`-th
    training forward starts a new step; eval-mode forwards are left alone (their aux is the per-batch one).

    `group`: the process group the counts are summed over; None = this process is the whole job (no collective).
    """

    def __init__(self, routers: Sequence[TopKRouter], *, grad_accum: int, group=None):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.routers, self.grad_accum, self.group = list(routers), grad_accum, group
        self.micro_steps = 0
        """training forwards seen; micro-step index in the step = micro_steps % grad_accum."""
        self.counts_LE: torch.Tensor | None = None
        """C(m) of the current step, summed over ranks: (MoE layers, E) int64 on the device."""
        self.handle = None

    def __call__(self, module: nn.Module, args, output) -> None:
        if module.training:
            self.update()

    def update(self) -> None:
        """After one micro-step's forward: add its counts (all ranks), set every router's global aux loss."""
        counts_LE = torch.stack([r.stats.tokens_per_expert for r in self.routers])
        if self.group is not None:
            dist.all_reduce(counts_LE, group=self.group)
        if self.micro_steps % self.grad_accum == 0:
            self.counts_LE = counts_LE
        else:
            self.counts_LE = self.counts_LE + counts_LE
        self.micro_steps += 1
        for r, counts_E in zip(self.routers, self.counts_LE):
            tokens = (counts_E.sum() // r.top_k).clamp_min(1)
            aux = r.num_experts * torch.sum(counts_E.float() / tokens * r.mean_probs_E)
            r.aux_loss = aux
            r.stats = dataclasses.replace(r.stats, aux_loss=aux.detach())

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def install(model: nn.Module, routers: Sequence[TopKRouter], scope: str, *, grad_accum: int
            ) -> GlobalAuxLoss | None:
    """Apply `--aux-loss-scope` to a model about to be trained: for "global", a `GlobalAuxLoss` hooked after the
    model's forward, summing counts over every rank of the job (the default process group) when there is more than
    one; for "micro" (or a model without routers) nothing: each router's own per-micro-batch loss stands."""
    if scope not in AUX_LOSS_SCOPES:
        raise ValueError(f"aux loss scope must be one of {AUX_LOSS_SCOPES}, got {scope!r}")
    if scope == "micro" or not routers:
        return None
    group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    balance = GlobalAuxLoss(routers, grad_accum=grad_accum, group=group)
    balance.handle = model.register_forward_hook(balance)
    return balance
