"""UpIT stage 3a (UPIT.md §2.3): router seed data — a random fraction of the training set, each sample labelled with
the expert whose dense model gives it the lowest perplexity.

Expert models: expert i < len(--experts) is the dense checkpoint that produced it. With --moe (an assembled MoE with
more experts than checkpoints), expert i >= len(--experts) is the dense model of the *last* checkpoint with the MLP of
every MoE layer replaced by expert i's (built in memory from the MoE files through the family's weight names).

Rendering (kept local on purpose; the training data module may render differently — see `render`): a row is one of
  {"prompt", "response"} / {"prompt", "completion"} / {"instruction", "input"?, "output"} (Alpaca) /
  {"messages": [{role, content}, ...]} (last message = the assistant's answer) / {"input": [messages], "ideal"}
  (OpenAI evals) / {"text"}.
Prompt and response are tokenized separately and concatenated (prompt with the tokenizer's special tokens, response
without, then EOS); the perplexity is over the response tokens only ("text": over all tokens after the first).
Messages use the tokenizer's chat template for the prompt when it has one, else "role: content" lines.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import UserError
from ..families import family_for
from ..io.hf import HFCheckpoint, read_config
from .expand import PROJS

IGNORE = -100


# ---------------------------------------------------------------------------------------------------- data
def load_rows(path: str | Path) -> list[dict]:
    """The rows of a jsonl file (blank lines skipped; row index = position among the non-blank lines)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--data {path}: no such file")
    rows = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"--data {path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"--data {path}:{lineno}: expected a JSON object per line")
            rows.append(row)
    if not rows:
        raise UserError(f"--data {path}: no rows")
    return rows


def pick_indices(n_rows: int, fraction: float, min_samples: int, seed: int) -> list[int]:
    """A random subset of round(fraction·n) rows, at least min_samples, at most all; sorted ascending."""
    n = min(n_rows, max(min_samples, int(round(fraction * n_rows)), 1))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_rows, generator=g)[:n].tolist())


def _content(x) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, list):  # content parts [{"type": "text", "text": ...}]
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in x)
    return "" if x is None else str(x)


def _messages_prompt(messages: list[dict], tokenizer) -> str | None:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m.get('role', 'user')}: {_content(m.get('content'))}\n" for m in messages) + "assistant: "


def render(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row; labels are IGNORE on prompt tokens."""
    def enc(text: str, special: bool) -> list[int]:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt_ids = None
    if "prompt" in row and ("response" in row or "completion" in row):
        prompt_ids = enc(_content(row["prompt"]), True)
        response = _content(row.get("response", row.get("completion")))
    elif "instruction" in row and "output" in row:
        prompt = _content(row["instruction"])
        if _content(row.get("input")).strip():
            prompt += "\n\n" + _content(row["input"])
        prompt_ids, response = enc(prompt, True), _content(row["output"])
    elif isinstance(row.get("messages"), list) and row["messages"]:
        msgs = row["messages"]
        if not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
            raise UserError("a 'messages' row must end with the assistant's message (the scored response)")
        prompt_ids = enc(_messages_prompt(msgs[:-1], tokenizer), not getattr(tokenizer, "chat_template", None))
        response = _content(msgs[-1].get("content"))
    elif isinstance(row.get("input"), list) and "ideal" in row:
        ideal = row["ideal"]
        response = _content(ideal[0] if isinstance(ideal, list) and ideal else ideal)
        prompt_ids = enc(_messages_prompt(row["input"], tokenizer), not getattr(tokenizer, "chat_template", None))
    elif "text" in row:
        ids = enc(_content(row["text"]), True) + eos
        return ids, list(ids)
    else:
        raise UserError(f"row has none of the fields prompt+response, prompt+completion, instruction+output, "
                        f"messages, input+ideal, text (has {sorted(row)[:6]})")
    response_ids = enc(response, False) + eos
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def truncate(ids: list[int], labels: list[int], max_length: int | None) -> tuple[list[int], list[int]]:
    """Keep the first max_length tokens; if that leaves no scored token, keep the last max_length instead."""
    if max_length is None or len(ids) <= max_length:
        return ids, labels
    head = (ids[:max_length], labels[:max_length])
    if any(l != IGNORE for l in head[1][1:]):
        return head
    return ids[-max_length:], labels[-max_length:]


# ---------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def mean_nll(model, encoded: list[tuple[list[int], list[int]]], *, batch_size: int = 8, device="cpu",
             pad_id: int = 0, desc: str = "score") -> torch.Tensor:
    """(N,) float64: per sample, mean next-token NLL over its labelled tokens (the first token is never scored)."""
    model.eval()
    out = torch.empty(len(encoded), dtype=torch.float64)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths -> little padding
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", file=sys.stderr, disable=None):
        idx = order[s:s + batch_size]
        T = max(len(encoded[i][0]) for i in idx)
        ids_BT = torch.full((len(idx), T), pad_id, dtype=torch.long)
        lab_BT = torch.full((len(idx), T), IGNORE, dtype=torch.long)
        mask_BT = torch.zeros((len(idx), T), dtype=torch.long)
        for b, i in enumerate(idx):
            ids, labels = encoded[i]
            ids_BT[b, :len(ids)] = torch.tensor(ids)
            lab_BT[b, :len(ids)] = torch.tensor(labels)
            mask_BT[b, :len(ids)] = 1
        logits_BTV = model(input_ids=ids_BT.to(device), attention_mask=mask_BT.to(device)).logits.float()
        tgt_BT = lab_BT[:, 1:].to(device)
        nll_BT = torch.nn.functional.cross_entropy(logits_BTV[:, :-1].transpose(1, 2), tgt_BT,
                                                   ignore_index=IGNORE, reduction="none")
        n_B = (tgt_BT != IGNORE).sum(1)
        out[idx] = (nll_BT.double().sum(1) / n_B).cpu()
    return out


# ---------------------------------------------------------------------------------------------------- experts
def _load_dense(path: str | Path, dtype: torch.dtype, device):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)


def moe_expert_mlp(moe: HFCheckpoint, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One expert's {gate, up, down} from an HF MoE checkpoint (hub per-expert layout, or transformers' fused one)."""
    fam, _ = family_for(moe.config)
    keys = {p: fam.expert_key(layer, expert, p) for p in PROJS}
    if all(k in moe for k in keys.values()):
        return {p: moe.get(k) for p, k in keys.items()}
    gu, dn = (fam.moe_fused[x].format(layer=layer) for x in ("gate_up", "down"))
    if gu in moe and dn in moe:
        gate_up = moe.get(gu)[expert]
        inter = gate_up.shape[0] // 2
        return {"gate": gate_up[:inter].clone(), "up": gate_up[inter:].clone(), "down": moe.get(dn)[expert].clone()}
    raise UserError(f"--moe {moe.path}: no weights for expert {expert} of layer {layer} ({keys['gate']})")


class ExpertModels:
    """Builds expert i's dense model on demand (one in memory at a time)."""

    def __init__(self, experts: list[str], moe: str | None = None):
        if not experts:
            raise UserError("--experts: give at least one dense checkpoint")
        self.experts = [str(e) for e in experts]
        cfgs = [read_config(e) for e in self.experts]
        fams = []
        for e, cfg in zip(self.experts, cfgs):
            fam, is_moe = family_for(cfg)
            if is_moe:
                raise UserError(f"--experts {e} is an MoE checkpoint; give the dense checkpoints the experts came "
                                f"from (and the assembled MoE as --moe)")
            fams.append(fam)
        if len({f.name for f in fams}) > 1:
            raise UserError(f"--experts mix model families: {sorted({f.name for f in fams})}")
        self.family = fams[-1]
        self.moe = None
        self.num_experts = len(self.experts)
        if moe is not None:
            self.moe = HFCheckpoint(moe)
            mfam, is_moe = family_for(self.moe.config)
            if not is_moe:
                raise UserError(f"--moe {moe} is a dense checkpoint; give the assembled MoE checkpoint")
            if mfam.moe_model_type != self.family.moe_model_type:
                raise UserError(f"--moe {moe} is {mfam.moe_model_type}; the experts ({self.family.name}) upcycle "
                                f"to {self.family.moe_model_type}")
            self.num_experts = mfam.num_experts(self.moe.config)
            self.moe_layers = mfam.moe_layers(self.moe.config)
            if self.num_experts < len(self.experts):
                raise UserError(f"--moe {moe} has {self.num_experts} experts but {len(self.experts)} --experts are "
                                f"given; give the checkpoints that became its experts, in order")
            # expert i < len(experts) must be that checkpoint's MLP (cheap check on one tensor per expert)
            l0 = self.moe_layers[0]
            for i, e in enumerate(self.experts):
                dense = HFCheckpoint(e).get(self.family.dense_mlp_key(l0, "gate"))
                if not torch.equal(moe_expert_mlp(self.moe, l0, i)["gate"], dense):
                    raise UserError(f"expert {i} of --moe {moe} (layer {l0}) is not the MLP of --experts {e}; give "
                                    f"the checkpoints used by upit-assemble (the last E given), in the same order")

    def source(self, i: int) -> str:
        if i < len(self.experts):
            return self.experts[i]
        return f"{self.experts[-1]} with the MLPs of expert {i} of {self.moe.path}"

    def load(self, i: int, dtype: torch.dtype = torch.float32, device="cpu"):
        if i < len(self.experts):
            return _load_dense(self.experts[i], dtype, device)
        model = _load_dense(self.experts[-1], dtype, device)
        sd = {}
        for l in self.moe_layers:
            for p, t in moe_expert_mlp(self.moe, l, i).items():
                sd[self.family.dense_mlp_key(l, p)] = t
        res = model.load_state_dict(sd, strict=False)
        if res.unexpected_keys:
            raise UserError(f"cannot put expert {i}'s MLP into {self.experts[-1]}: unexpected "
                            f"{res.unexpected_keys[0]}")
        return model


# ---------------------------------------------------------------------------------------------------- selection
@dataclass(kw_only=True)
class SeedSelection:
    indices: list[int]
    """Row index (in the data file) of each selected, scored sample."""
    nll: torch.Tensor
    """(N, E) float64 mean response NLL of each sample under each expert."""
    skipped: list[int]
    """Selected rows with no scored token (empty response), left out."""

    @property
    def expert(self) -> list[int]:
        """Lowest-perplexity expert per sample (ties -> lowest index)."""
        return self.nll.argmin(1).tolist() if len(self.indices) else []

    def counts(self, num_experts: int) -> list[int]:
        return torch.bincount(torch.tensor(self.expert, dtype=torch.long), minlength=num_experts).tolist()


def select(rows: list[dict], models: ExpertModels, tokenizer, *, fraction: float = 0.01, min_samples: int = 1,
           seed: int = 0, max_length: int | None = None, batch_size: int = 8, dtype=torch.float32,
           device="cpu") -> SeedSelection:
    picked = pick_indices(len(rows), fraction, min_samples, seed)
    encoded, kept, skipped = [], [], []
    for i in picked:
        try:
            ids, labels = truncate(*render(rows[i], tokenizer), max_length)
        except UserError as e:
            raise UserError(f"--data row {i}: {e}") from None
        if not any(l != IGNORE for l in labels[1:]):
            skipped.append(i)
            continue
        encoded.append((ids, labels))
        kept.append(i)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    nll = torch.empty(len(kept), models.num_experts, dtype=torch.float64)
    for e in range(models.num_experts):
        model = models.load(e, dtype, device)
        nll[:, e] = mean_nll(model, encoded, batch_size=batch_size, device=device, pad_id=pad,
                             desc=f"expert {e}/{models.num_experts}")
        del model
    return SeedSelection(indices=kept, nll=nll, skipped=skipped)


def output_rows(rows: list[dict], sel: SeedSelection):
    """{"index", "expert", "ppl": [per expert]} then the original row's fields (ours win on a name clash)."""
    for n, (i, e) in enumerate(zip(sel.indices, sel.expert)):
        ppl = [math.exp(x) if x < 700 else float("inf") for x in sel.nll[n].tolist()]
        yield {"index": i, "expert": e, "ppl": ppl,
               **{k: v for k, v in rows[i].items() if k not in ("index", "expert", "ppl")}}
