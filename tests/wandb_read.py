"""Read back what an offline W&B run logged, from its `.wandb` log (no network, no wandb service).

wandb 0.31 keeps no readable summary file for offline runs; the `.wandb` file is the only record. Its layout
(LevelDB's log format, with wandb's own header and CRC):

    file   := header block*            header := ":W&B" magic:uint16 (0xBEE1) version:uint8       (7 bytes)
    block  := chunk* zero-padding      32 KiB each, counted from the start of the file (header included);
                                       a chunk never starts in a block's last 6 bytes (those are zero padding)
    chunk  := crc:uint32 length:uint16 type:uint8 data[length]      little-endian (`<IHB`)
              type 1 = a full record, 2/3/4 = first/middle/last piece of a record split across blocks
              crc = zlib.crc32(bytes([type]) + data)   (IEEE CRC-32, not LevelDB's masked CRC-32C)

Each reassembled record is a protobuf `wandb.proto.wandb_internal_pb2.Record`; history rows, summary updates
and config updates carry items with `key` (or `nested_key`, a path) and a JSON value.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

from upcycle_ds.errors import UserError

HEADER = struct.Struct("<4sHB")
HEADER_IDENT, HEADER_MAGIC, HEADER_VERSION = b":W&B", 0xBEE1, 0
CHUNK = struct.Struct("<IHB")
BLOCK_LEN = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def find_wandb_files(run_dir: Path | str) -> list[Path]:
    """All `.wandb` logs under `run_dir` (a run dir can hold several, e.g. after a restart), oldest first."""
    files = {p.resolve() for p in Path(run_dir).rglob("*.wandb") if p.is_file()}  # wandb/latest-run is a symlink
    # run folders are named (offline-)run-YYYYMMDD_HHMMSS-<id>[-N]: sort on the timestamp, then mtime
    def started(p: Path):
        stamp = re.search(r"run-(\d{8}_\d{6})-", p.parent.name)
        return stamp.group(1) if stamp else "", p.stat().st_mtime

    return sorted(files, key=started)


def find_wandb_file(run_dir: Path | str) -> Path:
    """The newest `.wandb` log under `run_dir`; UserError if there is none."""
    files = find_wandb_files(run_dir)
    if not files:
        raise UserError(f"no .wandb run log under {run_dir} (was the run logged with wandb mode 'disabled'?)")
    return files[-1]


def iter_record_bytes(path: Path | str, *, check_crc: bool = True) -> Iterator[bytes]:
    """Yield each record's serialized protobuf bytes, in file order. A torn last record (run still writing or
    killed) ends the iteration; a bad CRC or chunk sequence elsewhere is an error."""
    data = Path(path).read_bytes()
    if len(data) < HEADER.size:
        raise UserError(f"{path}: too short to be a W&B run log ({len(data)} bytes)")
    ident, magic, version = HEADER.unpack_from(data, 0)
    if ident != HEADER_IDENT or magic != HEADER_MAGIC or version != HEADER_VERSION:
        raise UserError(f"{path}: not a W&B run log (header {data[:HEADER.size]!r})")
    pos, pending = HEADER.size, None
    while True:
        room = BLOCK_LEN - pos % BLOCK_LEN
        if room < CHUNK.size:  # trailer: zero padding up to the next block
            pos += room
        if pos + CHUNK.size > len(data):
            return
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if crc == length == kind == 0:  # preallocated / zero tail
            return
        start, end = pos + CHUNK.size, pos + CHUNK.size + length
        if end > len(data):
            return  # torn write at the end of the file
        payload = data[start:end]
        if check_crc and zlib.crc32(bytes([kind]) + payload) != crc:
            raise UserError(f"{path}: CRC mismatch in chunk at byte {pos}")
        pos = end
        if kind == FULL and pending is None:
            yield payload
        elif kind == FIRST and pending is None:
            pending = bytearray(payload)
        elif kind == MIDDLE and pending is not None:
            pending += payload
        elif kind == LAST and pending is not None:
            yield bytes(pending + payload)
            pending = None
        else:
            raise UserError(f"{path}: unexpected chunk type {kind} at byte {pos - length - CHUNK.size}")


def iter_records(path: Path | str, *, check_crc: bool = True):
    """Yield each `wandb_internal_pb2.Record` of a `.wandb` log."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in iter_record_bytes(path, check_crc=check_crc):
        rec = pb.Record()
        rec.ParseFromString(raw)
        yield rec


def _set_item(target: dict[str, Any], item) -> None:
    """`key` = value, or for a `nested_key` path [a, b, c]: target[a][b][c] = value (wandb flattens logged dicts,
    media descriptors included, into such paths)."""
    path = [item.key] if item.key else list(item.nested_key)
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = _item_value(item)


def _del_item(target: dict[str, Any], item) -> None:
    path = [item.key] if item.key else list(item.nested_key)
    for part in path[:-1]:
        target = target.get(part, {})
    target.pop(path[-1], None)


def _item_value(item) -> Any:
    """Decode an item: `value_json`, or (history items only) the typed `value` oneof newer writers may use."""
    if item.value_json:
        return json.loads(item.value_json)
    which = item.WhichOneof("value") if item.DESCRIPTOR.oneofs_by_name.get("value") else None
    if which in (None, "none"):
        return None
    value = getattr(item, which)
    return json.loads(value) if which == "json" else value


def read_offline_run(path: Path | str, *, check_crc: bool = True) -> dict[str, Any]:
    """Parse an offline run: `path` is a `.wandb` file or a directory holding one (the newest is used).

    Returns {"history": [row, ...], "summary": {...}, "config": {...}, "exit_code": int | None,
    "run": {"id", "project", "name", "entity", "group", "tags", "resume", "files_dir"}}. Each history row maps the
    logged keys (as logged, e.g. "moe/layer3/aux_loss") to their values and has "_step", "_runtime", "_timestamp"; a
    logged dict comes back as a nested dict, so a media value is wandb's descriptor ({"_type": "image-file",
    "path": ..., "sha256": ...}, path relative to the run's `files/` dir, `run["files_dir"]`)."""
    p = Path(path)
    file = find_wandb_file(p) if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"no such W&B run log: {file}")
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    run: dict[str, Any] = {"files_dir": str(file.parent / "files")}
    exit_code = None
    for rec in iter_records(file, check_crc=check_crc):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for it in rec.history.item:
                _set_item(row, it)
            if "_step" not in row and rec.history.HasField("step"):
                row["_step"] = rec.history.step.num
            history.append(row)
        elif kind == "summary":
            for it in rec.summary.update:
                _set_item(summary, it)
            for it in rec.summary.remove:
                _del_item(summary, it)
        elif kind == "config":
            for it in rec.config.update:
                _set_item(config, it)
            for it in rec.config.remove:
                _del_item(config, it)
        elif kind == "run":
            r = rec.run
            run.update(id=r.run_id, project=r.project, name=r.display_name, entity=r.entity, group=r.run_group,
                       tags=list(r.tags), resume=r.resume)
            for it in r.config.update:
                _set_item(config, it)
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    return {"history": history, "summary": summary, "config": config, "run": run, "exit_code": exit_code}
