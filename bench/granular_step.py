"""Training step time of a fine-grained MoE vs a coarse MoE of equal active FLOPs, both upcycled from one dense Llama.

Same harness as bench/step_time.py (its `Runner`: forward -> LM loss + 0.01 aux + 0.001 z -> engine.backward ->
engine.step under `deepspeed.initialize` with the trainer's ds_config and AdamW param groups; models take turns
round by round; medians of per-round ratios), with three models:

  dense    the HF LlamaForCausalLM (reference)
  coarse   `build_moe_model(UpcycledView(dense, E=8, k=2))`: experts of the dense intermediate size I
  fine     `build_moe_model(UpcycledView(dense, E=C*G, k=2*G, granularity=G))`: experts of I/G, C = 8 copies, so
           each token visits 2*G slices of I/G neurons = the same expert FLOPs as the coarse model's 2 experts of I

The fine/coarse FLOP-ideal ratio is ~1 (only the router grows, 2hE per token; `upcycle_ds.plan.forward_flops`), so
the measured ratio is the cost of granularity itself: G times more token-slots to dispatch (gather, all_to_all,
combine) and G times more, G times smaller expert matmuls.

    .venv/bin/python bench/granular_step.py --threads 1                      # h256/i688/4L, G=4: E=8 k=2 vs E=32 k=8
    .venv/bin/python bench/granular_step.py --threads 1 --granularity 8      # E=64 k=16 (I/G = 86)
    .venv/bin/python bench/granular_step.py --threads 1 --expert-impl grouped   # once moe/ has grouped-GEMM experts
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 bench/granular_step.py --ep-size 2

`--expert-impl NAME` passes `expert_impl=NAME` to `surgery.build_moe_model` for both MoE models (the experts'
implementation: the per-expert loop today; grouped GEMM when moe/ provides it); it stops with a message if this
checkout's `build_moe_model` has no such argument.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from step_time import AUX_COEF, CLOCKS, PHASES, Z_COEF, Runner, wrap, write_dense  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--hidden", type=int, default=256)
    a("--intermediate", type=int, default=688)
    a("--layers", type=int, default=4)
    a("--heads", type=int, default=4)
    a("--kv-heads", type=int, default=4)
    a("--vocab", type=int, default=4096)
    a("--seq", type=int, default=256)
    a("--mbs", type=int, default=4)
    a("--copies", type=int, default=8, help="C: coarse experts = C, fine experts = C * G")
    a("--top-k", type=int, default=2, help="k' copies per token: coarse k = k', fine k = k' * G")
    a("--granularity", type=int, default=4)
    a("--zero", type=int, default=1, choices=(0, 1, 2))
    a("--ep-size", type=int, default=1)
    a("--warmup", type=int, default=3)
    a("--steps", type=int, default=10)
    a("--fused-adamw", action=argparse.BooleanOptionalAction, default=True)
    a("--expert-impl", default=None, help="passed to build_moe_model(expert_impl=...) when given")
    a("--threads", type=int, default=0, help="torch.set_num_threads (0 = default; 1 on a shared machine)")
    a("--json", help="also write the results to this file")
    return p.parse_args()


def moe_runner(name: str, dense_dir: Path, args, world: int, **opts) -> Runner:
    from upcycle_ds.io.hf import HFCheckpoint
    from upcycle_ds.moe.layer import moe_layers
    from upcycle_ds.surgery import build_moe_model
    from upcycle_ds.upcycle import UpcycledView, UpcycleOptions

    kw = {}
    if args.expert_impl is not None:
        if "expert_impl" not in inspect.signature(build_moe_model).parameters:
            raise SystemExit("--expert-impl: this checkout's surgery.build_moe_model has no expert_impl argument "
                             "(the grouped-GEMM experts are not in it yet)")
        kw["expert_impl"] = args.expert_impl
    view = UpcycledView(HFCheckpoint(dense_dir), UpcycleOptions(**opts))
    model = build_moe_model(view, ep_size=args.ep_size, **kw)
    layers = moe_layers(model)

    def aux():
        return sum(AUX_COEF * m.router.aux_loss + Z_COEF * m.router.z_loss for _, m in layers)

    return Runner(name, wrap(model, args, world), aux)


def flops(dense_dir: Path, args) -> dict[str, float]:
    from upcycle_ds.io.hf import read_config
    from upcycle_ds.plan import forward_flops, shape_from_config, upcycled_shape

    cfg = read_config(dense_dir)
    G, C, k = args.granularity, args.copies, args.top_k
    return {"dense": forward_flops(shape_from_config(cfg), args.seq).total,
            "coarse": forward_flops(upcycled_shape(cfg, num_experts=C, top_k=k), args.seq).total,
            "fine": forward_flops(upcycled_shape(cfg, num_experts=C * G, top_k=k * G, granularity=G),
                                  args.seq).total}


def summarize(runners: list[Runner], clock: str) -> dict:
    med = torch.tensor([[r.median(clock, k) for k in PHASES] for r in runners], dtype=torch.float64)
    torch.distributed.all_reduce(med, op=torch.distributed.ReduceOp.MAX)
    by = {r.name: r for r in runners}

    def per_round(a: Runner, b: Runner, key: str) -> float:
        return statistics.median(x / y for x, y in zip(a.times[clock][key], b.times[clock][key]))

    out = {r.name: {**{k + "_ms": 1e3 * v for k, v in zip(PHASES, row)}, "params": r.params}
           for r, row in zip(runners, med.tolist())}
    for name in ("coarse", "fine"):
        out[name]["vs_dense"] = per_round(by[name], by["dense"], "step")
    out["fine"]["vs_coarse"] = per_round(by["fine"], by["coarse"], "step")
    out["fine"]["fwd_vs_coarse"] = per_round(by["fine"], by["coarse"], "fwd")
    out["fine"]["bwd_vs_coarse"] = per_round(by["fine"], by["coarse"], "bwd")
    return out


def main() -> int:
    args = parse_args()
    from upcycle_ds.launch.distributed import init_distributed, shutdown

    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    G, C, k = args.granularity, args.copies, args.top_k
    tmp = [tempfile.mkdtemp(prefix="granular_step_") if rank == 0 else None]
    torch.distributed.broadcast_object_list(tmp, src=0)
    dense_dir = Path(tmp[0]) / "dense"
    try:
        if rank == 0:
            write_dense(dense_dir, args)
        torch.distributed.barrier()
        torch.manual_seed(1234 + rank)
        import transformers

        dense = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
        runners = [Runner("dense", wrap(dense, args, world), lambda: None),
                   moe_runner("coarse", dense_dir, args, world, num_experts=C, top_k=k),
                   moe_runner("fine", dense_dir, args, world, num_experts=C * G, top_k=k * G, granularity=G)]
        fl = flops(dense_dir, args)
        torch.distributed.barrier()
    finally:
        if rank == 0:
            shutil.rmtree(tmp[0], ignore_errors=True)

    g = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, args.vocab, (args.mbs, args.seq), generator=g) for _ in range(4)]
    for r in runners:
        for w in range(args.warmup):
            r.step(batches[w % len(batches)], record=False)
    for s in range(args.steps):
        for r in runners[s % len(runners):] + runners[:s % len(runners)]:
            r.step(batches[s % len(batches)], record=True)

    result = {"shape": {k_: getattr(args, k_) for k_ in ("hidden", "intermediate", "layers", "heads", "vocab", "seq",
                                                         "mbs", "copies", "top_k", "granularity", "zero", "ep_size")},
              "expert_impl": args.expert_impl or "loop (this checkout's default)", "world": world,
              "threads": torch.get_num_threads(), "steps": args.steps, "forward_flops_per_token": fl,
              "ideal_fine_vs_coarse": fl["fine"] / fl["coarse"],
              "clocks": {c: summarize(runners, c) for c in CLOCKS}}
    if rank == 0:
        print(f"\nLlama h{args.hidden}/i{args.intermediate}/{args.layers}L, seq {args.seq} x mbs {args.mbs}, fp32, "
              f"ZeRO-{args.zero}, ep_size {args.ep_size}, {world} rank(s) x {result['threads']} threads, experts: "
              f"{result['expert_impl']}; medians of {args.steps} rounds")
        print(f"coarse: E={C} k={k} (I={args.intermediate}); fine: E={C * G} k={k * G} (G={G}, "
              f"I/G={args.intermediate // G}); FLOP-ideal fine/coarse {result['ideal_fine_vs_coarse']:.4f}")
        for c, rows in result["clocks"].items():
            print(f"[{c} time] {'step ms':>8} {'fwd':>7} {'bwd':>7} {'opt':>6}  {'vs dense':>8} {'vs coarse':>9}")
            for name, m in rows.items():
                vs_d = f"{m['vs_dense']:.3f}" if "vs_dense" in m else "-"
                vs_c = f"{m['vs_coarse']:.3f}" if "vs_coarse" in m else "-"
                print(f"{name:<8} {m['step_ms']:8.1f} {m['fwd_ms']:7.1f} {m['bwd_ms']:7.1f} {m['opt_ms']:6.1f}  "
                      f"{vs_d:>8} {vs_c:>9}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
