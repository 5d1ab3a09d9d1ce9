"""Where rows come from: one reader for every stage.

A source spec is ``WHAT[:SPLIT][:WEIGHT]``:

- a file ``.jsonl``/``.json`` (also ``.gz``/``.zst``/``.bz2``/``.xz`` compressed), ``.parquet`` or ``.arrow``;
- a glob (``data/*.jsonl.zst``, ``**`` recurses): every match, sorted, read as one source;
- a directory: a ``save_to_disk`` dir (``:SPLIT`` picks a split of a DatasetDict, default ``train``), else every
  data file under it (recursively, sorted). ``DIR:SPLIT`` instead reads it like a hub dataset repo
  (``datasets.load_dataset(DIR, split=SPLIT)``: split names from file names or the README's ``configs``);
- a hub dataset name ``org/name[:split]`` (anything that is not a local path), via ``datasets.load_dataset``
  (default split ``train``; offline it is read from the datasets cache);
- ``:WEIGHT`` (a number) sets the source's share in a mixture of several sources (build.py).

Row ``i`` of a source is its i-th row in that order (files concatenated in sorted order). Rows are read with
`datasets` (Arrow, memory-mapped from its cache), never into Python lists.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .. import checks

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
COMPRESSION = (".gz", ".zst", ".bz2", ".xz")
_WEIGHT = re.compile(r"^(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class SourceSpec:
    text: str
    """The spec as given (for messages)."""
    path: str
    """Local path, glob or hub name."""
    split: str | None = None
    weight: float | None = None
    kind: str = "files"
    """files | disk (save_to_disk) | repo (DIR:SPLIT, a local dataset repo) | hub."""

    @property
    def name(self) -> str:
        return self.text if self.weight is None else self.text.rsplit(":", 1)[0]


def _builder(path: str) -> str | None:
    p = path.lower()
    for c in COMPRESSION:
        if p.endswith(c):
            p = p[: -len(c)]
            if not p.endswith((".jsonl", ".json")):
                return None  # datasets decompresses only json text on the fly
            break
    return BUILDERS.get(os.path.splitext(p)[1])


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _is_disk_dir(p: Path) -> bool:
    return (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def parse_source(text: str) -> SourceSpec:
    """`WHAT[:SPLIT][:WEIGHT]` -> SourceSpec (UserError on a bad spec or a missing local path)."""
    s, weight = str(text).strip(), None
    if ":" in s:
        head, tail = s.rsplit(":", 1)
        if _WEIGHT.match(tail) and not os.path.exists(s):
            weight = float(tail)
            if not weight > 0:
                raise UserError(f"data source {text!r}: the weight must be > 0")
            s = head
    split = None
    if not os.path.exists(s) and not (_is_glob(s) and globlib.glob(s, recursive=True)) and ":" in s:
        head, tail = s.rsplit(":", 1)
        if tail and "/" not in tail:
            s, split = head, tail
    p = Path(s).expanduser()
    if p.is_dir():
        if _is_disk_dir(p):
            return SourceSpec(text, str(p), split, weight, "disk")
        return SourceSpec(text, str(p), split, weight, "repo" if split is not None else "files")
    if p.is_file() or _is_glob(s):
        if split is not None:
            raise UserError(f"data source {text!r}: ':{split}' picks a split, which a file or glob does not have")
        return SourceSpec(text, str(p) if p.is_file() else s, None, weight, "files")
    looks_local = s.startswith(("/", ".", "~")) or _builder(s) is not None or s.endswith(COMPRESSION)
    if looks_local or not _HUB_NAME.match(s):
        raise checks.data_file_missing_error(s)
    return SourceSpec(text, s, split, weight, "hub")


def parse_sources(data) -> list[SourceSpec]:
    """A spec string or a list of them (`--data a.jsonl:0.7 b.parquet:0.3`); weights given for all or for none."""
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data or [])
    if not items:
        raise UserError("no data source given")
    specs = [parse_source(str(x)) for x in items]
    weighted = [s.weight is not None for s in specs]
    if any(weighted) and not all(weighted):
        raise UserError(f"data sources {[s.text for s in specs]}: give a weight to every source or to none")
    return specs


def data_files(spec: SourceSpec) -> list[Path]:
    """The local files a source reads, sorted (UserError when there are none or of mixed kinds)."""
    if spec.kind == "hub":
        return []
    p = Path(spec.path)
    if spec.kind in ("disk", "repo"):
        return sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _builder(f.name) and not f.name.startswith("."))
        if not files:
            raise UserError(f"{spec.path} is a directory with no data files ({', '.join(BUILDERS)}, json optionally "
                            f"{'/'.join(COMPRESSION)}-compressed) and not one written by datasets' save_to_disk")
    else:
        files = sorted(Path(f) for f in globlib.glob(spec.path, recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(f"data file not found: no file matches {spec.path}")
    kinds = {_builder(str(f)) for f in files}
    if None in kinds:
        bad = next(f for f in files if _builder(str(f)) is None)
        raise UserError(f"unsupported data file extension {''.join(bad.suffixes[-2:]) or bad.name!r} ({bad}); use "
                        f"{', '.join(BUILDERS)} (json optionally {'/'.join(COMPRESSION)}-compressed), a "
                        f"save_to_disk directory, or a hub dataset name")
    if len(kinds) > 1:
        raise UserError(f"{spec.text}: mixes file kinds {sorted(kinds)}; give each kind as its own source")
    return files


def local_paths(data) -> list[Path]:
    """The local files and directories a data spec (or list of specs) reads — for the check that no output overlaps
    an input (`io.paths.check_apart`); hub datasets have none. Specs that do not parse are left to the readers."""
    out: list[Path] = []
    for item in [data] if isinstance(data, (str, os.PathLike)) else list(data or []):
        try:
            spec = parse_source(str(item))
        except UserError:
            continue
        if spec.kind == "hub":
            continue
        p = Path(spec.path).expanduser()
        out += [p] if p.exists() else [Path(f) for f in globlib.glob(spec.path, recursive=True)]
    return out


def fingerprint(spec: SourceSpec, files: list[Path] | None = None) -> str:
    """A stable id of the source's content: its files' resolved paths, sizes and modification times (like make);
    for hub datasets the name and split (with `dataset_fingerprint` added by the caller once loaded)."""
    h = hashlib.sha256(json.dumps({"kind": spec.kind, "split": spec.split}).encode())
    if spec.kind == "hub":
        h.update(spec.path.encode())
    for f in files if files is not None else data_files(spec):
        st = f.stat()
        h.update(json.dumps([str(f.resolve()), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


def _one_line(e: BaseException) -> str:
    cause = e.__cause__ or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def read_source(spec: SourceSpec | str, cache_dir: str | Path | None = None):
    """The rows of a source as a `datasets.Dataset` (UserError on anything unreadable or empty).

    `cache_dir`: where `datasets` keeps its Arrow copy of json/parquet files and hub downloads (default: its own)."""
    import datasets

    if isinstance(spec, str):
        spec = parse_source(spec)
    kw = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    try:
        if spec.kind == "disk":
            ds = datasets.load_from_disk(spec.path)
            if isinstance(ds, datasets.DatasetDict):
                split = spec.split or "train"
                if split not in ds:
                    raise UserError(f"{spec.path} holds splits {list(ds)}; pick one with {spec.path}:SPLIT")
                ds = ds[split]
            elif spec.split is not None:
                raise UserError(f"{spec.text}: {spec.path} holds a single split; drop ':{spec.split}'")
        elif spec.kind in ("repo", "hub"):
            split = spec.split or "train"
            try:
                ds = datasets.load_dataset(spec.path, split=split, **kw)
            except ValueError as e:
                if "split" in str(e).lower():
                    raise UserError(f"{spec.text}: no split {split!r} ({_one_line(e)})") from None
                raise
        else:
            files = data_files(spec)
            for f in files:
                if f.stat().st_size == 0:
                    raise UserError(f"data file is empty: {f}")
            builder = _builder(str(files[0]))
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kw)
    except UserError:
        raise
    except FileNotFoundError as e:
        if spec.kind == "hub":
            raise UserError(f"data source {spec.text!r} is no local path and not a dataset `datasets` could load "
                            f"({_one_line(e)})") from None
        raise UserError(f"cannot read {spec.text}: {_one_line(e)}") from None
    except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError, OSError) as e:
        what = spec.text if spec.kind != "files" else f"{spec.text} as {_builder(spec.path) or 'data files'}"
        raise UserError(f"cannot read {what}: {_one_line(e)}") from None
    except Exception as e:  # hub/network errors have many types; one line, never a traceback
        if spec.kind in ("hub", "repo"):
            raise UserError(f"cannot load dataset {spec.text!r}: {_one_line(e)}") from None
        raise
    if len(ds) == 0:
        raise checks.no_rows_error(spec.text)
    return ds
