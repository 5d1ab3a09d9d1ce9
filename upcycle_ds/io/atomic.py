"""Outputs appear complete or not at all: a file or a directory is written under a temp name next to its final
path and renamed into place at the end; on any error (or a signal turned exception) the temp is removed, and an
OSError (disk full, read-only location, no permission, file size limit) becomes one line naming the output."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import UserError


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write `text` to `path` through a temp file in the same directory and `os.replace` (readers see the old or the
    new content, never a part); `fsync` also flushes it to disk before the rename (a crash-safe commit marker)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def check_output_dir(out: str | Path, overwrite: bool, inputs: tuple = ()) -> Path:
    """`out` may be written: it does not exist (or `overwrite`), its parent does, and it is not (and does not
    contain) one of `inputs`, which replacing it would destroy."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: parent directory does not exist")
    real = out.resolve()
    for src in inputs:
        if src is None:
            continue
        s = Path(src).resolve()
        if s == real or s.is_relative_to(real):
            raise UserError(f"{out} {'is' if s == real else 'contains'} the input {src}; write the output elsewhere")
    return out


def _write_error(e: OSError, out: Path, tmp: Path | None) -> UserError:
    """One line for an OSError while writing `out` (through its temp dir `tmp`): disk full, read-only, no permission,
    file size limit; an error on another file (an input) names that file."""
    name = getattr(e, "filename", None)
    if name is not None and tmp is not None:
        p = Path(name).resolve()
        if not (p == out.resolve() or p.is_relative_to(tmp.resolve()) or p.name.startswith(f".{out.name}.")):
            return UserError(f"{name}: {e.strerror or e}")
    return UserError(f"cannot write {out}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, inputs: tuple = ()) -> Iterator[Path]:
    """Yield a temp dir next to `out`; on success it is renamed to `out`, on any error (or signal turned exception)
    it is removed. OSErrors (disk full, read-only location, permissions) become one-line UserErrors."""
    out = check_output_dir(out, overwrite, inputs)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise _write_error(e, out, None) from None
    try:
        yield tmp
        replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, out, tmp) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished dir `tmp` to `out`, replacing an existing `out` (dir, file or symlink) only once `tmp` is
    complete; nothing of the old `out` is left behind."""
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        _remove(old)
    else:
        os.replace(tmp, out)
