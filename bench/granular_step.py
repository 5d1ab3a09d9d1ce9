"""Training step time of a fine-grained MoE vs a coarse MoE of equal active FLOPs, both upcycled from one dense Llama,
with grouped-GEMM and per-expert-loop experts, on the `Trainer` that `upcycle-ds train` runs.

From one random dense Llama (bench/step_time.py's `write_inputs`: a character tokenizer and synthetic text rows),
`upcycle-ds upcycle` writes two HF MoE checkpoints:

  coarse   --num-experts C --top-k k                        experts of the dense intermediate size I
  fine     --num-experts C*G --top-k k*G --granularity G    experts of I/G: each token visits k*G slices of I/G
                                                            neurons = the same expert FLOPs as k experts of I
and the bench builds one Trainer per arm — dense, then coarse and fine for every --expert-impl — which take turns,
one step each per round (a shared machine's noise hits every arm alike); medians over --steps after --warmup, as in
bench/step_time.py (wall and process CPU time; the optimizer step timed separately).

The fine/coarse FLOP-ideal ratio is ~1 (only the router grows: `upcycle_ds.flops.train_flops_per_token`), so the
measured ratio is the cost of granularity itself: G times more token-slots to dispatch and combine, and G times more,
G times smaller expert matmuls — which a grouped GEMM runs as one call.

    .venv/bin/python bench/granular_step.py --threads 1                      # h256/i688/4L, G=4: E=8 k=2 vs E=32 k=8
    .venv/bin/python bench/granular_step.py --threads 1 --granularity 8      # E=64 k=16 (I/G = 86)
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 bench/granular_step.py --ep-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from step_time import finish, one_step, trainer_arm, write_inputs  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--hidden", type=int, default=256)
    a("--intermediate", type=int, default=688)
    a("--layers", type=int, default=4)
    a("--heads", type=int, default=4)
    a("--vocab", type=int, default=4096)
    a("--seq", type=int, default=256)
    a("--mbs", type=int, default=4)
    a("--copies", type=int, default=8, help="C: coarse experts, and copies of the G slices in the fine model")
    a("--top-k", type=int, default=2, help="k copies per token: coarse top-k = k, fine top-k = k * G")
    a("--granularity", type=int, default=4)
    a("--zero", type=int, default=1, choices=(0, 1, 2))
    a("--ep-size", type=int, default=1)
    a("--expert-impl", default="grouped,loop", help="comma list of expert implementations to run (grouped, loop)")
    a("--warmup", type=int, default=3)
    a("--steps", type=int, default=10)
    a("--threads", type=int, default=0, help="torch.set_num_threads (0 = default; 1 on a shared machine)")
    a("--json", help="also write the results to this file")
    args = p.parse_args()
    args.kv_heads, args.dtype, args.device, args.peak_tflops = args.heads, "fp32", "cpu", None
    args.impls = args.expert_impl.split(",")
    return args


def upcycle(dense: Path, out: Path, args, *, granularity: int) -> None:
    from upcycle_ds.cli import main

    G = granularity
    argv = ["upcycle", "--model", str(dense), "--out", str(out), "--num-experts", str(args.copies * G),
            "--top-k", str(args.top_k * G)] + (["--granularity", str(G)] if G > 1 else [])
    if main(argv) != 0:
        raise SystemExit(f"bench/granular_step.py: upcycle-ds {' '.join(argv)} failed")


def ideal(model: Path, dense: Path, seq: int) -> float:
    from upcycle_ds.flops import train_flops_per_token
    from upcycle_ds.plan import shape_from_config

    f = [train_flops_per_token(shape_from_config(json.loads((d / "config.json").read_text())), seq)
         for d in (model, dense)]
    return f[0] / f[1]


def main() -> int:
    args = parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    from upcycle_ds.launch.distributed import init_distributed, shutdown

    init_distributed()
    rank = torch.distributed.get_rank()
    G = args.granularity
    with tempfile.TemporaryDirectory(prefix="granular_step-") as tmp:
        root = Path(tmp)
        if rank == 0:
            write_inputs(root, args)
            upcycle(root / "dense", root / "coarse", args, granularity=1)
            upcycle(root / "dense", root / "fine", args, granularity=G)
        torch.distributed.barrier()
        objs = [str(root)]
        torch.distributed.broadcast_object_list(objs, src=0)
        root = Path(objs[0])
        dense, data = root / "dense", root / "data.jsonl"
        arms = [trainer_arm("dense", args.zero, dense, data, root, args, expert_impl=None)]
        for impl in args.impls:
            for which in ("coarse", "fine"):
                arms.append(trainer_arm(f"{which}-{impl}", args.zero, root / which, data, root, args,
                                        expert_impl=impl))
        for i in range(args.warmup + args.steps):
            for arm in arms:
                one_step(arm, args, record=i >= args.warmup)
        results = {r["arm"]: r for r in (finish(arm, args) for arm in arms)}
        ideals = {w: ideal(root / w, dense, args.seq) for w in ("coarse", "fine")}
        torch.distributed.barrier()  # rank 0 removes the shared temp dir on leaving this block
    if rank == 0:
        I = args.intermediate
        print(f"\nLlama h{args.hidden}/i{I}/{args.layers}L, vocab {args.vocab}, seq {args.seq} x mbs {args.mbs}, "
              f"fp32, ZeRO-{args.zero}, ep_size {args.ep_size}, {torch.get_num_threads()} thread(s); coarse E="
              f"{args.copies} k={args.top_k} (I={I}); fine E={args.copies * G} k={args.top_k * G} (G={G}, I/G={I // G})"
              f"; FLOP-ideal vs dense: coarse {ideals['coarse']:.3f}, fine {ideals['fine']:.3f} (fine/coarse "
              f"{ideals['fine'] / ideals['coarse']:.3f}); medians of {args.steps} steps")
        head = ["arm", "step ms", "fwd+bwd ms", "opt ms", "CPU step ms", "vs dense (CPU)", "fine/coarse (CPU)",
                "fine/coarse fwd+bwd (wall)"]
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        d = results["dense"]
        for name, r in results.items():
            cells = [name, f"{r['step_ms']:.1f}", f"{r['fwd_bwd_ms']:.1f}", f"{r['opt_ms']:.1f}",
                     f"{r['cpu_step_ms']:.1f}", "", "", ""]
            if name != "dense":
                cells[5] = f"{r['step_ms'] / d['step_ms']:.3f} ({r['cpu_step_ms'] / d['cpu_step_ms']:.3f})"
            if name.startswith("fine-"):
                c = results["coarse-" + name.split("-", 1)[1]]
                cells[6] = f"{r['step_ms'] / c['step_ms']:.3f} ({r['cpu_step_ms'] / c['cpu_step_ms']:.3f})"
                cells[7] = f"{r['fwd_bwd_ms'] / c['fwd_bwd_ms']:.3f}"
            print("| " + " | ".join(cells) + " |")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "ideal_vs_dense": ideals,
                                                   "results": list(results.values())}, indent=1) + "\n")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
