"""Training data: load → render → tokenize with response-only labels → pack → rank-sharded, resumable batches.

Pipeline (each step a small function, no global state):

1. `read_rows(path)`: a .jsonl/.json/.parquet/.arrow file or a `save_to_disk` directory, via `datasets`.
2. `load_examples(cfg, tokenizer)`: shuffle row indices with `cfg.seed`, keep the first `max_samples`, split off the
   held-out eval rows (`eval_fraction`, or all of `eval_data`), render every row to text plus the character spans
   that carry loss, tokenize once (fast tokenizer, offsets) and label the tokens inside those spans. Row formats,
   checked in this order:

   - ``messages``: a chat list of ``{"role", "content"}``, rendered with ``tokenizer.apply_chat_template``. Loss on
     every assistant turn's content and the template's end-of-turn text after it (e.g. ``</s>``, ``<|im_end|>``),
     nothing else.
   - ``prompt`` + ``response`` (or ``completion``): with ``prompt_format="auto"`` rendered as a one-turn user/assistant
     chat when the tokenizer has a chat template (instruct models), else as plain ``prompt + response`` text (with
     the tokenizer's own special tokens, e.g. Llama's BOS) followed by the EOS id. Loss on the response (+ end of turn
     / EOS) only. ``prompt_format="chat"|"plain"`` forces one rendering.
   - ``text``: plain language modelling, loss on every token, EOS appended.

   Samples longer than `max_length` are truncated on the right; samples left with no labelled token are dropped
   (counted in `LoadStats`).
3. `PackedDataset`: fixed-length rows of `max_length` tokens. With packing, samples are placed whole into rows by
   best-fit-decreasing (no sample is split or lost), the tail padded with the pad id and label -100.
   Each row carries ``position_ids`` that restart at 0 for every sample (and for the padding tail) and the first
   token of every sample has label -100, so no loss term ever predicts one sample from another.

   Attention: passed **without** ``attention_mask`` and with ``use_cache=False``, transformers (5.x) reads the
   restarting ``position_ids`` as packed sequences and builds a block-diagonal causal mask (sdpa/eager/flex; flash
   attention uses them as varlen boundaries) — each sample attends only to itself, exactly as if unpacked. Passing an
   all-ones ``attention_mask`` (or a cache) instead gives plain causal attention over the whole packed row.
4. `batches(...)`: per (seed, epoch) permutation of the rows, truncated to a multiple of
   ``micro_batch_size * world_size`` (or padded with empty rows, ``pad_remainder=True``, for eval), dealt round-robin
   to ranks so ranks get disjoint rows and the same number of micro-batches; ``start`` skips micro-batches already
   consumed on this rank in this epoch (exact resume).

Tokenization runs on every rank (it is fast for small/medium data); for large corpora tokenize once and save.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..errors import UserError

log = logging.getLogger(__name__)

IGNORE = -100
"""Label value that carries no loss (HF/torch cross-entropy ignore_index)."""
EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass(kw_only=True)
class DataConfig:
    data: str
    """Training data: a .jsonl/.json/.parquet/.arrow file or a directory written by datasets' save_to_disk. Rows have
    `messages` (chat list), `prompt`+`response` (or `completion`), or `text`."""
    max_length: int = 512
    """Tokens per training row (samples are truncated to it; packed rows are exactly this long)."""
    eval_fraction: float = 0.05
    """Fraction of rows held out for evaluation (chosen by --seed); 0 = no eval. Ignored with --eval-data."""
    eval_data: str | None = None
    """Separate evaluation file/dir (same formats as --data) instead of --eval-fraction."""
    seed: int = 0
    """Seed of the row shuffle / eval split and of the per-epoch batch order."""
    pack: bool = True
    """Pack several samples into each max_length row (attention stays within each sample; see module docs)."""
    max_samples: int | None = None
    """Use only the first N rows after the shuffle (quick runs); applies before the eval split."""
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    """How prompt/response rows are rendered: chat template (auto: if the tokenizer has one) or plain text + EOS."""
    label_field: str | None = None
    """A row field holding one int per sample (UpIT router-init: 'expert'); batches then carry it on every token of
    the sample as `sample_labels` (int64, -1 on padding). None: no such tensor."""

    def __post_init__(self):
        if self.max_length < 2:
            raise UserError(f"max_length must be >= 2, got {self.max_length}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")


@dataclass
class LoadStats:
    """Counts from tokenizing one split (truncation and drops are also logged as a warning)."""

    rows: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0


# ---------------------------------------------------------------------------------------------------------- reading

def read_rows(path: str | Path):
    """The rows of a data file or save_to_disk directory as a `datasets.Dataset` (UserError on bad paths/files)."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise UserError(f"data file not found: {path}")
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except FileNotFoundError:
            raise UserError(f"{path} is a directory but not one written by datasets' save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UserError(f"{path} holds splits {list(ds)}; expected a 'train' split or a single Dataset")
            ds = ds["train"]
    else:
        builder = EXTENSIONS.get(p.suffix.lower())
        if builder is None:
            raise UserError(f"unsupported data file extension {p.suffix!r} ({path}); "
                            f"use one of {', '.join(EXTENSIONS)} or a save_to_disk directory")
        if p.stat().st_size == 0:
            raise UserError(f"data file is empty: {path}")
        try:
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError) as e:
            cause = e.__cause__ or e
            raise UserError(f"cannot read {path} as {builder}: {type(cause).__name__}: "
                            f"{str(cause).splitlines()[0] if str(cause) else ''}") from None
    if len(ds) == 0:
        raise UserError(f"data has no rows: {path}")
    return ds


# -------------------------------------------------------------------------------------------------------- rendering

class MissingColumns(Exception):
    """A row has none of the column sets `render_row` understands."""


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character [start, end) ranges that carry loss, sorted, disjoint
    add_special_tokens: bool  # let the tokenizer add its BOS etc. (plain text) or not (chat templates include them)
    append_eos: bool  # append the EOS id after tokenizing, labelled
    label: int | None = None  # DataConfig.label_field's value for this sample


def _chat(tokenizer, messages, **kw) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


def render_messages(tokenizer, messages: list[dict]) -> Rendered:
    """Chat rendering; loss spans = each assistant content + the end-of-turn text the template puts after it.

    An assistant turn starts where the rendering of the conversation before it (with the generation prompt) ends;
    its content is searched from there (templates may insert e.g. empty think blocks), and the template's suffix
    after the content (from rendering the conversation up to that turn) is labelled too if it follows in the full
    text. This works for templates that are not prefix-stable (Qwen3 drops think blocks of earlier turns).
    """
    full = _chat(tokenizer, messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        content = m["content"]
        start = cursor
        if i > 0:
            prefix = _chat(tokenizer, messages[:i], add_generation_prompt=True)
            if full.startswith(prefix):
                start = max(start, len(prefix))
        pos, text = full.find(content, start), content
        if pos < 0 and content.strip():
            text = content.strip()
            pos = full.find(text, start)
        if pos < 0:
            raise ValueError(f"the chat template does not render assistant turn {i}'s content verbatim")
        end = pos + len(text)
        upto = full if i == len(messages) - 1 else _chat(tokenizer, messages[: i + 1])
        k = upto.rfind(text) if text else len(upto)
        suffix = upto[k + len(text):] if k >= 0 else ""
        if suffix and full.startswith(suffix, end):
            end += len(suffix)
        if end > pos:
            spans.append((pos, end))
        cursor = end
    return Rendered(full, spans, add_special_tokens=False, append_eos=False)


def render_row(row: dict, tokenizer, prompt_format: str) -> Rendered:
    """Render one data row (see module docs for formats). Raises `MissingColumns` when it has no known columns."""
    if row.get("messages") is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError("'messages' must be a list of {'role': str, 'content': str}")
        if not tokenizer.chat_template:
            raise ValueError("row has 'messages' but the tokenizer has no chat template")
        return render_messages(tokenizer, messages)
    response = row.get("response") if row.get("response") is not None else row.get("completion")
    if row.get("prompt") is not None and response is not None:
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError("'prompt' and 'response' must be strings")
        chat = prompt_format == "chat" or (prompt_format == "auto" and bool(tokenizer.chat_template))
        if chat:
            if not tokenizer.chat_template:
                raise ValueError("prompt_format='chat' but the tokenizer has no chat template")
            return render_messages(tokenizer, [{"role": "user", "content": prompt},
                                               {"role": "assistant", "content": response}])
        return Rendered(prompt + response, [(len(prompt), len(prompt) + len(response))], True, True)
    if row.get("text") is not None:
        if not isinstance(row["text"], str):
            raise ValueError("'text' must be a string")
        return Rendered(row["text"], [(0, len(row["text"]))], True, True)
    raise MissingColumns


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) per text. Calls the Rust tokenizer directly when it has no truncation/padding set
    (same result as `tokenizer(...)`, without transformers' slow per-row conversion)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def _label_chunk(offsets: list[list[tuple[int, int]]], spans: list[list[tuple[int, int]]],
                 text_lens: list[int]) -> list[np.ndarray]:
    """Per text, a bool per token: its character range overlaps one of the text's loss spans (tokens without
    characters, e.g. an added BOS, never do). All texts at once: offsets and spans shifted onto one character axis."""
    base = np.cumsum([0] + [n + 1 for n in text_lens[:-1]])
    counts = [len(o) for o in offsets]
    off = np.asarray([t for o in offsets for t in o], dtype=np.int64).reshape(-1, 2)
    off = off + np.repeat(base, counts)[:, None]
    sp = np.asarray([(s + b, e + b) for sps, b in zip(spans, base.tolist()) for s, e in sps], dtype=np.int64)
    hit = np.zeros(len(off), dtype=bool)
    if len(sp):
        j = np.searchsorted(sp[:, 1], off[:, 0], side="right")  # first span ending after the token starts
        ok = j < len(sp)
        hit[ok] = sp[j[ok], 0] < off[ok, 1]
    hit &= off[:, 1] > off[:, 0]
    return np.split(hit, np.cumsum(counts)[:-1])


def tokenize_rendered(tokenizer, items: list[Rendered], max_length: int, stats: LoadStats,
                      chunk: int = 4096) -> list[dict]:
    """Tokenize rendered rows (batched, fast tokenizer) into {"input_ids", "labels"} lists; truncate/drop as needed."""
    eos = tokenizer.eos_token_id
    if eos is None and any(r.append_eos for r in items):
        raise UserError("the tokenizer has no eos_token; plain prompt/response and text rows need one")
    out = []
    for lo in range(0, len(items), chunk):
        part = items[lo: lo + chunk]
        enc: list = [None] * len(part)
        for flag in (True, False):
            idx = [i for i, r in enumerate(part) if r.add_special_tokens == flag]
            for i, e in zip(idx, _encode(tokenizer, [part[i].text for i in idx], flag) if idx else []):
                enc[i] = e
        masks = _label_chunk([o for _, o in enc], [r.spans for r in part], [len(r.text) for r in part])
        for r, (ids, _), mask in zip(part, enc, masks):
            ids, mask = list(ids), mask.tolist()
            if r.append_eos:
                ids.append(eos)
                mask.append(True)
            if len(ids) > max_length:
                stats.truncated += 1
                ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask[1:]):  # the first token of a sample never carries loss
                stats.dropped_no_labels += 1
                continue
            out.append({"input_ids": ids, "labels": [t if m else IGNORE for t, m in zip(ids, mask)]})
            if r.label is not None:
                out[-1]["sample_label"] = r.label
    return out


def _examples(ds, indices, tokenizer, cfg: DataConfig, source: str) -> tuple[list[dict], LoadStats]:
    stats = LoadStats(rows=len(indices))
    rows = ds.select(indices).to_list() if len(indices) else []
    rendered = []
    for idx, row in zip(indices, rows):
        try:
            rendered.append(render_row(row, tokenizer, cfg.prompt_format))
            if cfg.label_field is not None:
                value = row.get(cfg.label_field)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"field {cfg.label_field!r} must be an int >= 0 (got {value!r})")
                rendered[-1].label = value
        except MissingColumns:
            found = sorted(k for k, v in row.items() if v is not None)
            raise UserError(f"{source} row {idx}: needs 'messages', 'prompt'+'response' (or 'completion') or 'text'; "
                            f"found columns {found}") from None
        except Exception as e:  # template errors (e.g. roles that do not alternate), wrong types
            raise UserError(f"{source} row {idx}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            ) from None
    examples = tokenize_rendered(tokenizer, rendered, cfg.max_length, stats)
    if stats.truncated or stats.dropped_no_labels:
        log.warning("%s: %d of %d samples truncated to %d tokens, %d dropped (no response tokens left)", source,
                    stats.truncated, stats.rows, cfg.max_length, stats.dropped_no_labels)
    return examples, stats


def load_examples(cfg: DataConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """(train, eval) tokenized samples, each {"input_ids": list[int], "labels": list[int]} (label -100 = no loss).

    Row order: a permutation by `cfg.seed` of the file's rows, cut to `max_samples`; the first
    `ceil(eval_fraction * n)` (at least 1 when eval_fraction > 0, never all) are eval, the rest train — deterministic
    and disjoint. With `eval_data` the eval samples are that file's rows in file order (cut to `max_samples`).
    """
    ds = read_rows(cfg.data)
    order = np.random.default_rng(cfg.seed).permutation(len(ds))
    if cfg.max_samples is not None:
        order = order[: cfg.max_samples]
    n_eval = 0
    if cfg.eval_data is None and cfg.eval_fraction > 0:
        if len(order) < 2:
            raise UserError(f"{cfg.data} has {len(order)} row(s): too few to hold out an eval split "
                            f"(set eval_fraction 0 or give eval_data)")
        n_eval = min(max(1, math.ceil(cfg.eval_fraction * len(order))), len(order) - 1)
    train, _ = _examples(ds, order[n_eval:].tolist(), tokenizer, cfg, cfg.data)
    if cfg.eval_data is not None:
        eds = read_rows(cfg.eval_data)
        n = len(eds) if cfg.max_samples is None else min(len(eds), cfg.max_samples)
        evals, _ = _examples(eds, list(range(n)), tokenizer, cfg, cfg.eval_data)
    else:
        evals, _ = _examples(ds, order[:n_eval].tolist(), tokenizer, cfg, cfg.data)
    if not train:
        raise UserError(f"{cfg.data}: no training samples with response tokens left")
    return train, evals


# ---------------------------------------------------------------------------------------------------------- packing

def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices per row, each row's total length <= max_length; every index used once."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row id) of rows with room left
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens > max_length {max_length}")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            cap, r = free.pop(j)
            rows[r].append(i)
        else:
            cap, r = max_length, len(rows)
            rows.append([i])
        if cap - n > 0:
            bisect.insort(free, (cap - n, r))
    return rows


class PackedDataset:
    """Fixed-length rows built from tokenized samples (one sample per row when pack=False).

    Stored compactly (int32 ids/positions, bool loss mask); `batch(idx)` returns int64 tensors
    {"input_ids", "labels", "position_ids"} of shape [len(idx), max_length]. Index -1 gives an empty row
    (all padding, no loss). `row_samples[r]` lists the sample indices in row r, in order.
    """

    def __init__(self, examples: list[dict], max_length: int, pad_id: int, pack: bool = True):
        self.max_length, self.pad_id = max_length, pad_id
        lengths = np.asarray([len(e["input_ids"]) for e in examples], dtype=np.int64)
        self.row_samples = pack_rows(lengths.tolist(), max_length) if pack else [[i] for i in range(len(examples))]
        R, L = len(self.row_samples), max_length
        self.num_samples, self.num_tokens = len(examples), int(lengths.sum())
        # where each sample goes: flat offset in the [R, L] grid
        dest = np.zeros(len(examples), dtype=np.int64)
        used = np.zeros(R, dtype=np.int64)
        for r, samples in enumerate(self.row_samples):
            t = 0
            for i in samples:
                dest[i] = r * L + t
                t += int(lengths[i])
            used[r] = t
        src_start = np.cumsum(lengths) - lengths
        within = np.arange(self.num_tokens) - np.repeat(src_start, lengths)  # token index inside its sample
        flat_dest = np.repeat(dest, lengths) + within
        ids = np.fromiter((t for e in examples for t in e["input_ids"]), dtype=np.int64, count=self.num_tokens)
        labels = np.fromiter((t for e in examples for t in e["labels"]), dtype=np.int64, count=self.num_tokens)
        input_ids = np.full(R * L, pad_id, dtype=np.int32)
        input_ids[flat_dest] = ids
        loss_mask = np.zeros(R * L, dtype=bool)
        loss_mask[flat_dest] = (labels != IGNORE) & (within > 0)  # nothing predicts a sample's first token
        position_ids = (np.arange(L)[None, :] - used[:, None]).reshape(-1).astype(np.int32)  # padding: own "sample"
        position_ids[flat_dest] = within
        self.input_ids = torch.from_numpy(input_ids.reshape(R, L))
        self.loss_mask = torch.from_numpy(loss_mask.reshape(R, L))
        self.position_ids = torch.from_numpy(position_ids.reshape(R, L))
        self.num_label_tokens = int(self.loss_mask.sum())
        self.sample_labels = None  # [R, L] int64: each token's sample label (DataConfig.label_field), -1 on padding
        if examples and all("sample_label" in e for e in examples):
            tags = np.full(R * L, -1, dtype=np.int64)
            tags[flat_dest] = np.repeat(np.asarray([e["sample_label"] for e in examples], dtype=np.int64), lengths)
            self.sample_labels = torch.from_numpy(tags.reshape(R, L))

    def __len__(self) -> int:
        return len(self.row_samples)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        real = idx >= 0
        safe = idx.clamp(min=0)
        input_ids = self.input_ids[safe].long()
        mask = self.loss_mask[safe] & real[:, None]
        position_ids = self.position_ids[safe].long()
        if not bool(real.all()):
            input_ids[~real] = self.pad_id
            position_ids[~real] = torch.arange(self.max_length)
        labels = torch.where(mask, input_ids, torch.full_like(input_ids, IGNORE))
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.sample_labels is not None:
            out["sample_labels"] = torch.where(real[:, None], self.sample_labels[safe], -1)
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch([i]).items()}

    def summary(self) -> str:
        fill = self.num_tokens / max(1, len(self) * self.max_length)
        return (f"{self.num_samples} samples -> {len(self)} rows x {self.max_length} tokens "
                f"({fill:.0%} filled, {self.num_label_tokens} loss tokens)")


def build_datasets(cfg: DataConfig, tokenizer) -> tuple[PackedDataset, PackedDataset | None]:
    """`load_examples` + packing: (train, eval or None when there is no eval data)."""
    train, evals = load_examples(cfg, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    train_ds = PackedDataset(train, cfg.max_length, pad, cfg.pack)
    eval_ds = PackedDataset(evals, cfg.max_length, pad, cfg.pack) if evals else None
    return train_ds, eval_ds


# ---------------------------------------------------------------------------------------------------------- batching

def _rank_rows(n_rows: int, *, micro_batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
               shuffle: bool, pad_remainder: bool) -> np.ndarray:
    if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad sharding: micro_batch_size={micro_batch_size} rank={rank} world_size={world_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n_rows) if shuffle else np.arange(n_rows)
    per_step = micro_batch_size * world_size
    if pad_remainder:
        order = np.concatenate([order, np.full(-n_rows % per_step, -1, dtype=order.dtype)])
    else:
        order = order[: n_rows // per_step * per_step]
    return order[rank::world_size]


def num_batches(n_rows: int, *, micro_batch_size: int, world_size: int, pad_remainder: bool = False) -> int:
    """Micro-batches per rank per epoch (the same on every rank)."""
    per_step = micro_batch_size * world_size
    return -(-n_rows // per_step) if pad_remainder else n_rows // per_step


def batches(dataset: PackedDataset, *, micro_batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
            start: int = 0, shuffle: bool = True, pad_remainder: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches for one epoch: {"input_ids", "labels", "position_ids"} int64 [mbs, max_length].

    Rows are permuted by (seed, epoch) — the same permutation on every rank — cut to a multiple of
    micro_batch_size * world_size (pad_remainder=True instead pads with empty rows whose labels are all -100, so an
    eval pass sees every row), and dealt round-robin: rank r gets permuted rows r, r+W, r+2W, ... Ranks thus hold
    disjoint rows and the same number of micro-batches. `start` = micro-batches this rank already consumed in this
    epoch: the iterator resumes exactly where a run stopped.
    """
    mine = _rank_rows(len(dataset), micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=seed,
                      epoch=epoch, shuffle=shuffle, pad_remainder=pad_remainder)
    n = len(mine) // micro_batch_size
    if not 0 <= start <= n:
        raise ValueError(f"start={start} is outside this epoch's {n} micro-batches")
    return (dataset.batch(mine[b * micro_batch_size: (b + 1) * micro_batch_size]) for b in range(start, n))


def check_columns(ds, path: str) -> None:
    """Fail fast (UserError naming the row) if any row lacks every column set `render_row` understands."""
    cols = set(ds.column_names)
    sets = [("messages",), ("prompt", "response"), ("prompt", "completion"), ("text",)]
    usable = [s for s in sets if set(s) <= cols]
    if not usable:
        raise UserError(f"{path}: rows need `messages`, `prompt`+`response` or `text` columns; found "
                        f"{sorted(cols)}")
    table = ds.select_columns(sorted({c for s in usable for c in s})).to_dict()
    for i in range(len(ds)):
        if not any(all(table[c][i] is not None for c in s) for s in usable):
            have = sorted(c for c in cols if ds[i][c] is not None)
            raise UserError(f"{path}: row {i} has no `messages`, `prompt`+`response` or `text` (has {have})")
