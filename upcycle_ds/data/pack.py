"""Packing: fixed-length rows of `max_length` tokens assembled on demand from tokenised samples.

With packing, samples are placed whole into rows by best-fit-decreasing (no sample is split or lost), the tail
padded with the pad id and label -100. Each row carries ``position_ids`` that restart at 0 for every sample (and
for the padding tail), and the first token of every sample has label -100, so no loss term predicts one sample
from another.

Attention: passed **without** ``attention_mask`` and with ``use_cache=False``, transformers (5.x) reads the
restarting ``position_ids`` as packed sequences and builds a block-diagonal causal mask (sdpa/eager/flex; flash
attention uses them as varlen boundaries) — each sample attends only to itself, exactly as if unpacked. Passing an
all-ones ``attention_mask`` (or a cache) instead gives plain causal attention over the whole packed row.

Memory: a `PackedDataset` holds only per-sample and per-row index arrays (memory-mapped from the cache); a batch
reads its samples' tokens from the cache files (store.py), so resident memory does not grow with the data.
"""

from __future__ import annotations

import numpy as np
import torch

from .store import TokenStore
from .tokenize import IGNORE


def pack_plan(lengths, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing. Returns (items, row_ptr): row r holds sample indices items[row_ptr[r]:row_ptr[r+1]] (in
    placement order, longest first); every index is used once and no row holds more than max_length tokens.

    Best fit = the open row with the least room that still fits the sample (ties: the most recently opened). Rows
    with room are kept in buckets by remaining capacity and a bitmask of non-empty buckets, so a placement is a
    couple of integer operations: ~1 µs per sample, millions of samples in seconds."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n and int(lengths.max()) > max_length:
        i = int(np.argmax(lengths))
        raise ValueError(f"sample {i} has {int(lengths[i])} tokens > max_length {max_length}")
    order = np.lexsort((np.arange(n), -lengths))  # longest first, ties by index
    row_of = np.empty(n, dtype=np.int64)
    buckets: list[list[int]] = [[] for _ in range(max_length + 1)]
    nonempty = 0  # bit c set <=> some open row has exactly c tokens of room
    num_rows = 0
    for i, size in zip(order.tolist(), lengths[order].tolist()):
        fits = nonempty >> size
        if fits:
            room = size + (fits & -fits).bit_length() - 1
            bucket = buckets[room]
            r = bucket.pop()
            if not bucket:
                nonempty &= ~(1 << room)
        else:
            r, room = num_rows, max_length
            num_rows += 1
        row_of[i] = r
        left = room - size
        if left:
            buckets[left].append(r)
            nonempty |= 1 << left
    items = order[np.argsort(row_of[order], kind="stable")]
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=num_rows))]).astype(np.int64)
    return items.astype(np.int64), row_ptr


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """`pack_plan` as a list of rows of sample indices."""
    items, ptr = pack_plan(lengths, max_length)
    return [items[a:b].tolist() for a, b in zip(ptr[:-1], ptr[1:])]


class MemoryStore:
    """A `TokenStore` look-alike over in-memory samples (tests, small data)."""

    def __init__(self, examples: list[dict]):
        self._ids = [np.asarray(e["input_ids"], dtype=np.int32) for e in examples]
        self._mask = [np.asarray(e["labels"], dtype=np.int64) != IGNORE for e in examples]
        self.offsets = np.concatenate([[0], np.cumsum([len(x) for x in self._ids])]).astype(np.int64)
        self.label_counts = np.asarray([int(m[1:].sum()) for m in self._mask], dtype=np.int64)
        self.sample_labels = (np.asarray([e["sample_label"] for e in examples], dtype=np.int64)
                              if examples and all("sample_label" in e for e in examples) else None)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self._ids[i], self._mask[i]


class RowSamples:
    """`ds.row_samples[r]`: the sample indices (into the split's sample list) packed into row r, in order."""

    def __init__(self, items: np.ndarray, row_ptr: np.ndarray):
        self.items, self.row_ptr = items, row_ptr

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def __getitem__(self, r: int) -> list[int]:
        if not -len(self) <= r < len(self):
            raise IndexError(r)
        r %= len(self)
        return self.items[self.row_ptr[r]: self.row_ptr[r + 1]].tolist()


class PackedDataset:
    """Fixed-length rows over a split's samples (one sample per row when pack=False).

    A split's samples are (store, index in store) pairs — several stores when sources are mixed; a sample may
    appear more than once (an up-weighted source). `batch(idx)` returns int64 tensors {"input_ids", "labels",
    "position_ids"} [+ "sample_labels" when the stores carry a label field: each token's sample label, -1 on
    padding] of shape [len(idx), max_length], and "num_tokens" [len(idx)]: each row's tokens that are not padding
    (what throughput counts; the pad id may also be a real token, e.g. the EOS). Index -1 gives an empty row (all
    padding, no loss).
    `row_samples[r]` lists the split-sample indices in row r, in order.
    """

    def __init__(self, stores: list[TokenStore | MemoryStore], sample_store: np.ndarray, sample_index: np.ndarray,
                 max_length: int, pad_id: int, *, pack: bool = True, items: np.ndarray | None = None,
                 row_ptr: np.ndarray | None = None, stats: dict | None = None):
        self.stores, self.max_length, self.pad_id = stores, max_length, pad_id
        self.sample_store, self.sample_index = sample_store, sample_index
        if items is None or row_ptr is None or stats is None:
            lengths = self._lengths()
            if items is None or row_ptr is None:
                if pack:
                    items, row_ptr = pack_plan(lengths, max_length)
                else:
                    if len(lengths) and int(lengths.max()) > max_length:
                        raise ValueError(f"a sample has more than max_length {max_length} tokens")
                    items = np.arange(len(lengths), dtype=np.int64)
                    row_ptr = np.arange(len(lengths) + 1, dtype=np.int64)
            counts = np.zeros(len(sample_index), dtype=np.int64)
            for s, store in enumerate(stores):
                sel = np.asarray(sample_store) == s
                counts[sel] = np.asarray(store.label_counts)[np.asarray(sample_index)[sel]]
            stats = {"tokens": int(lengths.sum()), "label_tokens": int(counts.sum())}
        self.items, self.row_ptr = items, row_ptr
        self.row_samples = RowSamples(items, row_ptr)
        self.num_samples = len(sample_index)
        self.num_tokens = int(stats["tokens"])
        self.num_label_tokens = int(stats["label_tokens"])
        self.has_sample_labels = bool(stores) and all(st.sample_labels is not None for st in stores)

    @classmethod
    def from_examples(cls, examples: list[dict], max_length: int, pad_id: int, pack: bool = True) -> "PackedDataset":
        """From in-memory samples {"input_ids", "labels"[, "sample_label"]} (tests, small data)."""
        n = len(examples)
        return cls([MemoryStore(examples)], np.zeros(n, dtype=np.int64), np.arange(n, dtype=np.int64), max_length,
                   pad_id, pack=pack)

    def _lengths(self) -> np.ndarray:
        out = np.zeros(len(self.sample_index), dtype=np.int64)
        for s, store in enumerate(self.stores):
            sel = np.asarray(self.sample_store) == s
            idx = np.asarray(self.sample_index)[sel]
            off = np.asarray(store.offsets)
            out[sel] = off[idx + 1] - off[idx]
        return out

    def sample(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(int32 ids, bool loss mask as tokenised) of split sample j."""
        return self.stores[int(self.sample_store[j])].read(int(self.sample_index[j]))

    def sample_label(self, j: int) -> int:
        return int(self.stores[int(self.sample_store[j])].sample_labels[int(self.sample_index[j])])

    def max_sample_label(self) -> int:
        """The largest sample label in the stores (both splits; -1 without labels); host arrays only."""
        if not self.has_sample_labels:
            return -1
        return max((int(np.asarray(st.sample_labels).max()) for st in self.stores if len(st.sample_labels)), default=-1)

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        B, L = len(idx), self.max_length
        input_ids = np.full((B, L), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, L), dtype=bool)
        position_ids = np.tile(np.arange(L, dtype=np.int64), (B, 1))
        tags = np.full((B, L), -1, dtype=np.int64) if self.has_sample_labels else None
        num_tokens = np.zeros(B, dtype=np.int64)
        for b, r in enumerate(idx.tolist()):
            if r < 0:
                continue
            if r >= len(self):
                raise IndexError(f"row {r} of {len(self)}")
            t = 0
            for j in self.items[self.row_ptr[r]: self.row_ptr[r + 1]].tolist():
                ids, m = self.sample(j)
                n = len(ids)
                input_ids[b, t: t + n] = ids
                mask[b, t + 1: t + n] = m[1:]  # nothing predicts a sample's first token
                position_ids[b, t: t + n] = np.arange(n)
                if tags is not None:
                    tags[b, t: t + n] = self.sample_label(j)
                t += n
            position_ids[b, t:] = np.arange(L - t)  # the padding tail is its own "sample"
            num_tokens[b] = t
        labels = np.where(mask, input_ids, IGNORE)
        out = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
               "position_ids": torch.from_numpy(position_ids), "num_tokens": torch.from_numpy(num_tokens)}
        if tags is not None:
            out["sample_labels"] = torch.from_numpy(tags)
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch([i]).items()}

    def summary(self) -> str:
        fill = self.num_tokens / max(1, len(self) * self.max_length)
        return (f"{self.num_samples} samples -> {len(self)} rows x {self.max_length} tokens "
                f"({fill:.0%} filled, {self.num_label_tokens} loss tokens)")
