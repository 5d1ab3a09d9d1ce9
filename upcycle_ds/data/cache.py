"""The on-disk data cache: where it lives, what keys it, and how entries are published atomically.

Root: `DataConfig.cache_dir` (`--data-cache`), else ``$UPCYCLE_DS_DATA_CACHE``, else
``$XDG_CACHE_HOME/upcycle_ds/data`` (``~/.cache/upcycle_ds/data``). Under it:

    tokens/KEY/   one tokenised source (store.py); KEY = hash of the source's files (paths, sizes, mtimes) or hub
                  fingerprint, the tokenizer (its full serialisation and chat template), the TokenizeSpec (max length,
                  prompt format, label field, loss turns), the row subset, and the format version
    splits/KEY/   a train/eval split and packing plan over tokens/ entries (split.py); KEY adds seed, eval fraction,
                  max_samples, mixing weights and packing
    hf/           `datasets`' own Arrow copies of json/parquet sources and hub downloads
    locks/        one lock file per key being built

Every entry is built in a temp dir beside it and renamed into place, so a reader sees a complete entry or none. A
lock file (flock) makes concurrent builders of one key wait for the first instead of repeating its work; if locks
do not work (some network filesystems), two builders both build and the rename keeps exactly one. A builder that was
killed (kill -9) leaves its temp dir `.KEY.tmp-*`: the next run removes every temp dir whose key no live builder
holds (`remove_stale`). An entry is
never modified after publication; delete the cache root (or an entry) at any time to reclaim space — it is rebuilt
identically on the next run (a resumed run then re-tokenises, and continues exactly).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..io.atomic import make_public

log = logging.getLogger(__name__)

ENV = "UPCYCLE_DS_DATA_CACHE"
KEY_RE = re.compile(r"^[0-9a-f]{32}$")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "upcycle_ds" / "data"


def key_of(obj) -> str:
    """32 hex chars of sha256 over a JSON-serialisable description."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides token ids: the fast tokenizer's full JSON (vocab, merges, normalizer,
    pre-tokenizer, post-processor (BOS/EOS insertion), added tokens), else the vocab; the chat template and the
    special tokens. The tokenizer's name or path is not part of it (a copied tokenizer hits the same cache)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({"chat_template": tokenizer.chat_template, "special": tokenizer.special_tokens_map,
                         "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
                         "n": len(tokenizer)}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


@contextlib.contextmanager
def _lock(root: Path, key: str):
    locks = root / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # no locking on this filesystem: the atomic rename still keeps one entry
            pass
        yield


def remove_stale(root: Path) -> list[Path]:
    """Remove the temp dirs of builders that died (kill -9, a node crash): a `.KEY.tmp-*` under tokens/ or splits/
    whose key's lock nobody holds. A live builder holds its key's lock for as long as its temp dir exists, so its
    work is never touched. Nothing is removed where locks do not work or the cache is read-only."""
    gone = []
    for kind in ("tokens", "splits"):
        d = Path(root) / kind
        try:
            temps = [p for p in d.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
        except OSError:
            continue
        for tmp in temps:
            key = tmp.name[1:].split(".tmp-", 1)[0]
            if not KEY_RE.match(key):
                continue
            try:
                with open(Path(root) / "locks" / f"{kind}-{key}.lock", "a+") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: its builder is gone
                    shutil.rmtree(tmp, ignore_errors=True)
                    gone.append(tmp)
            except OSError:
                continue
    if gone:
        log.warning("data cache %s: removed %d temp dir(s) left by killed runs", root, len(gone))
    return gone


def publish(final: Path, build: Callable[[Path], None]) -> Path:
    """`final` if it exists; else `build(tmp)` into a temp dir beside it and rename it to `final` (atomic).

    Losing a race (someone else published first) is not an error: their entry is used and ours removed."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent.parent, f"{final.parent.name}-{final.name}"):
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            make_public(tmp)  # a shared cache: entries get the umask's modes, like the files in them
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # lost the race: the winner's entry is identical
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def entry(root: Path, kind: str, key: str) -> Path:
    """The path of a cache entry; `key` is checked (keys are read back from meta files, which are input)."""
    if kind not in ("tokens", "splits") or not KEY_RE.match(key):
        raise ValueError(f"bad data cache entry {kind}/{key!r}")
    return root / kind / key
