"""Train/eval split, source mixing and the packing plan, over tokenised sources (store.py).

Per training source (its rows numbered as in sources.py):

- rows are permuted by `seed`, cut to `max_samples`; the first ``ceil(eval_fraction * n)`` of them (at least 1
  when eval_fraction > 0, never all) are eval rows, the rest train rows — deterministic and disjoint. A row whose
  sample was dropped at tokenisation (nothing left to learn) is skipped. With `eval_data` there is no split: the
  eval samples are the eval sources' rows in order (each cut to `max_samples`).
- mixing: with weights w_i the training set holds ``k_i = round(w_i / sum(w) * N)`` samples of source i, where N is
  the number of train samples of all sources together (an epoch is as long as the data; the weights set the
  proportions): the source's train samples in their shuffled order, repeated (``k_i > n_i``, up-sampled) or cut
  (``k_i < n_i``). Without weights every train sample appears once.

An entry of splits/ (cache.py) holds, per split, the samples as (store, index) pairs in this order and the packing
plan (pack.py) over them, as .npy arrays, plus meta.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import UserError
from .pack import PackedDataset, pack_plan
from .store import TokenStore

SPLIT_VERSION = 1


def samples_of_rows(store_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Indices of the samples of `rows` (in that order) in a store whose ascending `store_rows` lack dropped rows."""
    store_rows = np.asarray(store_rows)
    pos = np.searchsorted(store_rows, rows)
    ok = pos < len(store_rows)
    ok[ok] = store_rows[pos[ok]] == rows[ok]
    return pos[ok].astype(np.int64)


def split_rows(n_rows: int, *, seed: int, eval_fraction: float, max_samples: int | None, held_out: bool,
               name: str) -> tuple[np.ndarray, np.ndarray]:
    """(eval rows, train rows) of a source of n_rows rows (module docs)."""
    order = np.random.default_rng(seed).permutation(n_rows)
    if max_samples is not None:
        order = order[:max_samples]
    n_eval = 0
    if held_out and eval_fraction > 0:
        if len(order) < 2:
            raise UserError(f"{name} has {len(order)} row(s): too few to hold out an eval split (set eval_fraction 0 "
                            f"or give eval_data)")
        n_eval = min(max(1, math.ceil(eval_fraction * len(order))), len(order) - 1)
    return order[:n_eval], order[n_eval:]


def mix(parts: list[np.ndarray], weights: list[float] | None, names: list[str]) -> list[np.ndarray]:
    """Each source's train samples repeated/cut to its share (module docs)."""
    if weights is None:
        return parts
    total = sum(len(p) for p in parts)
    out = []
    for p, w, name in zip(parts, weights, names):
        k = round(w / sum(weights) * total)
        if k and not len(p):
            raise UserError(f"{name}: weight {w} but no training samples")
        out.append(np.resize(p, k) if k else p[:0])
    return out


def write_split(out: Path, *, stores: list[TokenStore], keys: list[str], train: list[int], evals: list[int] | None,
                weights: list[float] | None, seed: int, eval_fraction: float, max_samples: int | None,
                max_length: int, pack: bool) -> dict:
    """Write a splits/ entry. `train` / `evals`: store numbers of the train / eval_data sources (evals None: hold
    out eval_fraction of each training source)."""
    tr_parts, ev_parts, tr_src, ev_src = [], [], [], []
    for s in train:
        store = stores[s]
        ev_rows, tr_rows = split_rows(int(store.meta["rows_total"]), seed=seed, eval_fraction=eval_fraction,
                                      max_samples=max_samples, held_out=evals is None, name=store.meta["source"])
        tr_parts.append(samples_of_rows(store.rows, tr_rows))
        tr_src.append(s)
        if evals is None:
            ev_parts.append(samples_of_rows(store.rows, ev_rows))
            ev_src.append(s)
    tr_parts = mix(tr_parts, weights, [stores[s].meta["source"] for s in train])
    for s in evals or []:
        ev_parts.append(np.arange(len(stores[s]), dtype=np.int64))
        ev_src.append(s)
    if not sum(len(p) for p in tr_parts):
        names = ", ".join(stores[s].meta["source"] for s in train)
        raise UserError(f"{names}: no training samples with response tokens left")
    meta = {"version": SPLIT_VERSION, "tokens": keys, "weights": weights, "max_length": max_length, "pack": pack}
    for name, parts, src in (("train", tr_parts, tr_src), ("eval", ev_parts, ev_src)):
        which = np.concatenate([np.full(len(p), s, dtype=np.int32) for p, s in zip(parts, src)] or
                               [np.zeros(0, np.int32)])
        index = np.concatenate(parts or [np.zeros(0, np.int64)]).astype(np.int64)
        lengths = np.zeros(len(index), dtype=np.int64)
        counts = np.zeros(len(index), dtype=np.int64)
        for s in set(src):
            sel = which == s
            off = np.asarray(stores[s].offsets)
            lengths[sel] = off[index[sel] + 1] - off[index[sel]]
            counts[sel] = np.asarray(stores[s].label_counts)[index[sel]]
        if pack:
            items, row_ptr = pack_plan(lengths, max_length)
        else:
            items, row_ptr = np.arange(len(index), dtype=np.int64), np.arange(len(index) + 1, dtype=np.int64)
        for arr, a in (("store", which), ("index", index), ("items", items), ("row_ptr", row_ptr)):
            np.save(out / f"{name}_{arr}.npy", a)
        meta[name] = {"samples": int(len(index)), "tokens": int(lengths.sum()), "label_tokens": int(counts.sum()),
                      "rows": int(len(row_ptr) - 1)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def open_split(path: Path, stores: list[TokenStore], pad_id: int) -> tuple[PackedDataset, PackedDataset | None]:
    """(train, eval or None when it has no samples) of a splits/ entry, memory-mapped."""
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("version") != SPLIT_VERSION:
        raise ValueError(f"{path}: split version {meta.get('version')} != {SPLIT_VERSION}")
    out = []
    for name in ("train", "eval"):
        arr = {a: np.load(path / f"{name}_{a}.npy", mmap_mode="r") for a in ("store", "index", "items", "row_ptr")}
        if not len(arr["index"]):
            out.append(None)
            continue
        ds = PackedDataset(stores, arr["store"], arr["index"], meta["max_length"], pad_id, items=arr["items"],
                           row_ptr=arr["row_ptr"], stats=meta[name])
        out.append(ds)
    return out[0], out[1]
