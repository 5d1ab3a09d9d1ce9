"""A tokenised source on disk: the samples of one data source under one tokenizer and `TokenizeSpec`.

Layout of a store directory (flat arrays, no Python objects; all sizes from meta.json):

    input_ids.i32      every sample's token ids back to back (int32, native byte order)
    loss_mask.u8       one byte per token: 1 = the token is a label (the packer never labels a sample's first token)
    offsets.int64        [n + 1]: sample i is tokens offsets[i]:offsets[i+1]
    rows.int64           [n]: the source row each sample came from (ascending; dropped rows are absent)
    label_counts.int32   [n]: labelled tokens of each sample after its first token
    sample_labels.int64  [n]: TokenizeSpec.label_field of each sample (only with a label field)
    meta.json          counts, the spec, the source, the format version

Readers memory-map the small per-sample arrays and read token ranges with positioned reads (`os.pread`) into fresh
buffers: no page of the token file stays mapped, so a training rank's resident memory does not grow with the data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

STORE_VERSION = 1


ARRAYS = {"offsets": np.int64, "rows": np.int64, "label_counts": np.int32, "sample_labels": np.int64}
"""Per-sample arrays: raw little files named NAME.DTYPE (e.g. offsets.int64), memory-mapped by readers."""


def _array_file(name: str) -> str:
    return f"{name}.{np.dtype(ARRAYS[name]).name}"


class StoreWriter:
    """Appends samples (as Arrow list columns or `tokenize.Encoded`) to a store directory, streaming: memory holds
    one batch, whatever the size of the source."""

    def __init__(self, out: Path, with_labels: bool):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        names = ["input_ids.i32", "loss_mask.u8"] + [_array_file(a) for a in ARRAYS
                                                     if with_labels or a != "sample_labels"]
        self._f = {n.split(".")[0]: open(self.out / n, "wb") for n in names}
        self.with_labels = with_labels
        self.num_samples = self.num_tokens = self.truncated = 0
        self._last_row = -1
        np.zeros(1, np.int64).tofile(self._f["offsets"])

    def add_arrow(self, table) -> None:
        """One record batch of `Encoder`'s output columns."""
        import pyarrow.compute as pc

        ids_col, mask_col = table["input_ids"].combine_chunks(), table["loss_mask"].combine_chunks()
        lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
        ids = pc.list_flatten(ids_col).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        mask = pc.list_flatten(mask_col).to_numpy(zero_copy_only=False).astype(np.uint8, copy=False)
        labels = table["sample_label"].to_numpy().astype(np.int64) if self.with_labels else None
        self._add(ids, mask, lengths, table["row"].to_numpy().astype(np.int64), labels)
        self.truncated += int(pc.sum(table["truncated"]).as_py() or 0)

    def add_samples(self, samples) -> None:
        """`tokenize.Encoded` samples."""
        if not samples:
            return
        self._add(np.concatenate([s.input_ids for s in samples]).astype(np.int32),
                  np.concatenate([s.loss_mask for s in samples]).astype(np.uint8),
                  np.asarray([len(s.input_ids) for s in samples], dtype=np.int64),
                  np.asarray([s.row for s in samples], dtype=np.int64),
                  np.asarray([s.label for s in samples], dtype=np.int64) if self.with_labels else None)
        self.truncated += sum(s.truncated for s in samples)

    def _add(self, ids, mask, lengths, rows, labels) -> None:
        if len(lengths) == 0:
            return
        if rows[0] <= self._last_row or (np.diff(rows) <= 0).any():  # map keeps order: an invariant, not input
            raise RuntimeError("store rows out of order")
        self._last_row = int(rows[-1])
        starts = np.cumsum(lengths) - lengths
        # labelled tokens after each sample's first: all its labels minus the first token's own flag
        counts = np.add.reduceat(mask.astype(np.int64), starts) - mask[starts]
        ids.tofile(self._f["input_ids"])
        mask.tofile(self._f["loss_mask"])
        (self.num_tokens + np.cumsum(lengths)).astype(np.int64).tofile(self._f["offsets"])
        rows.tofile(self._f["rows"])
        counts.astype(np.int32).tofile(self._f["label_counts"])
        if self.with_labels:
            labels.tofile(self._f["sample_labels"])
        self.num_samples += len(lengths)
        self.num_tokens += int(lengths.sum())

    def close(self, meta: dict) -> dict:
        for f in self._f.values():
            f.close()
        meta = {"version": STORE_VERSION, "num_samples": self.num_samples, "num_tokens": self.num_tokens,
                "truncated": self.truncated, "sample_labels": self.with_labels, **meta}
        (self.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        return meta


def _map(path: Path, dtype, n: int) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)


class TokenStore:
    """Read side of a store directory (see the module docs). Safe to share across fork; pickles without its files."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        if self.meta.get("version") != STORE_VERSION:
            raise ValueError(f"{self.path}: store version {self.meta.get('version')} != {STORE_VERSION}")
        n = int(self.meta["num_samples"])
        arr = {a: _map(self.path / _array_file(a), ARRAYS[a], n + (a == "offsets"))
               for a in ARRAYS if a != "sample_labels" or self.meta["sample_labels"]}
        self.offsets, self.rows, self.label_counts = arr["offsets"], arr["rows"], arr["label_counts"]
        self.sample_labels = arr.get("sample_labels")
        self._fds: tuple[int, int] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def _files(self) -> tuple[int, int]:
        if self._fds is None or self._pid != os.getpid():
            self._fds = (os.open(self.path / "input_ids.i32", os.O_RDONLY), os.open(self.path / "loss_mask.u8",
                                                                                     os.O_RDONLY))
            self._pid = os.getpid()
        return self._fds

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(int32 ids, bool loss mask) of sample i."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        fid, fmask = self._files()
        ids = np.frombuffer(_pread(fid, (hi - lo) * 4, lo * 4), dtype=np.int32)
        mask = np.frombuffer(_pread(fmask, hi - lo, lo), dtype=np.uint8).astype(bool)
        return ids, mask

    def close(self) -> None:
        if self._fds is not None and self._pid == os.getpid():
            for fd in self._fds:
                os.close(fd)
        self._fds = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _pread(fd: int, n: int, offset: int) -> bytes:
    buf = os.pread(fd, n, offset)
    while len(buf) < n:  # short reads are legal
        more = os.pread(fd, n - len(buf), offset + len(buf))
        if not more:
            raise OSError(f"unexpected end of a data cache file (fd {fd}) at byte {offset + len(buf)}")
        buf += more
    return buf
