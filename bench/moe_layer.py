"""One `UpcycledMoE` layer, forward + backward: grouped-GEMM experts vs the per-expert loop, and what stacking the
experts' weights costs the grouped path.

For each configuration E:m (E experts of intermediate size I/m, top-k fixed) the same layer and the same tokens are
timed with expert_impl="grouped" and "loop", interleaved round by round (one grouped step, one loop step, ...), and
"grouped" once more on a copy of the layer whose expert parameters were flattened into one buffer the way DeepSpeed's
ZeRO-1/2 and bf16 optimizers do it (there the grouped path views the weights instead of copying them):
forward (route -> dispatch -> compute -> combine) and backward of a fixed random projection of the output plus the
aux loss. The stacking the grouped path does at every forward (gate+up into one [E, 2I, H] operand, down into
[E, H, I]) and the backward of that stacking (handing each expert its gradient slice) are timed alone on the same
weights, as a share of the grouped step. Figures are medians over rounds of the process's CPU time (wall time too);
ratios are medians of per-round ratios. ep=1, one process.

    .venv/bin/python bench/moe_layer.py --threads 1                    # H256 I688 T1024 k2 fp32; E=8; 32 x 176; 64 x 88
    .venv/bin/python bench/moe_layer.py --threads 1 --dtype bf16
"""

from __future__ import annotations

import argparse
import copy
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
    a("--intermediate", type=int, default=688,
      help="intermediate size I; configuration E:m (m > 1) uses I/m rounded up to a multiple of 8 (grouped GEMM "
           "needs 16-byte rows: multiples of 4 in fp32, 8 in bf16)")
    a("--configs", default="8:1,32:4,64:8", help="comma-separated E:m (E experts of intermediate I/m)")
    a("--top-k", type=int, default=2)
    a("--tokens", type=int, default=1024)
    a("--dtype", choices=sorted(DTYPES), default="fp32")
    a("--device", default="cpu", help="cpu | cuda (on a GPU read the wall-clock figures: CPU time means nothing)")
    a("--warmup", type=int, default=3)
    a("--rounds", type=int, default=15)
    a("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    a("--json", type=Path, help="also write the results here")
    return p.parse_args()


class Timer:
    def __init__(self, device: torch.device):
        self.times = {c: {} for c in CLOCKS}
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, key: str, fn):
        self.sync()
        start = {c: f() for c, f in CLOCKS.items()}
        out = fn()
        self.sync()
        for c, f in CLOCKS.items():
            self.times[c].setdefault(key, []).append(f() - start[c])
        return out

    def median(self, clock: str, key: str) -> float:
        return statistics.median(self.times[clock][key])

    def ratio(self, clock: str, num: str, den: str) -> float:
        return statistics.median(a / b for a, b in zip(self.times[clock][num], self.times[clock][den]))


def build(args, experts: int, inter: int, dtype, device: torch.device):
    from upcycle_ds.moe.layer import UpcycledMoE

    torch.manual_seed(0)
    moe = UpcycledMoE(hidden_size=args.hidden, intermediate_size=inter, num_experts=experts, top_k=args.top_k)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.05)
    moe = moe.to(device=device, dtype=dtype).train()
    x = torch.randn(args.tokens, args.hidden, dtype=dtype, device=device)
    proj = torch.randn(args.tokens, args.hidden, dtype=dtype, device=device)
    return moe, x, proj


def flattened(moe):
    """A copy of `moe` whose expert parameters are views of one flat buffer, as DeepSpeed's optimizers leave them."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from upcycle_ds.moe.experts import stacking_is_zero_copy

    moe = copy.deepcopy(moe)
    params = list(moe.local_experts.parameters())
    flat = _flatten_dense_tensors([p.data for p in params])
    for p, view in zip(params, _unflatten_dense_tensors(flat, [p.data for p in params])):
        p.data = view
    assert stacking_is_zero_copy(moe.local_experts)
    return moe


def step(timer: Timer, moe, x, proj, impl: str, key: str | None = None) -> None:
    key = key or impl
    moe.expert_impl = impl
    moe.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_()
    loss = timer(f"{key} fwd", lambda: (moe(xi) * proj).sum() + 0.01 * moe.router.aux_loss)
    timer(f"{key} bwd", loss.backward)


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

    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    rows = []
    for spec in args.configs.split(","):
        experts, m = (int(v) for v in spec.split(":"))
        inter = -(-args.intermediate // m // 8) * 8 if m > 1 else args.intermediate  # I/m, up to a multiple of 8
        runs = resolve_expert_impl("grouped", device, dtype, args.hidden, inter)
        moe, x, proj = build(args, experts, inter, dtype, device)
        flat = flattened(moe)
        timer = Timer(device)
        for i in range(args.warmup + args.rounds):
            if i == args.warmup:
                timer = Timer(device)
            step(timer, moe, x, proj, "grouped")
            step(timer, moe, x, proj, "loop")
            step(timer, flat, x, proj, "grouped", "zero-copy")
            stacking(timer, moe)
        for impl in ("grouped", "loop", "zero-copy", "stack"):
            for c in CLOCKS:
                timer.times[c][f"{impl} step"] = [f + b for f, b in zip(timer.times[c][f"{impl} fwd"],
                                                                        timer.times[c][f"{impl} bwd"])]
        row = {"E": experts, "I": inter, "grouped_runs": runs}
        for c in CLOCKS:
            for impl in ("grouped", "loop", "zero-copy", "stack"):
                for part in ("fwd", "bwd", "step"):
                    row[f"{c} {impl} {part} ms"] = 1e3 * timer.median(c, f"{impl} {part}")
            for part in ("fwd", "bwd", "step"):
                row[f"{c} grouped/loop {part}"] = timer.ratio(c, f"grouped {part}", f"loop {part}")
                row[f"{c} zero-copy/loop {part}"] = timer.ratio(c, f"zero-copy {part}", f"loop {part}")
            row[f"{c} stack/grouped step"] = timer.ratio(c, "stack step", "grouped step")
        rows.append(row)

    print(f"H={args.hidden} T={args.tokens} k={args.top_k} {args.dtype} {device} threads={torch.get_num_threads()} "
          f"rounds={args.rounds}; medians of CPU time, [wall] in brackets; ratios < 1: grouped is faster")
    print("| E | I | loop fwd / bwd ms | grouped fwd / bwd ms | grouped/loop fwd | bwd | step | stacking copy fwd+bwd "
          "ms (share of grouped step) | zero-copy grouped/loop step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        note = "" if r["grouped_runs"] == "grouped" else " (unaligned: grouped ran the loop)"
        print(f"| {r['E']} | {r['I']}{note} | {r['cpu loop fwd ms']:.1f} / {r['cpu loop bwd ms']:.1f} "
              f"| {r['cpu grouped fwd ms']:.1f} / {r['cpu grouped bwd ms']:.1f} "
              f"| {r['cpu grouped/loop fwd']:.3f} [{r['wall grouped/loop fwd']:.3f}] "
              f"| {r['cpu grouped/loop bwd']:.3f} [{r['wall grouped/loop bwd']:.3f}] "
              f"| **{r['cpu grouped/loop step']:.3f}** [{r['wall grouped/loop step']:.3f}] "
              f"| {r['cpu stack step ms']:.2f} ({100 * r['cpu stack/grouped step']:.1f} %) "
              f"| **{r['cpu zero-copy/loop step']:.3f}** [{r['wall zero-copy/loop step']:.3f}] |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
