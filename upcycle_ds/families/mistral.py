"""Mistral (MistralForCausalLM) -> Mixtral (MixtralForCausalLM); every layer must be MoE."""

from .base import Family
from .llama import DENSE_MLP, MIXTRAL_EXPERT, MIXTRAL_ROUTER, mixtral_fields

FAMILY = Family(
    name="mistral",
    dense_model_type="mistral",
    dense_architecture="MistralForCausalLM",
    moe_model_type="mixtral",
    moe_architecture="MixtralForCausalLM",
    dense_mlp=DENSE_MLP,
    moe_router=MIXTRAL_ROUTER,
    moe_expert=MIXTRAL_EXPERT,
    moe_config_fields=mixtral_fields,
)
