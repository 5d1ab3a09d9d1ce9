"""UpIT router seed data: take a random fraction of the training set (default 1%), score every sample's perplexity
(response tokens only) under every expert's dense model, and label it with its lowest-perplexity expert. Writes the
dir OUT: seed.jsonl ({"index", "expert", "ppl": [per expert], ...original fields}; router-init's --data) and
seed_report.json (per-expert counts).
Expert i is the i-th --experts checkpoint; with --moe (an assembled MoE with more experts than checkpoints), experts
beyond them are the last checkpoint with that expert's MLPs swapped in.
"""

from __future__ import annotations

import sys

from ..upit.config import SeedDataConfig

Args = SeedDataConfig


def run(args: SeedDataConfig) -> int:
    from ..upit.seed_data import run_seed_data

    res = run_seed_data(args)
    rep = res.report
    unit = "expert" if rep["granularity"] == 1 else "copy"
    print(f"seed data: {rep['num_scored']} of {rep['num_rows']} rows scored by {len(rep['counts'])} {unit} models "
          f"-> {res.out}", file=sys.stderr)
    for e, n in enumerate(rep["counts"]):
        print(f"  {unit} {e}: {n} samples  ({res.sources[e]})", file=sys.stderr)
    if rep["skipped_no_response_tokens"]:
        print(f"  skipped {len(rep['skipped_no_response_tokens'])} rows with no response tokens", file=sys.stderr)
    return 0
