"""Names read from untrusted files (shard names in an index, the tag in `latest`) and tag flags must stay inside the
directory they belong to: `child(dir, name, what)` is the one place that decides.

Refused: an empty name, `.`, an absolute path, any `..` component, a NUL byte, and a name whose path resolves
(symlinks followed) outside `dir`. One exception keeps checkpoints from the HuggingFace hub cache readable: a dir
`.../models--ORG--NAME/snapshots/REV` holds symlinks into `.../models--ORG--NAME/blobs`, so for such a dir the
repo folder `models--ORG--NAME` is the boundary.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ..errors import UserError


def _roots(d: Path) -> list[Path]:
    real = d.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(real.parent.parent)  # hub cache: snapshot files are symlinks to ../../blobs/HASH
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def check_name(name, what: str) -> str:
    """The lexical checks of `child` alone (for a name whose directory does not exist yet, e.g. `--out-tag`)."""
    if not isinstance(name, str):
        raise UserError(f"{what}: expected a file name, got {type(name).__name__} {name!r}")
    if name.strip() in ("", ".") or "\x00" in name or "\n" in name:
        raise UserError(f"{what}: {name!r} is not a valid name")
    if os.path.isabs(name) or name.startswith("~"):
        raise UserError(f"{what}: {name!r} is an absolute path; only a name inside its directory is allowed")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise UserError(f"{what}: {name!r} contains `..`; only a name inside its directory is allowed")
    return name


def child(dir: str | Path, name, what: str) -> Path:
    """`dir / name`, refusing (UserError naming `what`, e.g. the file the name was read from or the flag) any name
    that is absolute, contains `..`, or resolves, symlinks included, outside `dir`. The path need not exist."""
    check_name(name, what)
    d = Path(dir)
    p = d / name
    if not _inside(p.resolve(), _roots(d)):
        raise UserError(f"{what}: {name!r} resolves outside {d} (symlink to {p.resolve()})")
    return p


def _as_pairs(inputs) -> list[tuple[str | None, str]]:
    out = []
    for item in inputs:
        flag, path = item if isinstance(item, tuple) else (None, item)
        if path is None or str(path) == "":
            continue
        out.append((flag, str(path)))
    return out


def check_apart(out, inputs, what: str = "--out") -> None:
    """No command writes over or inside one of its inputs: `out` (a file or directory the command creates, replaces
    or writes into) and each of `inputs` (paths it reads; plain paths or (flag, path) pairs, None skipped) are apart —
    neither is, nor lies inside, the other (symlinks resolved, so a link to the model counts as the model). The one
    check every writer calls before writing anything (UserError naming both)."""
    if out is None:
        return
    real = Path(out).expanduser().resolve()
    for flag, src in _as_pairs(inputs):
        s = Path(src).expanduser().resolve()
        named = f"{flag} {src}" if flag else src
        if s == real:
            how = "is the input"
        elif s.is_relative_to(real):
            how = "contains the input"
        elif real.is_relative_to(s):
            how = "is inside the input"
        else:
            continue
        raise UserError(f"{what} {out} {how} {named}; write the output elsewhere")
