"""Outputs appear complete or not at all: a file or a directory is written under a temp name next to its final
path and renamed into place at the end; on any error (or a signal turned exception) the temp is removed, and an
OSError (disk full, read-only location, no permission, file size limit) becomes one line naming the output.

Without `overwrite`, the final rename never replaces anything: an OUT that appeared while the command wrote (a
second job with the same --out) is an error and stays as it is. Temp files and dirs are private while in flight
(mkstemp / mkdtemp: 0600 / 0700); what is renamed into place gets the modes the user's umask gives (0644 / 0755
under umask 022), like any file the user creates."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .paths import check_apart


def umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status; elsewhere set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_public(path: str | Path) -> None:
    """Give a finished temp file or dir (private while written) the mode a plain create would: 0666 / 0777 less the
    umask."""
    p = Path(path)
    os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask())


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
            make_public(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def check_output_dir(out: str | Path, overwrite: bool, inputs: tuple = ()) -> Path:
    """`out` may be written: it does not exist (or `overwrite`), its parent does, and it is apart from every one of
    `inputs` (`io.paths.check_apart`: not one of them, not inside one, not holding one)."""
    out = Path(out)
    check_apart(out, inputs)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: parent directory does not exist")
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
        replace_dir(tmp, out, overwrite=overwrite)
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


def replace_dir(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Move the finished dir `tmp` to `out` (with the umask's modes). `overwrite`: replace an existing `out` (dir,
    file or symlink), nothing of the old one left behind. Else `out` must not exist: if it appeared meanwhile
    (another job wrote it), UserError and `out` stays as it is (`tmp` is the caller's to remove)."""
    make_public(tmp)
    if not overwrite:
        _rename_new(tmp, out)
        return
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


def _rename_new(tmp: Path, out: Path) -> None:
    """rename(2) that replaces nothing: `out` must not exist. A directory rename cannot replace a non-empty directory
    or a file (ENOTEMPTY / EEXIST / ENOTDIR), so a concurrent writer's finished `out` is never lost; the only thing
    the race could replace is an empty directory created in the instant between the check and the rename."""
    appeared = UserError(f"{out} appeared while this command was writing it (another job with the same output?); "
                         f"it was left as it is: pass --overwrite to replace it, or choose another output")
    if out.exists() or out.is_symlink():
        raise appeared
    try:
        os.rename(tmp, out)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise appeared from None
        raise
