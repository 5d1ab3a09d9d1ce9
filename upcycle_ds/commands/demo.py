"""Write a small built-in example: OUT/dense (a tiny random dense model with a character-level tokenizer and chat
template), OUT/train.jsonl (synthetic prompt/response rows "a+b=" -> "a+b") and OUT/heldout.jsonl (100 sums that are
not in train.jsonl) -- enough to try upcycle, train, eval and convert in seconds. The model is random, not
pretrained: the demo shows that the pipeline works end to end, not what upcycling gains (bench/upcycle_quality.py
measures that; docs/benchmarks.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from ..errors import UserError


@dataclass(kw_only=True)
class Args:
    out: str
    """Directory to create (must not exist unless --overwrite)."""
    family: Literal["llama", "mistral", "qwen2", "qwen3"] = "llama"
    """Model family of the tiny dense model."""
    rows: int = 400
    """Synthetic training rows (heldout.jsonl always has 100)."""
    seed: int = 0
    """Seed for weights and data."""
    overwrite: bool = False
    """Replace OUT if it exists (only after the new one is complete)."""


    def __post_init__(self):
        if self.rows < 1:
            raise UserError(f"--rows must be >= 1 (got {self.rows})")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0 (got {self.seed})")


def run(args: Args) -> int:
    from ..demo import make_demo

    dense, data, heldout = make_demo(args.out, args.family, args.rows, args.seed, overwrite=args.overwrite)
    print(f"wrote {dense}, {data} and {heldout} (held-out rows)", file=sys.stderr)
    return 0
