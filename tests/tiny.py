"""Tiny random HF models built from configs (no hub), shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
}
MOE_CONFIGS = {
    "mixtral": ("MixtralConfig", {}),
    "qwen2_moe": ("Qwen2MoeConfig", {"shared_expert_intermediate_size": 32, "norm_topk_prob": True}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "norm_topk_prob": True}),
}
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6)


def dense_config(family: str, **overrides):
    cls, extra = FAMILY_CONFIGS[family]
    return getattr(transformers, cls)(**{**BASE, **extra, **overrides})


def make_dense(family: str, path: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """A random dense model saved as safetensors; weights scaled up so MLPs matter for the logits."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(dense_config(family, **overrides)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    return Path(path)


def moe_config(model_type: str, num_experts: int = 4, top_k: int = 2, **overrides):
    cls, extra = MOE_CONFIGS[model_type]
    kw = {**BASE, **extra, "num_experts_per_tok": top_k, **overrides}
    kw["num_local_experts" if model_type == "mixtral" else "num_experts"] = num_experts
    if model_type != "mixtral":
        kw.setdefault("moe_intermediate_size", BASE["intermediate_size"])
    return getattr(transformers, cls)(**kw)


def make_moe(model_type: str, path: Path, seed: int = 0, num_experts: int = 4, top_k: int = 2, **overrides) -> Path:
    """A random HF MoE model (non-identical experts and router) saved with transformers' own save_pretrained."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(moe_config(model_type, num_experts, top_k, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.08 if "gate.weight" not in name else 0.5)
    model.save_pretrained(path)
    return Path(path)


def logits(path_or_model, input_ids: torch.Tensor) -> torch.Tensor:
    model = path_or_model
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def input_ids(seed: int = 0, batch: int = 2, seq: int = 16, vocab: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


# ---- tiny tokenizer + synthetic data: shipped in the package (`upcycle-ds demo` uses them too) ------------------

from upcycle_ds.demo import CHAT_TEMPLATE, make_jsonl, make_tokenizer  # noqa: E402,F401
