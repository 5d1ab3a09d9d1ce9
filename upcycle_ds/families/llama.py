"""Llama (LlamaForCausalLM) -> Mixtral (MixtralForCausalLM); every layer must be MoE."""

from .base import Attention, Family, MoESpec

DENSE_MLP = {p: "model.layers.{layer}.mlp." + p + "_proj.weight" for p in ("gate", "up", "down")}

# Mixtral hub layout: w1 = gate, w3 = up, w2 = down
MIXTRAL_ROUTER = "model.layers.{layer}.block_sparse_moe.gate.weight"
MIXTRAL_EXPERT = {
    "gate": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
    "up": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
    "down": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
}


def mixtral_fields(dense: dict, spec: MoESpec) -> dict:
    # Mixtral's `intermediate_size` is the size of one expert (it has no dense layers to keep the dense size for)
    inter = dense["intermediate_size"] if spec.expert_intermediate is None else spec.expert_intermediate
    return {"router_jitter_noise": 0.0, "router_aux_loss_coef": 0.01, "intermediate_size": inter}


FAMILY = Family(
    name="llama",
    dense_model_type="llama",
    dense_architecture="LlamaForCausalLM",
    moe_model_type="mixtral",
    moe_architecture="MixtralForCausalLM",
    dense_mlp=DENSE_MLP,
    moe_router=MIXTRAL_ROUTER,
    moe_expert=MIXTRAL_EXPERT,
    unsupported={"attention_bias": False},
    moe_config_fields=mixtral_fields,
    dense_attention=Attention(qkv_bias=("attention_bias", False), o_bias=("attention_bias", False)),
)
