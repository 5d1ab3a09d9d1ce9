"""Rows -> token ids + loss mask: parse (formats.py), render (render.py), tokenize in batches with the fast
tokenizer's character offsets, label the tokens inside the loss spans, truncate, drop samples with nothing to learn.

`encode_rows` is the one tokeniser of every stage; `Encoder` wraps it for `datasets.Dataset.map(batched=True,
num_proc=...)` (the on-disk cache, cache.py) and `encode_dataset` runs it in memory on a few rows (seed-data).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError
from .formats import RowError, Tokens, parse_row, read_columns
from .render import PromptFormat, Rendered, Turns, render

IGNORE = -100
"""Label value that carries no loss (HF/torch cross-entropy ignore_index)."""


@dataclass(frozen=True, kw_only=True)
class TokenizeSpec:
    """Everything besides the rows and the tokenizer that decides a sample's tokens (part of the cache key)."""

    max_length: int | None
    """Truncate samples to this many tokens (right side); None = no truncation."""
    prompt_format: PromptFormat = "auto"
    label_field: str | None = None
    """A row field holding one int >= 0 per sample (UpIT router-init: 'expert'), kept as the sample's label."""
    turns: Turns = "all"
    """Loss on every assistant turn ("all", training) or the last one ("last", seed-data scoring)."""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadStats:
    """Counts from tokenizing one source (truncation and drops are also logged as a warning)."""

    rows: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0


@dataclass
class Encoded:
    row: int
    input_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]; the first token's entry is whatever the rendering says (packing ignores it)
    truncated: bool
    label: int | None = None


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) per text. Calls the Rust tokenizer directly when it has no truncation/padding set
    (same result as `tokenizer(...)`, without transformers' slow per-row conversion)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def _label_masks(offsets: list, spans: list[list[tuple[int, int]]], text_lens: list[int]) -> list[np.ndarray]:
    """Per text, a bool per token: its character range overlaps one of the text's loss spans (tokens without
    characters, e.g. an added BOS, never do). All texts at once: offsets and spans shifted onto one character axis."""
    if not offsets:
        return []
    base = np.cumsum([0] + [n + 1 for n in text_lens[:-1]])
    counts = [len(o) for o in offsets]
    flat = itertools.chain.from_iterable(itertools.chain.from_iterable(offsets))
    off = np.fromiter(flat, dtype=np.int64, count=2 * sum(counts)).reshape(-1, 2)
    off = off + np.repeat(base, counts)[:, None]
    sp = np.asarray([(s + b, e + b) for sps, b in zip(spans, base.tolist()) for s, e in sps],
                    dtype=np.int64).reshape(-1, 2)
    hit = np.zeros(len(off), dtype=bool)
    if len(sp):
        j = np.searchsorted(sp[:, 1], off[:, 0], side="right")  # first span ending after the token starts
        ok = j < len(sp)
        hit[ok] = sp[j[ok], 0] < off[ok, 1]
    hit &= off[:, 1] > off[:, 0]
    return np.split(hit, np.cumsum(counts)[:-1])


def _sample_label(row: dict, field: str):
    value = row.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RowError(f"field {field!r} must be an int >= 0 (got {value!r})")
    return value


def encode_rows(rows: list[dict], row_ids: list[int], tokenizer, spec: TokenizeSpec, source: str,
                stats: LoadStats | None = None) -> list[Encoded]:
    """Tokenize rows (dicts of column values) into samples; samples whose labels all fell away are dropped (counted
    in `stats`). Errors: UserError naming `source` and the row id."""
    stats = stats if stats is not None else LoadStats()
    stats.rows += len(rows)
    items: list[tuple[int, Rendered | Tokens, int | None]] = []
    for rid, row in zip(row_ids, rows):
        where = f"{source} row {rid}"
        sample = parse_row(row, where)
        try:
            label = _sample_label(row, spec.label_field) if spec.label_field is not None else None
            if isinstance(sample, Tokens):
                items.append((rid, sample, label))
            else:
                items.append((rid, render(sample, tokenizer, spec.prompt_format, spec.turns), label))
        except RowError as e:
            raise UserError(f"{where}: {e}") from None
        except Exception as e:  # the chat template's own errors (roles that do not alternate, unknown roles, ...)
            msg = str(e).splitlines()[0] if str(e) else ""
            raise UserError(f"{where}: {type(e).__name__}: {msg}") from None

    eos = tokenizer.eos_token_id
    enc: list = [None] * len(items)
    for flag in (True, False):
        idx = [i for i, (_, r, _) in enumerate(items) if isinstance(r, Rendered) and r.add_special_tokens == flag]
        if idx:
            for i, e in zip(idx, _encode(tokenizer, [items[i][1].text for i in idx], flag)):
                enc[i] = e
    rendered = [i for i, (_, r, _) in enumerate(items) if isinstance(r, Rendered)]
    masks = dict(zip(rendered, _label_masks([enc[i][1] for i in rendered], [items[i][1].spans for i in rendered],
                                            [len(items[i][1].text) for i in rendered])))
    vocab = len(tokenizer)
    out = []
    for i, (rid, r, label) in enumerate(items):
        if isinstance(r, Tokens):
            ids = np.asarray(r.input_ids, dtype=np.int64)
            if ids.min() < 0 or ids.max() >= vocab:
                raise UserError(f"{source} row {rid}: 'input_ids' has ids outside the tokenizer's {vocab} ids")
            if r.labels is None:
                mask = np.ones(len(ids), dtype=bool)
            else:
                labels = np.asarray(r.labels, dtype=np.int64)
                mask = labels != IGNORE
                if (labels[mask] != ids[mask]).any():
                    raise UserError(f"{source} row {rid}: 'labels' must be -100 or equal to the input id at each "
                                    f"position (unshifted, as transformers expects)")
        else:
            ids, mask = np.asarray(enc[i][0], dtype=np.int64), masks[i]
            if r.append_eos:
                if eos is None:
                    raise UserError("the tokenizer has no eos_token; plain prompt/response and text rows need one")
                ids, mask = np.append(ids, eos), np.append(mask, True)
        truncated = spec.max_length is not None and len(ids) > spec.max_length
        if truncated:
            stats.truncated += 1
            ids, mask = ids[: spec.max_length], mask[: spec.max_length]
        if not mask[1:].any():  # the first token of a sample never carries loss
            stats.dropped_no_labels += 1
            continue
        out.append(Encoded(rid, ids.astype(np.int32), mask, truncated, label))
    return out


class Encoder:
    """`datasets.Dataset.map(Encoder(...), batched=True, with_indices=True)`: columns input_ids (int32 lists),
    loss_mask (uint8 lists), row (int64), truncated (bool) [, sample_label (int64)]; dropped samples omitted."""

    def __init__(self, tokenizer, spec: TokenizeSpec, source: str, row_ids: np.ndarray | None = None):
        self.tokenizer, self.spec, self.source, self.row_ids = tokenizer, spec, source, row_ids

    def features(self):
        import datasets

        f = {"input_ids": datasets.List(datasets.Value("int32")), "loss_mask": datasets.List(datasets.Value("uint8")),
             "row": datasets.Value("int64"), "truncated": datasets.Value("bool")}
        if self.spec.label_field is not None:
            f["sample_label"] = datasets.Value("int64")
        return datasets.Features(f)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        keys = list(batch)
        rows = [dict(zip(keys, vals)) for vals in zip(*batch.values())]
        rids = [int(self.row_ids[i]) for i in indices] if self.row_ids is not None else list(indices)
        samples = encode_rows(rows, rids, self.tokenizer, self.spec, self.source)
        out = {"input_ids": [s.input_ids for s in samples],
               "loss_mask": [s.loss_mask.astype(np.uint8) for s in samples],
               "row": [s.row for s in samples], "truncated": [s.truncated for s in samples]}
        if self.spec.label_field is not None:
            out["sample_label"] = [s.label for s in samples]
        return out


def columns_to_read(ds, spec: TokenizeSpec) -> list[str]:
    cols = read_columns(ds.column_names)
    if spec.label_field is not None and spec.label_field not in cols:
        if spec.label_field not in ds.column_names:
            raise UserError(f"rows have no field {spec.label_field!r} (columns: {sorted(ds.column_names)})")
        cols.append(spec.label_field)
    return cols


def encode_dataset(ds, row_ids: list[int], tokenizer, spec: TokenizeSpec, source: str,
                   chunk: int = 1024) -> tuple[list[Encoded], LoadStats]:
    """In memory: the samples of rows `row_ids` of `ds` (a datasets.Dataset) — for a few rows (seed-data)."""
    from .formats import check_columns

    stats = LoadStats()
    if not row_ids:
        return [], stats
    check_columns(ds.select(row_ids), source, row_ids=row_ids)
    part = ds.select_columns(columns_to_read(ds, spec))
    out: list[Encoded] = []
    for lo in range(0, len(row_ids), chunk):
        ids = row_ids[lo: lo + chunk]
        out += encode_rows(part.select(ids).to_list(), ids, tokenizer, spec, source, stats)
    return out, stats
