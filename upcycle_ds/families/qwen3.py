"""Qwen3 (Qwen3ForCausalLM) -> Qwen3-MoE (Qwen3MoeForCausalLM) with norm_topk_prob=True."""

from .base import Attention, Family
from .qwen2 import DENSE_MLP, EXPERT, ROUTER, qwen_dense_fields, qwen_moe_fields

FAMILY = Family(
    name="qwen3",
    dense_model_type="qwen3",
    dense_architecture="Qwen3ForCausalLM",
    moe_model_type="qwen3_moe",
    moe_architecture="Qwen3MoeForCausalLM",
    dense_mlp=DENSE_MLP,
    moe_router=ROUTER,
    moe_expert=EXPERT,
    partial_layers=True,
    moe_config_fields=qwen_moe_fields,
    dense_config_fields=qwen_dense_fields,
    num_experts_key="num_experts",
    dense_attention=Attention(qkv_bias=("attention_bias", False), o_bias=("attention_bias", False), qk_norm=True,
                              default_head_dim=128),
    moe_attention=Attention(qkv_bias=("attention_bias", False), o_bias=("attention_bias", False), qk_norm=True),
)
