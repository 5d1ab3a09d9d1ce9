"""The MoE layer that replaces an HF MLP: DeepSpeed-MoE experts and groups, our router, our dispatch.

`UpcycledMoE` *is* a `deepspeed.moe.layer.MoE`, so DeepSpeed treats it as native MoE: the engine finds it, creates the
expert-parallel and expert-data-parallel groups, keeps expert parameters out of the data-parallel all-reduce
(`param.allreduce = False`, tagged with the group name by `deepspeed.moe.experts.Experts`), and saves one
`layer_{L}_expert_{E}_mp_rank_00_model_states.pt` file per global expert. We replace DeepSpeed's gate (whose
semantics differ from the HF export: un-normalised top-1, Gumbel noise on the 2nd choice even in eval) with
`TopKRouter`, its padded GShard dispatch with the index-based `dispatch_compute_combine`, and its loop over experts
with a grouped GEMM (`experts.py`; the experts' parameters and files stay DeepSpeed's, one module per expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from .dispatch import dispatch_compute_combine
from .experts import EXPERT_IMPLS, SwiGLUExpert, compute_dtype, resolve_expert_impl
from .router import TopKRouter

__all__ = ["UpcycledMoE", "SwiGLUExpert", "moe_layers"]


class UpcycledMoE(MoE):
    """`expert_impl`: "grouped" (default; one grouped GEMM over the local experts, see `experts.py`) or "loop" (one
    call per expert). "grouped" runs the loop instead where this torch has no grouped GEMM for the device and dtype
    (`experts.grouped_mm_available`); both compute the same function and leave the same parameters and gradients.
    """

    def __init__(self, *, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, ep_size: int = 1,
                 normalize_topk: bool = True, capacity_factor: float | None = None, hidden_act: str = "silu",
                 shared_intermediate_size: int | None = None, expert_impl: str = "grouped"):
        if expert_impl not in EXPERT_IMPLS:
            raise ValueError(f"expert_impl must be one of {EXPERT_IMPLS}, got {expert_impl!r}")
        expert = SwiGLUExpert(hidden_size, intermediate_size, hidden_act)
        # k=1 / drop_tokens=False only configure DeepSpeed's own gate, which we replace right away.
        super().__init__(hidden_size, expert, num_experts=num_experts, ep_size=ep_size, k=1, drop_tokens=False,
                         use_rts=False, top2_2nd_expert_sampling=False)
        self.top_k, self.expert_impl = top_k, expert_impl
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.deepspeed_moe.gate = TopKRouter(hidden_size, num_experts, top_k, normalize=normalize_topk,
                                             capacity_factor=capacity_factor)
        if shared_intermediate_size is not None:  # Qwen2-MoE: out += sigmoid(x W_g^T) * shared_mlp(x)
            self.shared_mlp = SwiGLUExpert(hidden_size, shared_intermediate_size, hidden_act)
            self.shared_mlp_gate = nn.Linear(hidden_size, 1, bias=False)
        else:
            self.shared_mlp = self.shared_mlp_gate = None

    @property
    def router(self) -> TopKRouter:
        return self.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def ep_rank(self) -> int:
        if self.ep_size == 1:
            return 0
        return groups._get_expert_parallel_rank(self.expert_group_name)

    def global_expert_ids(self) -> list[int]:
        start = self.ep_rank * self.num_local_experts
        return list(range(start, start + self.num_local_experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """route -> dispatch -> compute -> combine (+ the shared expert where the family has one).

        compute runs `self.expert_impl` where it can (`resolve_expert_impl`). Host reads: none at ep_size 1 with
        grouped experts, one (the all_to_all split sizes, or the loop's chunk sizes) otherwise; none in backward.
        Returns a tensor shaped like `hidden_states`, as the HF MLP it replaces. The router's aux loss, z-loss and
        statistics of this call (`RouterStats`, device tensors) are left on `self.router` for the trainer.
        """
        shape = hidden_states.shape
        x_TH = hidden_states.reshape(-1, shape[-1])
        routing = self.router(x_TH)
        if self.ep_size > 1 and self.deepspeed_moe.ep_group is None:
            raise RuntimeError("expert-parallel group not set: call set_deepspeed_parallelism() after "
                               "torch.distributed is initialised (deepspeed.initialize does it)")
        impl = resolve_expert_impl(self.expert_impl, x_TH.device, compute_dtype(x_TH, self.local_experts),
                                   self.hidden_size, self.intermediate_size)
        out_TH = dispatch_compute_combine(x_TH, routing.weights_TK, routing.experts_TK, routing.keep_TK,
                                          self.local_experts, num_experts=self.num_experts,
                                          ep_group=self.deepspeed_moe.ep_group, ep_size=self.ep_size,
                                          expert_impl=impl)
        if self.shared_mlp is not None:
            out_TH = out_TH + F.sigmoid(self.shared_mlp_gate(x_TH)) * self.shared_mlp(x_TH)
        return out_TH.reshape(shape)


def moe_layers(model: nn.Module) -> list[tuple[int, UpcycledMoE]]:
    """(decoder layer index, layer) for every UpcycledMoE in an HF causal LM, in layer order."""
    out = []
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, UpcycledMoE):
            out.append((i, layer.mlp))
    return out
