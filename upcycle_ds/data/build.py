"""DataConfig -> cached, tokenised, split and packed datasets: `prepare_cache` (once per node) and `build_datasets`
(every rank).

    prepare_cache(cfg, tokenizer)   tokenise every source once into the cache (datasets .map, batched, num_proc
                                    workers), then split / mix / pack; idempotent, atomic, safe to race
    build_datasets(cfg, tokenizer)  (train, eval | None) PackedDatasets memory-mapped from the cache (builds it first
                                    if it is missing)

In a distributed job, call `prepare_cache` on local rank 0 of each node, barrier, then `build_datasets` on every
rank; a re-run or a resume finds the cache and starts without tokenising.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import UserError
from .cache import cache_root, entry, key_of, publish, remove_stale, tokenizer_fingerprint
from .formats import check_columns
from .pack import PackedDataset
from .sources import SourceSpec, data_files, fingerprint, parse_sources, read_source
from .split import open_split, write_split
from .store import STORE_VERSION, StoreWriter, TokenStore
from .tokenize import IGNORE, Encoder, TokenizeSpec, columns_to_read

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DataConfig:
    data: str | list[str]
    """Training data: one source spec or several (`a.jsonl:0.7 b.parquet:0.3`, see sources.py) with rows in any
    format of formats.FORMATS."""
    max_length: int = 512
    """Tokens per training row (samples are truncated to it; packed rows are exactly this long)."""
    eval_fraction: float = 0.05
    """Fraction of each source's rows held out for evaluation (chosen by seed); 0 = none. Ignored with eval_data."""
    eval_data: str | list[str] | None = None
    """Separate evaluation source(s) instead of eval_fraction (no weights)."""
    seed: int = 0
    """Seed of the row shuffle / eval split (the per-epoch batch order takes its own seed)."""
    pack: bool = True
    """Pack several samples into each max_length row (attention stays within each sample; see pack.py)."""
    max_samples: int | None = None
    """Use only the first N rows of each source after the shuffle (quick runs); applies before the eval split, and
    only those rows are tokenised."""
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    """How prompt/response rows are rendered: chat template (auto: if the tokenizer has one) or plain text + EOS."""
    label_field: str | None = None
    """A row field holding one int per sample (UpIT router-init: 'expert'); batches then carry it on every token of
    the sample as `sample_labels` (int64, -1 on padding). None: no such tensor."""
    cache_dir: str | None = None
    """Data cache root (cache.py): default $UPCYCLE_DS_DATA_CACHE, else ~/.cache/upcycle_ds/data."""
    num_proc: int | None = None
    """Tokenisation worker processes (None: one per 20k rows, at most the CPU count and 32)."""

    def __post_init__(self):
        if self.max_length < 2:
            raise UserError(f"max_length must be >= 2, got {self.max_length}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")
        if self.num_proc is not None and self.num_proc < 1:
            raise UserError(f"num_proc must be >= 1, got {self.num_proc}")

    @classmethod
    def from_args(cls, args, *, label_field: str | None = None) -> "DataConfig":
        """From a TrainArgs-like object (data, max_length, eval_fraction, eval_data, seed, max_rows[,
        data_cache]): the one mapping the launcher's preflight and the ranks share, so both hit one cache entry."""
        return cls(data=args.data, max_length=args.max_length, eval_fraction=args.eval_fraction,
                   eval_data=args.eval_data, seed=args.seed, max_samples=args.max_rows, label_field=label_field,
                   cache_dir=getattr(args, "data_cache", None))

    def sources(self) -> list[SourceSpec]:
        return parse_sources(self.data)

    def eval_sources(self) -> list[SourceSpec] | None:
        if self.eval_data is None:
            return None
        specs = parse_sources(self.eval_data)
        if any(s.weight is not None for s in specs):
            raise UserError(f"eval data {[s.text for s in specs]}: weights apply to training data only")
        return specs

    def tokenize_spec(self) -> TokenizeSpec:
        return TokenizeSpec(max_length=self.max_length, prompt_format=self.prompt_format,
                            label_field=self.label_field)


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def _num_proc(cfg: DataConfig, n_rows: int) -> int:
    if cfg.num_proc is not None:
        return min(cfg.num_proc, max(1, n_rows))
    return max(1, min(os.cpu_count() or 1, 32, n_rows // 20_000))


def _rows_subset(n_rows: int, subset: tuple) -> np.ndarray | None:
    if subset[0] == "all":
        return None
    if subset[0] == "shuffled":  # (kind, seed, max_samples): the rows split_rows will look at, ascending
        return np.sort(np.random.default_rng(subset[1]).permutation(n_rows)[: subset[2]])
    return np.arange(min(n_rows, subset[1]))  # ("head", max_samples)


def tokenize_source(root: Path, spec: SourceSpec, tokenizer, tok_fp: str, tspec: TokenizeSpec, subset: tuple,
                    cfg: DataConfig) -> tuple[str, TokenStore]:
    """The tokens/ entry of one source (built if missing): (key, store)."""
    ds = None
    if spec.kind == "hub":
        ds = read_source(spec, root / "hf")
        source_fp = fingerprint(spec) + ds._fingerprint
    else:
        source_fp = fingerprint(spec, data_files(spec))
    key = key_of({"v": STORE_VERSION, "source": source_fp, "tokenizer": tok_fp, "spec": tspec.as_dict(),
                  "subset": subset})
    final = entry(root, "tokens", key)

    def build(tmp: Path) -> None:
        rows_ds = ds if ds is not None else read_source(spec, root / "hf")
        n_rows = len(rows_ds)
        rows = _rows_subset(n_rows, subset)
        part = rows_ds.select(rows) if rows is not None else rows_ds
        check_columns(part, spec.name, row_ids=rows)  # vectorised: the first bad row, before any tokenising
        part = part.select_columns(columns_to_read(part, tspec))
        enc = Encoder(tokenizer, tspec, spec.name, rows)
        nproc = _num_proc(cfg, len(part))
        log.info("tokenizing %s: %d rows, %d processes -> %s", spec.text, len(part), nproc, final)
        mapped = part.map(enc, batched=True, batch_size=1000, with_indices=True, remove_columns=part.column_names,
                          features=enc.features(), num_proc=nproc if nproc > 1 else None,
                          cache_file_name=str(tmp / "map" / "encoded.arrow"), new_fingerprint=key,
                          desc=f"tokenizing {spec.name}")
        writer = StoreWriter(tmp, with_labels=tspec.label_field is not None)
        for table in mapped.with_format("arrow").iter(batch_size=16384):
            writer.add_arrow(table)
        del mapped
        shutil.rmtree(tmp / "map", ignore_errors=True)
        meta = writer.close({"source": spec.name, "spec_text": spec.text, "rows_total": n_rows,
                             "rows_read": len(part), "dropped": len(part) - writer.num_samples,
                             "tokenize": tspec.as_dict(), "tokenizer": tok_fp})
        if meta["truncated"] or meta["dropped"]:
            log.warning("%s: %d of %d samples truncated to %s tokens, %d dropped (no response tokens left)",
                        spec.name, meta["truncated"], meta["rows_read"], tspec.max_length, meta["dropped"])

    publish(final, build)
    return key, TokenStore(final)


def prepare_cache(cfg: DataConfig, tokenizer) -> Path:
    """Tokenise, split, mix and pack `cfg`'s data into the cache; returns the splits/ entry (cache.py). Idempotent
    (a present entry is returned at once), atomic and safe to call from several processes at the same time."""
    root = cache_root(cfg.cache_dir)
    remove_stale(root)
    train_specs, eval_specs = cfg.sources(), cfg.eval_sources()
    tspec, tok_fp = cfg.tokenize_spec(), tokenizer_fingerprint(tokenizer)
    shuffled = ("shuffled", cfg.seed, cfg.max_samples) if cfg.max_samples is not None else ("all",)
    head = ("head", cfg.max_samples) if cfg.max_samples is not None else ("all",)
    keys: list[str] = []
    stores: list[TokenStore] = []

    def add(spec: SourceSpec, subset: tuple) -> int:
        key, store = tokenize_source(root, spec, tokenizer, tok_fp, tspec, subset, cfg)
        if key not in keys:
            keys.append(key)
            stores.append(store)
        return keys.index(key)

    train = [add(s, shuffled) for s in train_specs]
    evals = [add(s, head) for s in eval_specs] if eval_specs is not None else None
    weights = [s.weight for s in train_specs] if train_specs[0].weight is not None else None
    settings = {"seed": cfg.seed, "eval_fraction": cfg.eval_fraction if evals is None else None,
                "max_samples": cfg.max_samples, "max_length": cfg.max_length, "pack": cfg.pack}
    key = key_of({"tokens": keys, "train": train, "evals": evals, "weights": weights, **settings})
    return publish(entry(root, "splits", key),
                   lambda tmp: write_split(tmp, stores=stores, keys=keys, train=train, evals=evals, weights=weights,
                                           **settings))


def open_cache(path: Path, tokenizer) -> tuple[PackedDataset, PackedDataset | None]:
    """The datasets of a splits/ entry returned by `prepare_cache` (store names are checked: they are input)."""
    import json

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    root = path.parent.parent
    stores = [TokenStore(entry(root, "tokens", k)) for k in meta["tokens"]]
    return open_split(path, stores, pad_id_of(tokenizer))


def build_datasets(cfg: DataConfig, tokenizer) -> tuple[PackedDataset, PackedDataset | None]:
    """(train, eval or None): `prepare_cache` (a no-op when the cache is there) + memory-mapped datasets."""
    return open_cache(prepare_cache(cfg, tokenizer), tokenizer)


def _examples(ds: PackedDataset | None) -> list[dict]:
    if ds is None:
        return []
    out = []
    for j in range(ds.num_samples):
        ids, mask = ds.sample(j)
        ex = {"input_ids": ids.tolist(), "labels": np.where(mask, ids, IGNORE).tolist()}
        if ds.has_sample_labels:
            ex["sample_label"] = ds.sample_label(j)
        out.append(ex)
    return out


def load_examples(cfg: DataConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """(train, eval) samples as Python lists {"input_ids", "labels"[, "sample_label"]} in split order (label -100 =
    no loss; the first token's label is as rendered — packing never labels it). For tests and small data."""
    train, evals = build_datasets(cfg, tokenizer)
    return _examples(train), _examples(evals)


def check_data(cfg: DataConfig, tokenizer=None) -> Path | None:
    """Every check of the data that needs no model: sources readable, every row in a known format, and — with a
    tokenizer — every row renders and tokenises (this builds the cache, so the ranks then start without tokenising).
    Returns the cache entry when a tokenizer was given."""
    if tokenizer is not None:
        return prepare_cache(cfg, tokenizer)
    root = cache_root(cfg.cache_dir)
    for spec in cfg.sources() + (cfg.eval_sources() or []):
        check_columns(read_source(spec, root / "hf"), spec.name)
    return None
