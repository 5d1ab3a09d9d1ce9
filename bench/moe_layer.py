"""One `UpcycledMoE` layer, forward + backward: grouped-GEMM experts vs the per-expert loop, and what stacking the
experts' weights costs the grouped path.

For each configuration E:m (E experts of intermediate size I/m, top-k fixed) the same layer and the same tokens are
timed with expert_impl="grouped" and "loop", interleaved round by round (one grouped step, one loop step, ...):
forward (route -> dispatch -> compute -> combine) and backward of a fixed random projection of the output plus the
aux loss. The stacking the grouped path does at every forward (gate+up into one [E, 2I, H] operand, down into
[E, H, I]) and the backward of that stacking (handing each expert its gradient slice) are timed alone on the same
weights, as a share of the grouped step. Figures are medians over rounds of the process's CPU time (wall time too);
ratios are medians of per-round ratios. ep=1, one process.

    .venv/bin/python bench/moe_layer.py --threads 1                      # H256 I688 T1024 k2 fp32; E=8, 32:I/4, 64:I/8
    .venv/bin/python bench/moe_layer.py --threads 1 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--hidden", type=int, default=256)
    a("--intermediate", type=int, default=688, help="dense intermediate size I; configuration E:m uses I/m")
    a("--configs", default="8:1,32:4,64:8", help="comma-separated E:m (E experts of intermediate I/m)")
    a("--top-k", type=int, default=2)
    a("--tokens", type=int, default=1024)
    a("--dtype", choices=sorted(DTYPES), default="fp32")
    a("--warmup", type=int, default=3)
    a("--rounds", type=int, default=15)
    a("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    a("--json", type=Path, help="also write the results here")
    return p.parse_args()


class Timer:
    def __init__(self):
        self.times = {c: {} for c in CLOCKS}

    def __call__(self, key: str, fn):
        start = {c: f() for c, f in CLOCKS.items()}
        out = fn()
        for c, f in CLOCKS.items():
            self.times[c].setdefault(key, []).append(f() - start[c])
        return out

    def median(self, clock: str, key: str) -> float:
        return statistics.median(self.times[clock][key])

    def ratio(self, clock: str, num: str, den: str) -> float:
        return statistics.median(a / b for a, b in zip(self.times[clock][num], self.times[clock][den]))


def build(args, experts: int, inter: int, dtype):
    from upcycle_ds.moe.layer import UpcycledMoE

    torch.manual_seed(0)
    moe = UpcycledMoE(hidden_size=args.hidden, intermediate_size=inter, num_experts=experts, top_k=args.top_k)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.05)
    moe = moe.to(dtype).train()
    x = torch.randn(args.tokens, args.hidden, dtype=dtype)
    proj = torch.randn(args.tokens, args.hidden, dtype=dtype)
    return moe, x, proj


def step(timer: Timer, moe, x, proj, impl: str) -> None:
    moe.expert_impl = impl
    moe.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_()
    loss = timer(f"{impl} fwd", lambda: (moe(xi) * proj).sum() + 0.01 * moe.router.aux_loss)
    timer(f"{impl} bwd", loss.backward)


def stacking(timer: Timer, moe) -> None:
    """The grouped path's weight stacking alone: forward (the copies) and backward (the gradient slices)."""
    experts = moe.local_experts
    for p in experts.parameters():
        p.grad = None
    E = len(experts)
    I, H = experts[0].gate_proj.weight.shape

    def fwd():
        gate_up = [w for e in experts for w in (e.gate_proj.weight, e.up_proj.weight)]
        return torch.cat(gate_up).view(E, 2 * I, H), torch.stack([e.down_proj.weight for e in experts])

    w_gu, w_down = timer("stack fwd", fwd)
    g_gu, g_down = torch.ones_like(w_gu), torch.ones_like(w_down)
    timer("stack bwd", lambda: torch.autograd.backward([w_gu, w_down], [g_gu, g_down]))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from upcycle_ds.moe.experts import resolve_expert_impl

    dtype = DTYPES[args.dtype]
    rows = []
    for spec in args.configs.split(","):
        experts, m = (int(v) for v in spec.split(":"))
        inter = args.intermediate // m
        runs = resolve_expert_impl("grouped", torch.device("cpu"), dtype, args.hidden, inter)
        moe, x, proj = build(args, experts, inter, dtype)
        timer = Timer()
        for i in range(args.warmup + args.rounds):
            if i == args.warmup:
                timer = Timer()
            step(timer, moe, x, proj, "grouped")
            step(timer, moe, x, proj, "loop")
            stacking(timer, moe)
        for impl in ("grouped", "loop", "stack"):
            for c in CLOCKS:
                timer.times[c][f"{impl} step"] = [f + b for f, b in zip(timer.times[c][f"{impl} fwd"],
                                                                        timer.times[c][f"{impl} bwd"])]
        row = {"E": experts, "I": inter, "grouped_runs": runs}
        for c in CLOCKS:
            for key in ("grouped fwd", "grouped bwd", "grouped step", "loop fwd", "loop bwd", "loop step",
                        "stack fwd", "stack bwd"):
                row[f"{c} {key} ms"] = 1e3 * timer.median(c, key)
            for part in ("fwd", "bwd", "step"):
                row[f"{c} grouped/loop {part}"] = timer.ratio(c, f"grouped {part}", f"loop {part}")
            row[f"{c} stack/grouped step"] = timer.ratio(c, "stack step", "grouped step")
        rows.append(row)

    print(f"H={args.hidden} T={args.tokens} k={args.top_k} {args.dtype} threads={torch.get_num_threads()} "
          f"rounds={args.rounds} (medians; CPU time, wall in brackets)")
    print("| E | I | grouped fwd / bwd ms | loop fwd / bwd ms | grouped/loop fwd | bwd | step | stacking fwd+bwd ms "
          "| stacking / grouped step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        note = "" if r["grouped_runs"] == "grouped" else " (grouped fell back to loop)"
        print(f"| {r['E']} | {r['I']}{note} | {r['cpu grouped fwd ms']:.1f} / {r['cpu grouped bwd ms']:.1f} "
              f"| {r['cpu loop fwd ms']:.1f} / {r['cpu loop bwd ms']:.1f} "
              f"| {r['cpu grouped/loop fwd']:.3f} [{r['wall grouped/loop fwd']:.3f}] "
              f"| {r['cpu grouped/loop bwd']:.3f} [{r['wall grouped/loop bwd']:.3f}] "
              f"| **{r['cpu grouped/loop step']:.3f}** [{r['wall grouped/loop step']:.3f}] "
              f"| {r['cpu stack fwd ms'] + r['cpu stack bwd ms']:.2f} "
              f"| {100 * r['cpu stack/grouped step']:.1f} % |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
