"""Write a small built-in example: OUT/dense (a tiny random dense model with a character-level tokenizer and chat
template) and OUT/train.jsonl (synthetic prompt/response rows) — enough to try upcycle, train and convert in seconds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from ..io.hf import check_output_dir


@dataclass(kw_only=True)
class Args:
    out: str
    """Directory to create (must not exist)."""
    family: Literal["llama", "mistral", "qwen2", "qwen3"] = "llama"
    """Model family of the tiny dense model."""
    rows: int = 400
    """Synthetic training rows."""
    seed: int = 0
    """Seed for weights and data."""


def run(args: Args) -> int:
    from ..demo import make_demo

    check_output_dir(args.out, overwrite=False)
    dense, data = make_demo(args.out, args.family, args.rows, args.seed)
    print(f"wrote {dense} and {data}", file=sys.stderr)
    return 0
