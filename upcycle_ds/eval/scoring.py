"""Model-side scoring: sequence log-likelihoods through the training data path, and greedy generation.

`sequence_logprobs` writes the rows (training formats) to a temp jsonl with a row id, and builds the batches with
`upcycle_ds.data` exactly as `upcycle-ds train` does for its eval split (render -> tokenize with the trainer's
loss labels -> pack -> `batches`); the row id rides along as `DataConfig.label_field`, so every token's log-prob is
credited to its own row. Packed rows pass restarting `position_ids` and no attention mask, so each sample attends
only to itself (see `upcycle_ds.data`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..dtypes import torch_dtype
from ..errors import UserError
from ..data import IGNORE, DataConfig, batches, build_datasets

ROW_ID = "_upcycle_ds_eval_row"


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(path: str, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
    """(model in eval mode on the device, tokenizer) of an HF checkpoint dir, dense or MoE."""
    import transformers

    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"{path}: not an HF checkpoint dir (no config.json)")
    dev = pick_device(device)
    tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype, dev),
                                                              trust_remote_code=trust_remote_code)
    return model.to(dev).eval(), tok


@torch.no_grad()
def sequence_logprobs(model, tokenizer, rows: list[dict], *, max_length: int, batch_size: int,
                      allow_truncation: bool, what: str = "row") -> tuple[list[float], list[int], list[bool]]:
    """Per training-format row: (sum of log-probs of its loss tokens, number of loss tokens, truncated?).

    A row longer than max_length is truncated as in training; unless allow_truncation, that is a UserError (a
    truncated answer would be scored on part of its tokens)."""
    if not rows:
        return [], [], []
    with tempfile.TemporaryDirectory(prefix="upcycle_ds_eval_") as tmp:
        path = Path(tmp) / "rows.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i, r in enumerate(rows):
                f.write(json.dumps({**r, ROW_ID: i}, ensure_ascii=False) + "\n")
        cfg = DataConfig(data=str(path), max_length=max_length, eval_fraction=0.0, seed=0, label_field=ROW_ID)
        try:
            ds, _ = build_datasets(cfg, tokenizer)
        except ValueError as e:
            raise UserError(f"cannot render the eval rows with this tokenizer: {e}") from None
        except UserError as e:
            if "no training samples" in str(e):  # every row was dropped: nothing left inside max_length
                raise UserError(f"no {what} has a token to score within --max-length {max_length} (empty, or the "
                                f"prompt is longer): raise --max-length") from None
            raise UserError(str(e).replace(str(path), f"the {what}s")) from None
    device = next(model.parameters()).device
    n = len(rows)
    lp_sum = torch.zeros(n + 1, dtype=torch.float64, device=device)  # slot n collects padding (id -1)
    n_loss = torch.zeros(n + 1, dtype=torch.int64, device=device)
    n_tok = torch.zeros(n + 1, dtype=torch.int64, device=device)
    for b in batches(ds, micro_batch_size=batch_size, rank=0, world_size=1, seed=0, epoch=0, shuffle=False,
                     pad_remainder=True):
        ids, pos = b["input_ids"].to(device), b["position_ids"].to(device)
        labels, owner = b["labels"].to(device), b["sample_labels"].to(device)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        tgt = labels[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                              ignore_index=IGNORE, reduction="none")
        who = torch.where(tgt != IGNORE, owner[:, 1:], torch.full_like(tgt, n)).reshape(-1)
        lp_sum.index_add_(0, who, -nll.double())
        n_loss.index_add_(0, who, torch.ones_like(who))
        all_owner = torch.where(owner >= 0, owner, torch.full_like(owner, n)).reshape(-1)
        n_tok.index_add_(0, all_owner, torch.ones_like(all_owner))
    lp, nl, nt = lp_sum[:n].tolist(), n_loss[:n].tolist(), n_tok[:n].tolist()
    for i in range(n):
        if nl[i] == 0:
            raise UserError(f"{what} {i}: no token to score within --max-length {max_length} (empty, or the prompt "
                            f"is longer): raise --max-length")
    truncated = [t >= max_length for t in nt]
    if not allow_truncation and any(truncated):
        i = truncated.index(True)
        raise UserError(f"{what} {i}: prompt + answer reach --max-length {max_length} tokens and would be truncated; "
                        f"raise --max-length")
    return lp, nl, truncated


def prompt_ids(tokenizer, prompt_messages: list[dict] | None, prompt: str | None) -> list[int]:
    """The tokens a generation starts from, rendered as training renders the answer's prefix: the chat template
    with the generation prompt (also for a plain `prompt` when the tokenizer has a template), else the prompt text
    with the tokenizer's special tokens."""
    if prompt_messages is None and tokenizer.chat_template:
        prompt_messages = [{"role": "user", "content": prompt}]
    if prompt_messages is not None:
        if not tokenizer.chat_template:
            raise UserError("rows with 'messages' need a tokenizer with a chat template")
        text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped), batched by length with left padding."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for lo in range(0, len(order), batch_size):
        idx = order[lo: lo + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(gen[:, width:].cpu(), skip_special_tokens=True)
        for i, t in zip(idx, texts):
            out[i] = t
    return out
