"""HF checkpoints on disk: lazy safetensors reads (sharded or not), sharded writes with an index, atomic output dirs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from ..errors import UserError
from .source import PlannedSource

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# files copied as is next to the weights (tokenizer, chat template, generation defaults)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
              "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such directory")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (expected an HF checkpoint dir)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UserError(f"{path}: no config.json (not an HF checkpoint dir)")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg}: not valid JSON ({e})") from None


def _safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header: the file must hold every byte the header promises."""
    return _safetensors_layout(path)[0]


def _safetensors_layout(path: Path) -> tuple[dict, int]:
    """(validated header, file offset where tensor data starts)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid safetensors file ({e})") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError, ValueError) as e:
        raise UserError(f"{path}: not a valid safetensors header ({type(e).__name__}: {e})") from None
    if 8 + n + end > size:
        raise UserError(f"{path}: truncated safetensors file ({size} bytes, header says {8 + n + end})")
    return header, 8 + n


class HFCheckpoint(PlannedSource):
    """Read-only view of an HF checkpoint dir: config plus lazily read tensors, one at a time.

    Tensors are read with plain file reads into fresh buffers, not memory-mapped: a mapping keeps every page it has
    touched in the process's RSS (file-backed) for as long as the shard stays open, so streaming a whole checkpoint
    through mmap shows an RSS as large as the input even though only one tensor is held.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = read_config(self.path)
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index}: not a valid safetensors index ({e})") from None
        elif (self.path / SINGLE).is_file():
            weight_map = None
        else:
            if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
                raise UserError(f"{self.path}: only safetensors checkpoints are read (pickle .bin/.pt files are "
                                f"untrusted); re-save it with save_pretrained(..., safe_serialization=True)")
            raise UserError(f"{self.path}: no {SINGLE} or {INDEX}")
        self._plan: dict[str, tuple[torch.dtype, tuple[int, ...], str]] = {}  # key -> (dtype, shape, shard)
        self._offsets: dict[str, int] = {}  # key -> absolute file offset of its bytes in its shard
        shards = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
        for shard in shards:
            f = self.path / shard
            if not f.is_file():
                raise UserError(f"{self.path}: shard {shard} named in {INDEX} is missing")
            header, data_start = _safetensors_layout(f)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if weight_map is not None and weight_map.get(key) != shard:
                    continue
                if info.get("dtype") not in _DTYPES:
                    raise UserError(f"{f}: tensor {key} has unsupported dtype {info.get('dtype')!r}")
                dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
                start, end = (int(x) for x in info["data_offsets"])
                if end - start != _nbytes(dtype, shape):
                    raise UserError(f"{f}: tensor {key} has {end - start} bytes, its shape {list(shape)} "
                                    f"{info['dtype']} needs {_nbytes(dtype, shape)} (corrupt header)")
                self._plan[key] = (dtype, shape, shard)
                self._offsets[key] = data_start + start
        if weight_map is not None:
            missing = [k for k in weight_map if k not in self._plan]
            if missing:
                raise UserError(f"{self.path}: tensor {missing[0]} named in {INDEX} is not in its shard")
        self._handles: dict[str, object] = {}

    def get(self, key: str) -> torch.Tensor:
        if key not in self._plan:
            raise UserError(f"{self.path}: tensor {key} is missing")
        dtype, shape, shard = self._plan[key]
        buf = torch.empty(_nbytes(dtype, shape), dtype=torch.uint8)
        if buf.numel():
            f = self._handles.get(shard)
            if f is None:
                f = self._handles[shard] = open(self.path / shard, "rb", buffering=0)
            view, pos, done = memoryview(buf.numpy()), self._offsets[key], 0
            while done < len(view):
                n = os.preadv(f.fileno(), [view[done:]], pos + done)
                if n <= 0:
                    raise UserError(f"{self.path / shard}: unexpected end of file reading {key}")
                done += n
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def shard_plan(plan: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int) -> list[list[int]]:
    """Split tensor entries (in order) into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(plan):
        nbytes = _nbytes(dtype, shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def shard_layout(plan: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
                 ) -> list[tuple[str, list[int]]]:
    """(file name, plan indices) of every shard: `model.safetensors`, or `model-0000i-of-0000n.safetensors`."""
    shards = shard_plan(plan, max_shard_bytes)
    n = len(shards)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return list(zip(names, shards))


def write_shard(path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], idxs: list[int], fetch,
                progress=None) -> int:
    """One safetensors file holding plan entries `idxs`: the header from the plan, then each tensor's bytes as
    `fetch(key)` returns it (one tensor in memory at a time). Returns the tensor bytes written."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for i in idxs:
        key, dtype, shape = plan[i]
        nb = _nbytes(dtype, shape)
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    total = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for i in idxs:
            key, dtype, shape = plan[i]
            t = fetch(key)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"internal error: {key} is {t.dtype}{tuple(t.shape)}, planned {dtype}{shape}")
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            total += _nbytes(dtype, shape)
            if progress is not None:
                progress.update(1)
    return total


def write_index(out_dir: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                layout: list[tuple[str, list[int]]]) -> None:
    """`model.safetensors.index.json` for a layout of more than one shard (nothing for a single file)."""
    if len(layout) < 2:
        return
    weight_map = {plan[i][0]: name for name, idxs in layout for i in idxs}
    total = sum(_nbytes(d, s) for _, d, s in plan)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (Path(out_dir) / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_sharded(out_dir: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], fetch,
                  max_shard_bytes: int = 2 * 1024**3, progress=None) -> int:
    """Stream tensors into safetensors shards (+ index when more than one), one tensor in memory at a time.

    `plan` lists (key, dtype, shape) in write order; `fetch(key)` returns that tensor. The header of each shard is
    written first from the plan, then each tensor's bytes, so memory never holds more than one tensor.
    Returns the total number of tensor bytes written.
    """
    layout = shard_layout(plan, max_shard_bytes)
    total = sum(write_shard(Path(out_dir) / name, plan, idxs, fetch, progress) for name, idxs in layout)
    write_index(out_dir, plan, layout)
    return total


def write_hf_checkpoint(source, out: str | Path, *, overwrite: bool = False, side_dir: str | Path | None = None,
                        desc: str = "write", max_shard_bytes: int = 2 * 1024**3, get=None, extra=None) -> int:
    """Write any weight source (config, keys, shape, dtype, get) as an HF checkpoint dir, atomically: streamed
    safetensors shards (+ index), config.json, tokenizer/generation files from `side_dir`, and `extra(tmp_dir)` for
    any additional file. `get` overrides `source.get`. Returns the tensor bytes written."""
    import sys

    from tqdm import tqdm

    plan = [(k, source.dtype(k), tuple(source.shape(k))) for k in source.keys()]
    with atomic_output_dir(out, overwrite) as tmp:
        with tqdm(total=len(plan), desc=desc, unit="tensor", file=sys.stderr, disable=None) as bar:
            nbytes = write_sharded(tmp, plan, get or source.get, max_shard_bytes, progress=bar)
        write_config(tmp, source.config)
        if side_dir is not None:
            copy_side_files(Path(side_dir), tmp)
        if extra is not None:
            extra(tmp)
    return nbytes


def write_config(out_dir: Path, config: dict) -> None:
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, Path(dst) / name)


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.exists():
        raise UserError(f"{out.parent}: parent directory does not exist")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to `out`; on success it is renamed to `out`, on any error it is removed."""
    out = check_output_dir(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished dir `tmp` to `out`, replacing an existing `out` only once `tmp` is complete."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
