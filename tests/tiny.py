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


# ---- tiny tokenizer + synthetic data (for data/training tests) ----------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def make_tokenizer(path: Path, chat_template: bool = True) -> Path:
    """A character-level `PreTrainedTokenizerFast` (printable ASCII + \\n \\t + <pad> <s> </s> <unk>, 101 ids < 128),
    adding <s> in front when add_special_tokens=True (like Llama), with a User:/Assistant: chat template."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= 128
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE if chat_template else None, model_max_length=4096)
    fast.save_pretrained(path)
    return Path(path)


def make_jsonl(path: Path, n: int, kind: str = "prompt_response", seed: int = 0) -> Path:
    """`n` synthetic rows a tiny model can learn: "12+7=" -> "19" (prompt_response) or the same as a chat
    (messages; every third row has a system turn and a second user/assistant turn, "copy: abc" -> "abc")."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            prompt, response = f"{a}+{b}=", str(a + b)
            if kind == "prompt_response":
                row = {"prompt": prompt, "response": response}
            elif kind == "messages":
                msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                if i % 3 == 0:
                    word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6)))
                    msgs = ([{"role": "system", "content": "Be brief."}] + msgs
                            + [{"role": "user", "content": f"copy: {word}"}, {"role": "assistant", "content": word}])
                row = {"messages": msgs}
            else:
                raise ValueError(f"unknown kind {kind!r}")
            f.write(json.dumps(row) + "\n")
    return Path(path)
