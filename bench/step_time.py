"""Training step time of upcycled MoE models vs their dense source, on the Trainer `upcycle-ds train` runs, against
the FLOP-ideal ratio; grouped-GEMM vs loop experts; ZeRO 0/1/2 — in one run.

From one random dense Llama written to a temp dir (and synthetic text rows), the bench builds one `Trainer` per arm:

  dense       the dense model itself (the `upcycle-ds sft` path: Stage(dense=True))
  grouped     the model upcycled on the fly (--num-experts E --top-k k), local experts as one grouped GEMM
  loop        the same with a Python loop over the local experts
each at every ZeRO stage of --zero. A step is `Trainer.step`: forward -> LM loss (+ aux + z for MoE) ->
engine.backward -> engine.step. The optimizer step is timed separately (a timer around engine.step), so fwd+bwd =
step - optimizer. On CPU all arms are held at once and take turns, one step each per round (a shared machine's
noise then hits every arm alike); on GPU they run one after another (memory) with torch.cuda.synchronize around each
step. Figures are medians over --steps after --warmup.

FLOP-ideal ratio: `upcycle_ds.flops.train_flops_per_token` of the MoE over the dense model's (matmul FLOPs of the
top-k experts, router, attention projections and scores, lm_head; x3 for forward + backward). MFU uses the same
FLOPs against the device's peak (`--peak-tflops`, or the data-sheet bf16 peak of known GPUs). On GPU the table also
shows each arm's peak allocated memory (above what was allocated before it was built) next to `upcycle-ds plan`'s
prediction for the same model and setup. On both devices "fwd peak" is the most memory the step's forward needed
above what was allocated (CUDA) or resident (CPU, `host_peak_reset`) when the step began — read when the backward
starts, it holds the activations and tensors saved for backward, including any copy of the experts' weights the
grouped path makes; "÷ loop" is that over the loop arm's at the same ZeRO stage (grouped-GEMM experts that view
their weights in place need no more than the loop).

    .venv/bin/python bench/step_time.py --threads 1                        # CPU preset: h256/i688/4L, fp32
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 bench/step_time.py --ep-size 2 --zero 1
    python bench/step_time.py --device cuda --preset gpu --json out.json   # 1B-class, bf16, seq 2048 (bench/gpu)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    # a small Llama a 2-core CPU steps through in well under a second
    "cpu": dict(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=4, vocab=4096, seq=256, mbs=4,
                dtype="fp32", zero="0,1,2", arms="dense,grouped,loop"),
    # TinyLlama-1.1B's width (h2048/i5632, 32 heads, 4 KV heads, vocab 32000), 8 layers; seq 2048
    "gpu": dict(hidden=2048, intermediate=5632, layers=8, heads=32, kv_heads=4, vocab=32000, seq=2048, mbs=4,
                dtype="bf16", zero="1,2", arms="dense,grouped,loop"),
    # the CPU rehearsal of bench/gpu/run.sh: the gpu preset's precision at toy size (numbers meaningless)
    "rehearse": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512, seq=64, mbs=2,
                     dtype="bf16", zero="1", arms="dense,grouped,loop"),
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
    a("--zero", default=None, help="comma list of ZeRO stages to run (e.g. 0,1,2)")
    a("--arms", default=None, help="comma list of dense, grouped, loop")
    a("--ep-size", type=int, default=1)
    a("--warmup", type=int, default=3)
    a("--steps", type=int, default=10)
    a("--peak-tflops", type=float, default=None)
    a("--max-group-numel", type=int, default=None, help="cap on one MoE optimizer group (default DeepSpeed's, "
      "upcycle_ds.train.optim.MAX_GROUP_NUMEL): lower it to put several groups in a CPU-sized model, as the default "
      "does in a 1B-class one")
    a("--threads", type=int, default=0, help="torch.set_num_threads (0 = default); 1 gives steadier CPU ratios")
    a("--json", help="also write the results to this file")
    a("--profile", type=int, default=0, help="CPU: then profile this many more steps of each arm (torch.profiler) and "
      "print where the time goes: matrix multiplies, DeepSpeed's gradient flatten, everything else")
    args = p.parse_args()
    preset = PRESETS[args.preset or ("gpu" if args.device == "cuda" else "cpu")]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.zero = [int(z) for z in str(args.zero).split(",")]
    args.arms = args.arms.split(",")
    return args


def write_inputs(root: Path, args) -> tuple[Path, Path]:
    """A random dense Llama (bf16 on disk for bf16 runs), the demo's character tokenizer, text rows."""
    import transformers

    from upcycle_ds.demo import make_tokenizer

    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                                   max_position_embeddings=max(4096, args.seq), tie_word_embeddings=False)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.device("cuda" if args.device == "cuda" else "cpu"):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(root / "dense")
    del model
    make_tokenizer(root / "dense")
    g = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz ,.;:=+-*/()[]{}0123456789"
    rows = []
    n_rows = (args.warmup + args.steps + 4) * args.mbs * 2 * max(1, int(os.environ.get("WORLD_SIZE", "1")))
    for _ in range(n_rows):
        idx = torch.randint(0, len(letters), (args.seq - 2,), generator=g).tolist()
        rows.append(json.dumps({"text": "".join(letters[i] for i in idx)}))
    (root / "data.jsonl").write_text("\n".join(rows) + "\n")
    return root / "dense", root / "data.jsonl"


def make_trainer(arm: str, zero: int, dense: Path, data: Path, root: Path, args):
    """Arm `dense` (the dense model itself) or `grouped` / `loop` (upcycled on the fly, that expert impl)."""
    moe = arm != "dense"
    return trainer_arm(arm, zero, dense, data, root, args, expert_impl=arm if moe else None,
                       num_experts=args.experts if moe else None)


def trainer_arm(name: str, zero: int, model: Path, data: Path, root: Path, args, *, expert_impl: str | None,
                num_experts: int | None = None) -> dict:
    """One arm: a Trainer for `model` (dense when expert_impl is None; an HF MoE dir, or a dense one upcycled on the
    fly to `num_experts`), its batch stream, and a timer around the optimizer step."""
    from upcycle_ds.train.config import TrainArgs
    from upcycle_ds.train.stage import Stage
    from upcycle_ds.train.trainer import build_trainer

    moe = expert_impl is not None
    targs = TrainArgs(model=str(model), data=str(data), out=str(root / f"run-{name}-z{zero}"), zero_stage=zero,
                      dtype=args.dtype, micro_batch_size=args.mbs, max_length=args.seq, lr=1e-4,
                      max_steps=10**6, eval_fraction=0.0, wandb_mode="disabled", export_hf=False,
                      ep_size=args.ep_size if moe else 1, num_experts=num_experts,
                      top_k=args.top_k, expert_impl=expert_impl or "grouped", peak_tflops=args.peak_tflops)
    trainer = build_trainer(targs, Stage(prog=f"bench {name} z{zero}", dense=not moe))
    trainer.engine.train()
    timer = {"opt": []}
    step_fn = trainer.engine.step

    backward_fn = trainer.engine.backward

    def measured_backward(*a, **kw):  # the forward's peak: everything the backward will need is held now
        sync(args)
        timer["fwd_peak"] = host_status("VmHWM") if args.device == "cpu" else torch.cuda.max_memory_allocated()
        return backward_fn(*a, **kw)

    def timed_step(*a, **kw):  # the optimizer step's share of the step (bench instrumentation)
        sync(args)
        t = time.perf_counter()
        out = step_fn(*a, **kw)
        sync(args)
        timer["opt"].append(time.perf_counter() - t)
        return out

    trainer.engine.step = timed_step
    trainer.engine.backward = measured_backward
    return {"name": name, "zero": zero, "trainer": trainer, "stream": trainer.micro_batches(), "timer": timer,
            "wall": [], "cpu": []}


def sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def one_step(arm, args, record: bool) -> None:
    sync(args)
    if args.device == "cpu":
        before = host_peak_reset()
    else:  # the arm's whole peak (build included) is kept across the per-step resets
        gpu_arm_peak(arm)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t, c = time.perf_counter(), time.process_time()
    arm["trainer"].step(arm["stream"])
    sync(args)
    if args.device == "cuda":
        gpu_arm_peak(arm)
    if record:
        arm["wall"].append(time.perf_counter() - t)
        arm["cpu"].append(time.process_time() - c)
        arm.setdefault("fwd_peak", []).append(arm["timer"]["fwd_peak"] - before)
    else:
        arm["timer"]["opt"].clear()


def gpu_arm_peak(arm) -> None:
    """arm["peak_bytes"]: the most allocated since the arm was built, above what earlier arms left."""
    now = torch.cuda.max_memory_allocated() - arm.get("allocated_before", 0)
    arm["peak_bytes"] = max(arm.get("peak_bytes", 0), now)


# CPU memory: the peak resident size of this process during a step, above what was resident when the step began
# (the memory the step itself needed: activations, saved tensors, copies, gradients, the optimizer's transients).
# Linux resets the peak (VmHWM) on a write of "5" to /proc/self/clear_refs; glibc is told to serve blocks >= 64 KiB
# by mmap and give them back on free, so residence follows allocation.
def host_peak_setup() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixed: no dynamic raise after frees)


def host_status(key: str) -> int:
    """A /proc/self/status size in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def host_peak_reset() -> int:
    """Reset VmHWM to the current residence; returns that residence (bytes)."""
    Path("/proc/self/clear_refs").write_text("5")
    return host_status("VmRSS")


def profile_arm(arm, args) -> dict[str, float]:
    """Per step of --profile more steps (ms): the step's wall time under the profiler, the self CPU time of matrix
    multiplies (aten::mm/bmm/addmm/_grouped_mm), that of DeepSpeed's gradient flatten for its all-reduce (every op
    under `flatten_dense_tensors`), and the rest of the step."""
    from torch.profiler import ProfilerActivity, profile

    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile):
            one_step(arm, args, record=False)
    step = (time.perf_counter() - t) * 1e3 / args.profile
    mm = flat = 0.0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        q, under_flatten = e, False
        while q is not None and not under_flatten:
            under_flatten = "flatten_dense_tensors" in q.name
            q = q.cpu_parent
        if under_flatten:
            flat += e.self_cpu_time_total
        elif e.name in ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm"):
            mm += e.self_cpu_time_total
    mm, flat = mm / 1e3 / args.profile, flat / 1e3 / args.profile
    return {"step": step, "matmul": mm, "grad flatten": flat, "other": step - mm - flat}


def finish(arm, args) -> dict:
    """Medians of one arm, then free it."""
    tr = arm["trainer"]
    tr.meter.reset()
    step = statistics.median(arm["wall"])
    opt = statistics.median(arm["timer"]["opt"][-len(arm["wall"]):])
    tokens = args.mbs * args.seq * tr.world
    res = {"arm": arm["name"], "zero": arm["zero"], "step_ms": 1e3 * step, "opt_ms": 1e3 * opt,
           "fwd_bwd_ms": 1e3 * (step - opt), "cpu_step_ms": 1e3 * statistics.median(arm["cpu"]),
           "tokens_per_s": tokens / step, "flops_per_token": tr.flops_per_token}
    if tr.peak:
        res["mfu"] = tr.flops_per_token * tokens / step / (tr.world * tr.peak * 1e12)
    res["fwd_peak_mib"] = statistics.median(arm["fwd_peak"]) / 2**20
    if args.device == "cuda":
        res["peak_mem_gib"] = arm["peak_bytes"] / 2**30
        res["plan_peak_gib"] = plan_peak(tr, arm["name"], arm["zero"], args) / 2**30
    return res


def plan_peak(trainer, arm: str, zero: int, args) -> float:
    from upcycle_ds.plan import Setup, make_plan, shape_from_config

    shape = shape_from_config(trainer.setup.config)
    setup = Setup(nodes=1, gpus_per_node=trainer.world, ep_size=args.ep_size if arm != "dense" else 1,
                  zero_stage=zero, dtype=args.dtype, micro_batch_size=args.mbs, seq_len=args.seq,
                  activation_checkpointing=False)
    return make_plan(shape, setup).peak


def free(arm, args) -> None:
    arm.clear()
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def table(results: list[dict], ideal: float) -> str:
    dense = {r["zero"]: r for r in results if r["arm"] == "dense"}
    gpu = any("peak_mem_gib" in r for r in results)
    head = ["arm", "ZeRO", "step ms", "fwd+bwd ms", "opt ms", "step/dense", "÷ ideal", "fwd+bwd ÷ ideal", "MFU",
            "fwd peak MiB", "÷ loop", *(["peak GiB", "plan GiB"] if gpu else [])]
    loop = {r["zero"]: r for r in results if r["arm"] == "loop"}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        d = dense.get(r["zero"])
        ratio = r["step_ms"] / d["step_ms"] if d else None
        fb = r["fwd_bwd_ms"] / d["fwd_bwd_ms"] if d else None
        is_moe = r["arm"] != "dense"
        cells = [r["arm"], str(r["zero"]), f"{r['step_ms']:.1f}", f"{r['fwd_bwd_ms']:.1f}", f"{r['opt_ms']:.1f}",
                 f"{ratio:.3f}" if ratio and is_moe else "", f"{ratio / ideal:.3f}" if ratio and is_moe else "",
                 f"{fb / ideal:.3f}" if fb and is_moe else "",
                 f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""]
        ref = loop.get(r["zero"], {}).get("fwd_peak_mib")
        cells += [f"{r['fwd_peak_mib']:.1f}", f"{r['fwd_peak_mib'] / ref:.3f}" if ref else ""]
        if gpu:
            cells += [f"{r['peak_mem_gib']:.1f}", f"{r['plan_peak_gib']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/step_time.py: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    os.environ["DS_ACCELERATOR"] = args.device  # before DeepSpeed is imported: it reads the variable once
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        host_peak_setup()
    if args.max_group_numel:
        from upcycle_ds.train import optim

        optim.MAX_GROUP_NUMEL = args.max_group_numel
    from upcycle_ds.flops import train_flops_per_token
    from upcycle_ds.launch.distributed import init_distributed, shutdown
    from upcycle_ds.plan import shape_from_config, upcycled_shape

    init_distributed()
    rank = torch.distributed.get_rank()
    with tempfile.TemporaryDirectory(prefix="step_time-") as tmp:
        root = Path(tmp)
        if rank == 0:
            dense, data = write_inputs(root, args)
        torch.distributed.barrier()
        objs = [str(root)]
        torch.distributed.broadcast_object_list(objs, src=0)
        root = Path(objs[0])
        dense, data = root / "dense", root / "data.jsonl"
        cfg = json.loads((dense / "config.json").read_text())
        f_dense = train_flops_per_token(shape_from_config(cfg), args.seq)
        f_moe = train_flops_per_token(upcycled_shape(cfg, num_experts=args.experts, top_k=args.top_k), args.seq)
        ideal = f_moe / f_dense
        results = []
        plan = [(arm, z) for z in args.zero for arm in args.arms]
        if args.device == "cpu":  # all arms at once, taking turns
            arms = [make_trainer(a, z, dense, data, root, args) for a, z in plan]
            for i in range(args.warmup + args.steps):
                for arm in arms:
                    one_step(arm, args, record=i >= args.warmup)
            results = [finish(arm, args) for arm in arms]
            profiles = [profile_arm(arm, args) for arm in arms] if args.profile else []
            for arm, prof in zip(results, profiles):
                print(f"profile {arm['arm']} ZeRO-{arm['zero']}: " + ", ".join(f"{k} {v:.1f} ms/step"
                                                                          for k, v in prof.items()))
        else:
            for a, z in plan:
                before = torch.cuda.memory_allocated()  # what earlier arms left (none, once freed)
                arm = make_trainer(a, z, dense, data, root, args)
                arm["allocated_before"] = before
                for i in range(args.warmup + args.steps):
                    one_step(arm, args, record=i >= args.warmup)
                results.append(finish(arm, args))
                free(arm, args)
        torch.distributed.barrier()  # rank 0 removes the shared temp dir on leaving this block
        if rank == 0:
            print(f"model: Llama h{args.hidden}/i{args.intermediate}/{args.layers}L, {args.heads} heads "
                  f"({args.kv_heads} KV), vocab {args.vocab}; seq {args.seq} x mbs {args.mbs}; {args.dtype}; "
                  f"{args.experts} experts top-{args.top_k}, ep_size {args.ep_size}; {args.device} "
                  f"({torch.cuda.get_device_name() if args.device == 'cuda' else f'{torch.get_num_threads()} threads'})"
                  f"; FLOP-ideal MoE/dense step ratio {ideal:.3f}; medians of {args.steps} steps")
            print(table(results, ideal))
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "ideal": ideal, "results": results},
                                                      indent=2))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
