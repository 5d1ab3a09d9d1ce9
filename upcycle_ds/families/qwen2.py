"""Qwen2 (Qwen2ForCausalLM) -> Qwen2-MoE (Qwen2MoeForCausalLM) with norm_topk_prob=True.

Qwen2-MoE always has a shared expert; copy upcycling writes it with intermediate size 0 (its output is exactly 0),
which keeps the upcycled model equal to the dense one; `--shared-fraction` carves dense neurons into it instead
(docs/granular.md). Checkpoints with a real shared expert (e.g. Qwen1.5-MoE) load and train with it.
"""

from .base import Attention, Family, MoESpec

DENSE_MLP = {p: "model.layers.{layer}.mlp." + p + "_proj.weight" for p in ("gate", "up", "down")}
ROUTER = "model.layers.{layer}.mlp.gate.weight"
EXPERT = {p: "model.layers.{layer}.mlp.experts.{expert}." + p + "_proj.weight" for p in ("gate", "up", "down")}
SHARED = {
    **{f"shared_mlp.{p}_proj.weight": "model.layers.{layer}.mlp.shared_expert." + p + "_proj.weight"
       for p in ("gate", "up", "down")},
    "shared_mlp_gate.weight": "model.layers.{layer}.mlp.shared_expert_gate.weight",
}


def qwen_moe_fields(dense: dict, spec: MoESpec) -> dict:
    n = dense["num_hidden_layers"]
    return {
        "num_experts": spec.num_experts,
        "moe_intermediate_size": (dense["intermediate_size"] if spec.expert_intermediate is None
                                  else spec.expert_intermediate),
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(n) if i not in set(spec.moe_layers)],
        "router_aux_loss_coef": 0.01,
    }


def qwen2_moe_fields(dense: dict, spec: MoESpec) -> dict:
    return {**qwen_moe_fields(dense, spec), "shared_expert_intermediate_size": spec.shared_intermediate,
            "qkv_bias": True}


def qwen_dense_fields(moe: dict) -> dict:
    return {"intermediate_size": moe.get("moe_intermediate_size", moe["intermediate_size"])}


FAMILY = Family(
    name="qwen2",
    dense_model_type="qwen2",
    dense_architecture="Qwen2ForCausalLM",
    moe_model_type="qwen2_moe",
    moe_architecture="Qwen2MoeForCausalLM",
    dense_mlp=DENSE_MLP,
    moe_router=ROUTER,
    moe_expert=EXPERT,
    moe_shared=SHARED,
    partial_layers=True,
    moe_config_fields=qwen2_moe_fields,
    dense_config_fields=qwen_dense_fields,
    num_experts_key="num_experts",
    dense_attention=Attention(qkv_bias=True),
    moe_attention=Attention(qkv_bias=("qkv_bias", True)),
)
