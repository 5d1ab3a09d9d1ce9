"""UpIT router seed data: take a random fraction of the training set (default 1%), score every sample's perplexity
(response tokens only) under every expert's dense model, and label it with its lowest-perplexity expert. Writes OUT
(jsonl: {"index", "expert", "ppl": [per expert], ...original fields}) and OUT_STEM_report.json (per-expert counts).
Expert i is the i-th --experts checkpoint; with --moe (an assembled MoE with more experts than checkpoints), experts
beyond them are the last checkpoint with that expert's MLPs swapped in.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import UserError
from ..io.atomic import write_text_atomic
from ..io.text import check_utf8
from ..upit.seed_data import ExpertModels, SeedRows, output_rows, select


@dataclass(kw_only=True)
class Args:
    experts: list[str]
    """Dense checkpoint dirs that became the experts, in expert order (for upit-assemble: the last E given)."""
    data: list[str]
    """The training set: one or more sources as for `upcycle-ds train --data` (files, globs, dirs, hub names; weights
    are ignored), read and tokenised exactly as training does."""
    out: str
    """Output jsonl of the selected samples with their expert; the report goes next to it as STEM_report.json."""
    moe: str | None = None
    """Assembled MoE checkpoint, needed when it has more experts than --experts (the expanded ones)."""
    fraction: float = 0.01
    """Fraction of the training set to select (UpIT: 1%)."""
    min_samples: int = 1
    """Select at least this many samples (at most the whole set)."""
    seed: int = 0
    """Seed of the random selection."""
    max_length: int | None = None
    """Truncate samples to this many tokens, as training does (None = no truncation)."""
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    """How prompt/response rows are rendered; keep training's (auto: chat template if the tokenizer has one)."""
    data_cache: str | None = None
    """Data cache root (datasets' copies of the sources); default as for training."""
    batch_size: int = 8
    """Samples per forward pass."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the expert models are scored in."""
    device: str = "auto"
    """torch device for scoring; auto = cuda if available, else cpu."""
    overwrite: bool = False
    """Replace OUT and its report if they exist."""


def run(args: Args) -> int:
    out = Path(args.out)
    report_path = out.with_name(out.stem + "_report.json")
    for p in (out, report_path):
        if p.exists() and not args.overwrite:
            raise UserError(f"{p} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: parent directory does not exist")
    if out.is_dir():
        raise UserError(f"{out} is a directory; --out names the output jsonl file")
    from ..data.sources import parse_sources

    local = [Path(spec.path) for spec in parse_sources(args.data) if Path(spec.path).is_file()]
    for p in (out, report_path):
        if any(p.resolve() == d.resolve() for d in local):
            raise UserError(f"{p} is the input --data; write the output elsewhere")
    if not 0 < args.fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1] (got {args.fraction})")
    if args.min_samples < 0:
        raise UserError(f"--min-samples must be >= 0 (got {args.min_samples})")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length must be >= 2 (got {args.max_length})")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    for d in local:
        check_utf8(d, "--data")

    models = ExpertModels(args.experts, args.moe)
    rows = SeedRows(args.data, args.data_cache)
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.experts[0])
    except (OSError, ValueError) as e:
        raise UserError(f"--experts {args.experts[0]}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    sel = select(rows, models, tokenizer, fraction=args.fraction, min_samples=args.min_samples, seed=args.seed,
                 max_length=args.max_length, prompt_format=args.prompt_format, batch_size=args.batch_size,
                 dtype=getattr(torch, args.dtype), device=device)
    E = models.num_experts
    counts = sel.counts(E)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in output_rows(rows, sel)]
    report = {
        "data": args.data if isinstance(args.data, str) else list(args.data), "num_rows": len(rows),
        "num_selected": len(sel.indices) + len(sel.skipped),
        "num_scored": len(sel.indices), "skipped_no_response_tokens": sel.skipped,
        "fraction": args.fraction, "min_samples": args.min_samples, "seed": args.seed, "max_length": args.max_length,
        "experts": [{"expert": e, "model": models.source(e), "samples": counts[e],
                     "mean_nll": (float(sel.nll[:, e].mean()) if len(sel.indices) else None)} for e in range(E)],
        "counts": counts,
    }
    write_text_atomic(out, "".join(lines))
    write_text_atomic(report_path, json.dumps(report, indent=2) + "\n")
    print(f"seed data: {len(sel.indices)} of {len(rows)} rows scored by {E} experts -> {out}", file=sys.stderr)
    for e in range(E):
        print(f"  expert {e}: {counts[e]} samples  ({models.source(e)})", file=sys.stderr)
    if sel.skipped:
        print(f"  skipped {len(sel.skipped)} rows with no response tokens", file=sys.stderr)
    return 0
