"""Score HF checkpoints (dense or MoE: Llama, Mistral, Qwen2/3, Mixtral, Qwen2-MoE, Qwen3-MoE, ...) on a jsonl of
evaluation rows: multiple choice by log-likelihood (`choices` + `answer`), exact match of greedy answers (`ideal`),
and held-out LM loss (training rows: `text`, `messages`, `prompt` + `response`), per task and overall, each with
its standard error. With several models (--model A B ...) every model is compared with the first on the same rows
(McNemar's exact test for right/wrong, paired t-test for losses). --out writes every row's prediction and score as
JSON. See docs/eval.md.

    upcycle-ds eval --model runs/moe/hf --data test.jsonl
    upcycle-ds eval --model dense=runs/dense/hf moe=runs/moe/hf --data test.jsonl --out results.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import UserError


@dataclass(kw_only=True)
class Args:
    model: list[str]
    """HF checkpoint dir(s), each optionally named NAME=DIR. The first is the baseline of the paired tests."""
    data: str
    """Evaluation rows (.jsonl; also .json/.parquet/.arrow/save_to_disk): `choices`+`answer`, `ideal`, or training
    rows (`text`, `messages`, `prompt`+`response`); optional `task`. See docs/eval.md."""
    out: str | None = None
    """Write results JSON here (metrics, paired tests, per-row predictions); written atomically."""
    mode: Literal["auto", "loss", "choice", "generate"] = "auto"
    """auto: every score a row supports; otherwise only this one (rows that lack it are an error)."""
    max_length: int = 2048
    """Tokens per packed scoring sequence; a loss row longer than this is truncated as in training, a choice or
    answer that does not fit is an error."""
    micro_batch_size: int = field(default=8, metadata={"aliases": ["batch_size"]})
    """Sequences per forward pass (packed rows for log-likelihoods, prompts for generation)."""
    max_new_tokens: int = 32
    """Greedy decoding length for `ideal` rows."""
    max_rows: int | None = field(default=None, metadata={"aliases": ["max_rows_per_task"]})
    """Only the first N rows of each task (quick checks; all rows without a `task` are one task)."""
    device: str = "auto"
    """cuda, cpu, cuda:1, ... (auto: cuda if available)."""
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    """Weights and compute dtype (auto: bf16 on GPU, fp32 on CPU). Log-probs are always computed in fp32."""
    trust_remote_code: bool = False
    """Allow the checkpoint's own code (off unless you ask)."""


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    """NAME=DIR or DIR (named by the dir path) -> [(name, dir)]; names must be unique."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        if "=" in spec and not Path(spec).exists():
            name, path = spec.split("=", 1)
        else:
            name, path = spec, spec
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"--model {spec}: {path} is not an HF checkpoint dir (no config.json)")
        if not name or name in {n for n, _ in out}:
            raise UserError(f"--model {spec}: give every model a distinct NAME=DIR")
        out.append((name, path))
    return out


def run(args: Args) -> int:
    from ..eval.evaluate import EvalOptions, compare, comparison_lines, evaluate_model, table
    from ..eval.rows import load_rows

    if args.max_length < 2 or args.micro_batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--max-length must be >= 2, --micro-batch-size and --max-new-tokens >= 1")
    if args.max_rows is not None and args.max_rows < 1:
        raise UserError("--max-rows must be >= 1")
    if args.out is not None and not Path(args.out).parent.is_dir():
        raise UserError(f"--out {args.out}: directory {Path(args.out).parent} does not exist")
    models = parse_models(args.model)
    rows = load_rows(args.data, args.mode, args.max_rows)
    from ..data.sources import local_paths
    from ..io.paths import check_apart

    check_apart(args.out, [*(("--model", p) for _, p in models), *(("--data", p) for p in local_paths(args.data))])
    opts = EvalOptions(max_length=args.max_length, micro_batch_size=args.micro_batch_size, max_new_tokens=args.max_new_tokens,
                       device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    results = {}
    for name, path in models:
        log(f"[upcycle-ds eval] {name}: {path} on {len(rows)} rows of {args.data}")
        results[name] = evaluate_model(path, rows, opts, log=log)
    base = models[0][0]
    comparisons = {name: compare(results[base], results[name]) for name, _ in models[1:]}
    print(table(results))
    for name, tests in comparisons.items():
        print()
        print("\n".join(comparison_lines(base, name, tests)))
    if args.out is not None:
        from ..io.atomic import write_text_atomic

        write_text_atomic(args.out, json.dumps({"data": args.data, "rows": len(rows), "baseline": base,
                                                "models": results, "comparisons": comparisons}, indent=1,
                                               ensure_ascii=False))
        log(f"[upcycle-ds eval] wrote {args.out}")
    return 0
