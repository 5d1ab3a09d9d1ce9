"""What `--offload-optimizer` costs per step, measured, against `upcycle-ds plan`'s estimate — in one run.

1. CPU AdamW throughput per parameter (the figure `upcycle_ds.plan.CPU_ADAM_NS_PER_PARAM` holds): one flat fp32
   tensor of --adam-params elements with its gradient, stepped by torch's AdamW(fused=True) (what ZeRO-Offload runs
   with `upcycle-ds train --offload-optimizer`), torch's default foreach AdamW, and DeepSpeed's DeepSpeedCPUAdam
   (JIT-built on first use: ~1-2 min; skipped with --no-deepspeed-adam or where it cannot build), on --threads
   threads; min over --adam-reps steps after one warm-up step. Also the host's copy bandwidth (a tensor copy).
2. The offloaded step: a random dense Llama upcycled on the fly (`--experts`, top-2), one Trainer per arm, ZeRO-1 and
   ZeRO-2, each with the optimizer on the device and offloaded; the arms take turns, one step each per round. Medians
   over --steps after --warmup of: the step, its optimizer step (a timer around engine.step), and in the offloaded
   arms the three parts of ZeRO-Offload that `upcycle-ds plan`'s estimate (`plan.offload_cost`) models, timed around
   DeepSpeed's own calls: the gradient copies into the fp32 host partition (`async_inplace_copy_grad_to_fp32_buffer_
   from_gpu`, during backward), the AdamW step of the host partition (`_optimizer_step`), and the updated partition's
   way back to the model weights (cast into the weight buffer + copy, up to `_release_preflattened_grad_buffers`).

Each part is set against the plan's figure for this model and layout: copies = the plan's bytes over a copy bandwidth
(PCIe on a GPU; on CPU ranks, where the device is the host, the host's measured copy bandwidth stands in for it);
the way back also casts the fp32 master into the weight buffer (4 bytes per element read: at the copy bandwidth on
CPU ranks, at the host memory bandwidth on a GPU, where the plan counts it in the CPU AdamW's memory traffic); CPU
AdamW = a rank's partition x the ns per parameter measured in part 1. The last column is the plan's estimate for a GPU
node with its default bandwidths. On CPU ranks the whole steps are not comparable (both arms step AdamW on the CPU,
and DeepSpeed's on-device ZeRO path flattens gradients where the offloaded one copies them into place), so the table
shows them only for reference.

    .venv/bin/python bench/offload_step.py --threads 1                                  # CPU, 1 rank
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 bench/offload_step.py --ep-size 2 --no-deepspeed-adam
    python bench/offload_step.py --device cuda --preset gpu                             # bench/gpu/run.sh offload
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import ROOT, one_step, sync, write_inputs  # noqa: E402

sys.path.insert(0, str(ROOT))

PRESETS = {
    # the optimizer's share of a CPU step is large: many expert parameters, short sequences
    "cpu": dict(hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8, vocab=4096, seq=64, mbs=1,
                dtype="fp32"),
    # ~1.3 B parameters on one GPU (TinyLlama's width, 4 layers, 8 experts): the offloaded state ~23 GB of host RAM
    "gpu": dict(hidden=2048, intermediate=5632, layers=4, heads=32, kv_heads=4, vocab=32000, seq=2048, mbs=1,
                dtype="bf16"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--preset", choices=list(PRESETS), default=None, help="model/batch shape (default: cpu, or gpu with cuda)")
    a("--device", choices=("cpu", "cuda"), default="cpu")
    for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "seq", "mbs"):
        a(f"--{name.replace('_', '-')}", type=int, default=None)
    a("--dtype", choices=("fp32", "bf16"), default=None)
    a("--experts", type=int, default=8)
    a("--top-k", type=int, default=2)
    a("--ep-size", type=int, default=1)
    a("--zero", default="1,2", help="comma list of ZeRO stages (1, 2)")
    a("--warmup", type=int, default=2)
    a("--steps", type=int, default=8)
    a("--threads", type=int, default=0, help="torch.set_num_threads (0 = default)")
    a("--adam-params", type=int, default=20_000_000)
    a("--adam-reps", type=int, default=5)
    a("--no-deepspeed-adam", action="store_true", help="skip DeepSpeedCPUAdam (it JIT-compiles on first use)")
    a("--json", help="also write the results to this file")
    args = p.parse_args()
    for k, v in PRESETS[args.preset or ("gpu" if args.device == "cuda" else "cpu")].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.zero = [int(z) for z in str(args.zero).split(",")]
    args.peak_tflops = None
    return args


# ---------------------------------------------------------------------------------------------- CPU AdamW rate
def adam_rates(args) -> dict[str, float | str]:
    """ns per parameter of one AdamW step over a flat fp32 tensor, per implementation (or why it is missing)."""
    n = args.adam_params

    def time_it(make) -> float:
        p = torch.nn.Parameter(torch.randn(n))
        p.grad = torch.randn(n) * 1e-3
        opt = make([p])
        opt.step()  # allocates the moments
        best = float("inf")
        for _ in range(args.adam_reps):
            t = time.perf_counter()
            opt.step()
            best = min(best, time.perf_counter() - t)
        return best / n * 1e9

    out: dict[str, float | str] = {
        "torch AdamW fused": time_it(lambda ps: torch.optim.AdamW(ps, lr=1e-4, betas=(0.9, 0.95), fused=True)),
        "torch AdamW foreach": time_it(lambda ps: torch.optim.AdamW(ps, lr=1e-4, betas=(0.9, 0.95), foreach=True)),
    }
    if not args.no_deepspeed_adam:
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            out["DeepSpeedCPUAdam"] = time_it(lambda ps: DeepSpeedCPUAdam(ps, lr=1e-4, betas=(0.9, 0.95)))
        except Exception as e:  # no compiler / ninja on this machine: say so, measure the rest
            out["DeepSpeedCPUAdam"] = f"unavailable ({type(e).__name__}: {str(e)[:120]})"
    return out


def copy_gbs(n: int = 50_000_000) -> float:
    """The host's copy bandwidth, GB/s of data copied (fp32 tensor to tensor; min time of 5)."""
    src, dst = torch.randn(n), torch.empty(n)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 4 * n / best / 1e9


# ------------------------------------------------------------------------------------------------ the step
def arm(zero: int, off: bool, dense: Path, data: Path, root: Path, args) -> dict:
    from upcycle_ds.train.config import TrainArgs
    from upcycle_ds.train.stage import Stage
    from upcycle_ds.train.trainer import build_trainer

    name = f"ZeRO-{zero} {'offloaded' if off else 'on device'}"
    targs = TrainArgs(model=str(dense), data=[str(data)], out=str(root / f"run-z{zero}-{int(off)}"), zero_stage=zero,
                      dtype=args.dtype, micro_batch_size=args.mbs, max_length=args.seq, lr=1e-4, max_steps=10**6,
                      eval_fraction=0.0, wandb_mode="disabled", export_hf=False, ep_size=args.ep_size,
                      num_experts=args.experts, top_k=args.top_k, offload_optimizer=off)
    trainer = build_trainer(targs, Stage(prog=f"bench {name}"))
    trainer.engine.train()
    timer = {"opt": []}
    step_fn = trainer.engine.step

    def timed_step(*a, **kw):  # the optimizer step's share of the step (bench instrumentation)
        sync(args)
        t = time.perf_counter()
        out = step_fn(*a, **kw)
        sync(args)
        timer["opt"].append(time.perf_counter() - t)
        return out

    trainer.engine.step = timed_step
    parts = instrument_offload(trainer.engine.optimizer, args) if off else None
    return {"name": name, "zero": zero, "off": off, "trainer": trainer, "stream": trainer.micro_batches(),
            "timer": timer, "wall": [], "cpu": [], "parts": parts}


def instrument_offload(opt, args) -> dict[str, list[float]]:
    """Per optimizer step, seconds spent in ZeRO-Offload's three parts (see the module docstring), timed around
    DeepSpeed's own methods on this optimizer instance (bench instrumentation, with a device sync around each)."""
    per_step = {"d2h": [], "adam": [], "back": []}
    cur = {"d2h": 0.0, "adam": 0.0, "back": 0.0, "after_adam": None}

    def timed(key, fn):
        def wrapped(*a, **kw):
            sync(args)
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync(args)
            cur[key] += time.perf_counter() - t
            if key == "adam":
                cur["after_adam"] = time.perf_counter()
            return out
        return wrapped

    release = opt._release_preflattened_grad_buffers

    def back_done(*a, **kw):  # called right after the updated partition was copied back
        if cur["after_adam"] is not None:
            sync(args)
            cur["back"] += time.perf_counter() - cur["after_adam"]
            cur["after_adam"] = None
        return release(*a, **kw)

    step = opt.step

    def whole_step(*a, **kw):
        out = step(*a, **kw)
        for k in per_step:
            per_step[k].append(cur[k])
            cur[k] = 0.0
        return out

    opt.async_inplace_copy_grad_to_fp32_buffer_from_gpu = timed(
        "d2h", opt.async_inplace_copy_grad_to_fp32_buffer_from_gpu)
    opt._optimizer_step = timed("adam", opt._optimizer_step)
    opt._release_preflattened_grad_buffers = back_done
    opt.step = whole_step
    return per_step


def plan_cost(trainer, zero: int, args, *, pcie_gbs: float | None, ns_per_param: float | None):
    """The plan's offload estimate for this arm's model and layout (None: the plan's GPU-node defaults)."""
    from upcycle_ds.plan import CPU_ADAM_NS_PER_PARAM, Setup, count_params, offload_cost, shape_from_config

    c = count_params(shape_from_config(trainer.setup.config))
    setup = Setup(nodes=1, gpus_per_node=trainer.world, ep_size=args.ep_size, zero_stage=zero, dtype=args.dtype,
                  micro_batch_size=args.mbs, seq_len=args.seq, offload_optimizer=True)
    return offload_cost(c.non_expert, c.expert, setup, pcie_gbs=pcie_gbs,
                        cpu_adam_ns_per_param=ns_per_param or CPU_ADAM_NS_PER_PARAM)


def main() -> int:
    args = parse_args()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif not torch.cuda.is_available():
        print("bench/offload_step.py: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from upcycle_ds.launch.distributed import init_distributed, shutdown
    from upcycle_ds.plan import HOST_MEMORY_BANDWIDTH_GBS

    init_distributed()
    rank = torch.distributed.get_rank()
    rates = adam_rates(args) if rank == 0 else {}
    gbs = copy_gbs()
    with tempfile.TemporaryDirectory(prefix="offload_step-") as tmp:
        root = Path(tmp)
        if rank == 0:
            write_inputs(root, args)
        torch.distributed.barrier()
        objs = [str(root)]
        torch.distributed.broadcast_object_list(objs, src=0)
        root = Path(objs[0])
        arms = [arm(z, off, root / "dense", root / "data.jsonl", root, args)
                for z in args.zero for off in (False, True)]
        for i in range(args.warmup + args.steps):
            for a in arms:
                one_step(a, args, record=i >= args.warmup)
        fused = rates.get("torch AdamW fused") if rank == 0 else None
        results = []
        for a in arms:
            tr = a["trainer"]
            res = {"arm": a["name"], "zero": a["zero"], "offloaded": a["off"],
                   "step_ms": 1e3 * statistics.median(a["wall"]),
                   "opt_ms": 1e3 * statistics.median(a["timer"]["opt"][-len(a["wall"]):])}
            if a["off"]:
                n = len(a["wall"])
                res.update({f"{k}_ms": 1e3 * statistics.median(v[-n:]) for k, v in a["parts"].items()})
                here = plan_cost(tr, a["zero"], args, pcie_gbs=gbs if args.device == "cpu" else None,
                                 ns_per_param=fused)
                node = plan_cost(tr, a["zero"], args, pcie_gbs=None, ns_per_param=None)
                bw, q = here.pcie_gbs * 1e9, here.h2d_bytes / (4 if args.dtype == "fp32" else 2)
                # the way back: the cast of the fp32 master into the weight buffer (reads 4q: on a GPU node the plan
                # counts it in the CPU AdamW's memory traffic), then the copy of the buffer (the plan's h2d bytes)
                cast = 4 * q / (gbs * 1e9 if args.device == "cpu" else HOST_MEMORY_BANDWIDTH_GBS * 1e9)
                res.update(plan_d2h_ms=1e3 * here.d2h_bytes / bw, plan_back_ms=1e3 * (here.h2d_bytes / bw + cast),
                           plan_adam_ms=1e3 * here.adam_cpu_s, plan_gpu_node_ms=1e3 * node.total_s,
                           d2h_bytes=here.d2h_bytes, h2d_bytes=here.h2d_bytes)
            results.append(res)
        torch.distributed.barrier()  # rank 0 removes the shared temp dir on leaving this block
    if rank == 0:
        print(report(args, rates, gbs, results, arms[0]["trainer"].world))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "adam_ns_per_param": rates, "copy_gbs": gbs,
                                                   "results": results}, indent=2))
    shutdown()
    return 0


def report(args, rates: dict, gbs: float, results: list[dict], world: int) -> str:
    where = (torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads")
    lines = [f"CPU AdamW, one step over {args.adam_params / 1e6:.0f} M fp32 parameters, {torch.get_num_threads()} "
             f"thread(s); host copy bandwidth {gbs:.1f} GB/s:"]
    for k, v in rates.items():
        lines.append(f"  {k:22s} " + (f"{v:.3f} ns per parameter ({1 / v:.2f} G parameters/s)"
                                      if isinstance(v, float) else v))
    lines.append("")
    lines.append(f"model: Llama h{args.hidden}/i{args.intermediate}/{args.layers}L, vocab {args.vocab}, upcycled to "
                 f"{args.experts} experts top-{args.top_k}; ep_size {args.ep_size}; {world} rank(s) on {where}; "
                 f"seq {args.seq} x mbs {args.mbs}; {args.dtype}; medians of {args.steps} steps")
    head = ["arm", "step ms", "opt step ms", "grad copies ms (plan)", "CPU AdamW ms (plan)",
            "weights back ms (plan)", "plan: GPU node ms"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["arm"], f"{r['step_ms']:.1f}", f"{r['opt_ms']:.1f}"]
        if r["offloaded"]:
            cells += [f"{r['d2h_ms']:.1f} ({r['plan_d2h_ms']:.1f})", f"{r['adam_ms']:.1f} ({r['plan_adam_ms']:.1f})",
                      f"{r['back_ms']:.1f} ({r['plan_back_ms']:.1f})", f"{r['plan_gpu_node_ms']:.1f}"]
        else:
            cells += ["", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    bw = "the host copy bandwidth above" if args.device == "cpu" else "the plan's PCIe bandwidth"
    lines.append(f"(plan): the plan's figure for this model and layout, copies at {bw}, CPU AdamW at the fused rate "
                 f"above; 'plan: GPU node' = the plan's estimate (copies + CPU AdamW) with its default bandwidths.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
