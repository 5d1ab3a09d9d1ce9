"""A real text corpus that every machine has without a hub: the running interpreter's own standard library source.

`Lib/**/*.py` of `sysconfig.get_paths()["stdlib"]` (site-packages / dist-packages excluded; PSF licence), read as
UTF-8 (files that are not valid UTF-8 are skipped: a few test fixtures). Files are split into train and held-out
**by file**, by a hash of their path relative to the stdlib root, so the split does not depend on which other files
exist (Python 3.11 here, 3.12 on the GPU machine) and no held-out file shares text with a training file.

Each file becomes rows of at most `chunk_chars` characters cut at line ends (a longer single line is cut inside),
written as `{"text": ...}` jsonl rows — `upcycle-ds train`/`sft` then put the loss on every token (plain language
modelling) and pack the rows into fixed-length sequences.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of every readable .py file of the standard library, sorted by path."""
    root = root or stdlib_root()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append((rel, text))
    return out


def held_out(rel: str, percent: int) -> bool:
    """A file is held out when the first 8 bytes of sha256(path) mod 100 < percent (stable across machines)."""
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little") % 100 < percent


def chunks(text: str, chunk_chars: int) -> list[str]:
    """Consecutive pieces of at most chunk_chars characters, cut after a newline where possible."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            if nl > start:
                end = nl + 1
        piece = text[start:end]
        if piece.strip():
            out.append(piece)
        start = end
    return out


@dataclass(kw_only=True)
class CorpusSplit:
    pretrain: list[str]
    cont: list[str]
    heldout: list[str]
    summary: dict
    heldout_pool: list[tuple[str, str]]
    """(relative path, chunk) of every held-out chunk, in the shuffled order `heldout` is the first rows of."""


def file_type(rel: str) -> str:
    """What kind of source a stdlib file is (the specialisation view's categories): `test` (a test module or
    fixture: a file under a test/tests/idle_test directory or named test_*.py), `encodings` (the codec modules,
    mostly character tables), `pydoc_data` (the English text of pydoc's topics) or `library` (all other modules)."""
    parts = rel.split("/")
    if any(p in ("test", "tests", "idle_test") for p in parts[:-1]) or parts[-1].startswith("test_"):
        return "test"
    if parts[0] in ("encodings", "pydoc_data"):
        return parts[0]
    return "library"


FILE_TYPES = ("library", "test", "encodings", "pydoc_data")


def build_split(*, chunk_chars: int, heldout_percent: int, heldout_rows: int, seed: int = 0,
                root: Path | None = None) -> CorpusSplit:
    """Train files -> chunks, shuffled (seed) and halved into `pretrain` and `cont` (the continuation phase sees text
    the pretraining did not); held-out files -> chunks, shuffled, the first `heldout_rows` kept."""
    files = stdlib_files(root)
    train_chunks, held, n_held = [], [], 0
    for rel, text in files:
        if held_out(rel, heldout_percent):
            n_held += 1
            held += [(rel, c) for c in chunks(text, chunk_chars)]
        else:
            train_chunks += chunks(text, chunk_chars)
    random.Random(f"{seed}-train").shuffle(train_chunks)
    random.Random(f"{seed}-heldout").shuffle(held)  # the permutation depends only on the length: as for the texts
    held_chunks = [c for _, c in held]
    half = len(train_chunks) // 2
    summary = {"source": f"Python {sys.version.split()[0]} standard library, *.py",
               "files": len(files), "heldout_files": n_held, "chunk_chars": chunk_chars,
               "train_chars": sum(map(len, train_chunks)), "train_chunks": len(train_chunks),
               "heldout_chunks_used": min(heldout_rows, len(held_chunks)), "heldout_chunks": len(held_chunks)}
    return CorpusSplit(pretrain=train_chunks[:half], cont=train_chunks[half:], heldout=held_chunks[:heldout_rows],
                       summary=summary, heldout_pool=held)


def rows_by_type(pool: list[tuple[str, str]], per_type: int) -> list[dict]:
    """Up to `per_type` held-out chunks of each `file_type`, in pool order: {"text", "type", "path"} rows."""
    taken = {t: 0 for t in FILE_TYPES}
    out = []
    for rel, text in pool:
        t = file_type(rel)
        if taken[t] < per_type:
            taken[t] += 1
            out.append({"text": text, "type": t, "path": rel})
    return out


def write_text_rows(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
