"""Data for every stage: read -> parse (one table of row formats) -> render -> tokenise once into an on-disk cache ->
split / mix -> pack -> world-size-independent, resumable batches.

    sources.py   source specs (files, globs, dirs, save_to_disk, hub names, `:split`, `:weight`) -> datasets.Dataset
    formats.py   the table of row formats (messages, prompt/response, Alpaca, OpenAI evals, text, pre-tokenised)
    render.py    chat templates / plain text -> text + loss spans
    tokenize.py  the tokeniser (labels = tokens inside the loss spans), truncation, drops
    store.py     a tokenised source on disk (flat int32 ids + loss mask, read with positioned reads)
    cache.py     cache root, keys, atomic publication
    split.py     train/eval split, mixing weights, packing plan
    pack.py      best-fit-decreasing packing; PackedDataset (restarting position_ids, no cross-sample loss)
    batches.py   batch order: groups dealt round-robin so the order does not depend on the number of ranks
    build.py     DataConfig, prepare_cache, build_datasets, check_data (the checks `train.setup` runs before any
                 rank starts)

User documentation: docs/data.md.
"""

from .batches import batches, epoch_groups, num_batches, rank_groups
from .build import (DataConfig, build_datasets, check_data, load_examples, open_cache, pad_id_of,
                    prepare_cache)
from .formats import FORMATS, RowFormat, check_columns, formats_help
from .pack import PackedDataset, pack_plan, pack_rows
from .sources import SourceSpec, parse_source, parse_sources, read_source
from .tokenize import IGNORE, LoadStats, TokenizeSpec, encode_dataset


def read_rows(path):
    """The rows of one source spec as a `datasets.Dataset` (old name of `read_source`; UserError on bad input)."""
    from .cache import cache_root

    return read_source(path, cache_root() / "hf")


__all__ = ["FORMATS", "IGNORE", "DataConfig", "LoadStats", "PackedDataset", "RowFormat", "SourceSpec", "TokenizeSpec",
           "batches", "build_datasets", "check_columns", "check_data", "encode_dataset", "epoch_groups",
           "formats_help", "load_examples", "num_batches", "open_cache", "pack_plan", "pack_rows", "pad_id_of",
           "parse_source", "parse_sources", "prepare_cache", "rank_groups", "read_rows", "read_source"]
