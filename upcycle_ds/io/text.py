"""Text data files are untrusted input too: a file that is not UTF-8 is one error line naming the file and line."""

from __future__ import annotations

import codecs
from pathlib import Path

from ..errors import UserError

TEXT_SUFFIXES = (".json", ".jsonl", ".txt", ".yaml", ".yml")


def check_utf8(path: str | Path, flag: str) -> None:
    """UserError naming the first line that is not UTF-8, for a text data file (`TEXT_SUFFIXES`; other files, e.g.
    parquet, and dirs are left to their readers). Reads the file once in 1 MiB chunks."""
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in TEXT_SUFFIXES:
        return
    dec = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as e:
                # e.start is relative to the decoder's pending bytes + this chunk; count the lines before it
                bad = max(0, e.start - (len(e.object) - len(chunk)))
                at = line + chunk.count(b"\n", 0, bad)
                raise UserError(f"{flag} {path}: line {at} is not UTF-8 text ({e.reason})") from None
            line += chunk.count(b"\n")
        try:
            dec.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise UserError(f"{flag} {path}: line {line} is not UTF-8 text ({e.reason})") from None
