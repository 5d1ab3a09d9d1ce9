"""A small built-in example: a tiny random dense model with a character-level tokenizer and synthetic data
(`upcycle-ds demo --out DIR`), so every command can be tried in seconds with no hub access. Tests use it too."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6)
CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}

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


HELDOUT_ROWS = 100


def write_sum_rows(path: Path, pairs: list[tuple[int, int]]) -> Path:
    """One prompt/response row "a+b=" -> "a+b" per pair."""
    import json

    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n" for a, b in pairs)
    return Path(path)


def make_demo(out: Path, family: str = "llama", rows: int = 400, seed: int = 0, overwrite: bool = False
              ) -> tuple[Path, Path, Path]:
    """OUT/dense (tiny random dense model + tokenizer), OUT/train.jsonl (`rows` prompt/response rows "a+b=" ->
    "a+b", a and b in 0..99) and OUT/heldout.jsonl (HELDOUT_ROWS rows of sums that never occur in train.jsonl),
    written into a temp dir renamed to OUT at the end (OUT must not exist unless `overwrite`)."""
    import random
    from .io.hf import atomic_output_dir

    out = Path(out)
    torch.manual_seed(seed)
    extra = {"head_dim": 16} if family == "qwen3" else {}
    config = getattr(transformers, CONFIGS[family])(**TINY, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with atomic_output_dir(out, overwrite) as tmp:
        bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp / "dense")
        finally:
            if bars_were_on:
                transformers.utils.logging.enable_progress_bar()
        make_tokenizer(tmp / "dense")
        rng = random.Random(seed)
        pairs = [divmod(i, 100) for i in rng.sample(range(100 * 100), 100 * 100)]
        heldout, pool = pairs[:HELDOUT_ROWS], pairs[HELDOUT_ROWS:]
        write_sum_rows(tmp / "train.jsonl", [rng.choice(pool) for _ in range(rows)])
        write_sum_rows(tmp / "heldout.jsonl", heldout)
    return out / "dense", out / "train.jsonl", out / "heldout.jsonl"
