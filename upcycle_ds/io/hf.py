"""HF checkpoints on disk: lazy safetensors reads (sharded or not), sharded writes with an index, atomic output dirs."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from ..errors import UserError
from .. import checks
from .paths import child
from .atomic import atomic_output_dir, check_output_dir, replace_dir  # noqa: F401
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
    checks.existing(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (expected an HF checkpoint dir)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UserError(f"{path}: no config.json (not an HF checkpoint dir)")
    return read_json_object(cfg)


def read_json_object(path: Path, what: str = "") -> dict:
    """A JSON file that must hold an object (config.json, an index); one-line UserError otherwise."""
    try:
        data = json.loads(path.read_bytes(), parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
        raise UserError(f"{path}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
    except OSError as e:
        raise checks.unreadable_error(path, e) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object{what}, got {type(data).__name__}")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def _safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header: the file must hold every byte the header promises."""
    return _safetensors_layout(path)[0]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_info(path: Path, key, info) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, validated as the safetensors library does."""
    if not isinstance(info, dict):
        raise UserError(f"{path}: header entry {key!r} is not an object (corrupt header)")
    dt, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dt not in _DTYPES:
        raise UserError(f"{path}: tensor {key} has unsupported dtype {dt!r}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise UserError(f"{path}: tensor {key} has shape {shape!r}; expected a list of integers >= 0 (corrupt header)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise UserError(f"{path}: tensor {key} has data_offsets {offsets!r}; expected [begin, end] with "
                        f"0 <= begin <= end (corrupt header)")
    dtype, shape = _DTYPES[dt], tuple(shape)
    start, end = offsets
    if end - start != _nbytes(dtype, shape):
        raise UserError(f"{path}: tensor {key} has {end - start} bytes, its shape {list(shape)} {dt} needs "
                        f"{_nbytes(dtype, shape)} (corrupt header)")
    return dtype, shape, start, end


def _safetensors_layout(path: Path) -> tuple[dict, int]:
    """(validated header {key: (dtype, shape, start, end)}, file offset where tensor data starts).

    The checks of the safetensors library: a JSON object header within the file, known dtypes, shapes of integers
    >= 0, byte ranges that match dtype x shape and tile the data section exactly (no overlap, gap or trailing byte).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UserError(f"{path}: not a valid safetensors file ({size} bytes, shorter than its 8-byte "
                                f"header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > _MAX_HEADER:
                raise UserError(f"{path}: not a valid safetensors file (header length {n} exceeds the file)")
            text = f.read(n)
    except OSError as e:
        raise checks.unreadable_error(path, e) from None
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid safetensors file (header is not JSON: {str(e)[:120]})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise UserError(f"{path}: __metadata__ must map strings to strings (corrupt header)")
    entries = {key: _tensor_info(path, key, info) for key, info in header.items()}
    pos = 0
    for key, (_, _, start, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if start != pos:
            what = "overlaps the previous tensor" if start < pos else f"leaves a gap of {start - pos} bytes"
            raise UserError(f"{path}: tensor {key} starts at byte {start}: it {what} (corrupt header)")
        pos = end
    data = size - 8 - n
    if pos > data:
        raise UserError(f"{path}: truncated safetensors file ({size} bytes, header says {8 + n + pos})")
    if pos < data:
        raise UserError(f"{path}: {data - pos} bytes after the last tensor (corrupt or not a safetensors file)")
    return entries, 8 + n


def read_index(path: Path) -> dict[str, str]:
    """The weight map {tensor key: shard file name} of a sharded checkpoint's index, validated."""
    index = read_json_object(path, " (a safetensors index)")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise UserError(f"{path}: `weight_map` must be an object of tensor name -> shard file "
                        f"(got {type(weight_map).__name__})")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise UserError(f"{path}: weight_map[{key!r}] must be a shard file name (got {shard!r})")
    return weight_map


class HFCheckpoint(PlannedSource):
    """Read-only view of an HF checkpoint dir: config plus lazily read tensors, one at a time.

    Everything is validated before a tensor is read: config.json, the index and every shard header (as the
    safetensors library does), shard names (inside the dir), and every tensor's shape against what config.json
    implies for its model family (`Family.check_shapes`; `check_shapes=False` skips that for other model types).

    Tensors are read with plain file reads into fresh buffers, not memory-mapped: a mapping keeps every page it has
    touched in the process's RSS (file-backed) for as long as the shard stays open, so streaming a whole checkpoint
    through mmap shows an RSS as large as the input even though only one tensor is held.
    """

    def __init__(self, path: str | Path, check_shapes: bool = True):
        self.path = Path(path)
        self.config = read_config(self.path)
        index = self.path / INDEX
        if index.is_file():
            weight_map = read_index(index)
        elif (self.path / SINGLE).is_file():
            weight_map = None
        else:
            if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
                raise UserError(f"{self.path}: only safetensors checkpoints are read (pickle .bin/.pt files are "
                                f"untrusted); re-save it with save_pretrained(..., safe_serialization=True)")
            raise UserError(f"{self.path}: no {SINGLE} or {INDEX}")
        self._plan: dict[str, tuple[torch.dtype, tuple[int, ...], str]] = {}  # key -> (dtype, shape, shard)
        self._offsets: dict[str, int] = {}  # key -> absolute file offset of its bytes in its shard
        self._files: dict[str, Path] = {}
        shards = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
        for shard in shards:
            f = self._files[shard] = child(self.path, shard, f"{index} names shard")
            if not f.is_file():
                raise UserError(f"{self.path}: shard {shard} named in {INDEX} is missing")
            header, data_start = _safetensors_layout(f)
            for key, (dtype, shape, start, _) in header.items():
                if weight_map is not None and weight_map.get(key) != shard:
                    continue
                self._plan[key] = (dtype, shape, shard)
                self._offsets[key] = data_start + start
        if weight_map is not None:
            missing = [k for k in weight_map if k not in self._plan]
            if missing:
                raise UserError(f"{self.path}: tensor {missing[0]} named in {INDEX} is not in its shard")
        self._handles: dict[str, object] = {}
        if check_shapes:
            from ..families import family_for

            family, _ = family_for(self.config)
            family.check_shapes(self.config, {k: v[1] for k, v in self._plan.items()}, str(self.path))

    def get(self, key: str) -> torch.Tensor:
        if key not in self._plan:
            raise checks.missing_tensor_error(self.path, key)
        dtype, shape, shard = self._plan[key]
        buf = torch.empty(_nbytes(dtype, shape), dtype=torch.uint8)
        if buf.numel():
            f = self._handles.get(shard)
            if f is None:
                f = self._handles[shard] = open(self._files[shard], "rb", buffering=0)
            view, pos, done = memoryview(buf.numpy()), self._offsets[key], 0
            while done < len(view):
                n = os.preadv(f.fileno(), [view[done:]], pos + done)
                if n <= 0:
                    raise UserError(f"{self._files[shard]}: unexpected end of file reading {key}")
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
                        desc: str = "write", max_shard_bytes: int = 2 * 1024**3, get=None, extra=None,
                        inputs: tuple = ()) -> int:
    """Write any weight source (config, keys, shape, dtype, get) as an HF checkpoint dir, atomically: streamed
    safetensors shards (+ index), config.json, tokenizer/generation files from `side_dir`, and `extra(tmp_dir)` for
    any additional file. `get` overrides `source.get`. Before anything is written, every planned tensor's shape is
    checked against what the config implies (`Family.check_shapes`), so transformers will load the result.
    `inputs`: paths the output must not replace. Returns the tensor bytes written."""

    from ..families import family_for
    from ..progress import Progress

    if not max_shard_bytes > 0:
        raise UserError(f"the largest shard must be > 0 bytes (got {max_shard_bytes})")
    check_output_dir(out, overwrite, inputs)
    plan = [(k, source.dtype(k), tuple(source.shape(k))) for k in source.keys()]
    family, _ = family_for(source.config)
    family.check_shapes(source.config, {k: s for k, _, s in plan}, f"{desc} output for {out}",
                        config_name="its config")
    with atomic_output_dir(out, overwrite, inputs) as tmp:
        with Progress(len(plan), f"upcycle-ds {desc}", "tensors") as bar:
            nbytes = write_sharded(tmp, plan, get or source.get, max_shard_bytes, progress=bar)
        write_config(tmp, source.config)
        if side_dir is not None:
            copy_side_files(Path(side_dir), tmp)
        if extra is not None:
            extra(tmp)
    return nbytes


def write_config(out_dir: Path, config: dict) -> None:
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n")


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer / generation files of `src` (those of SIDE_FILES that exist) into `dst`; a symlink that leads
    outside `src` is refused (a checkpoint must not make us copy arbitrary files into an output)."""
    for name in SIDE_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(child(src, name, f"{src}: side file"), Path(dst) / name)
