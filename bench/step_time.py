"""Training step time of our upcycled DeepSpeed-MoE model vs its dense source, against the FLOP-ideal ratio.

One process (or `torchrun --nproc_per_node 2 ... --ep-size 2`) builds, from one random dense Llama written to a temp
dir, three models and wraps each with `deepspeed.initialize` (same ds_config: ZeRO-0/1, fp32, torch AdamW with the
trainer's param groups, `zero_allow_untested_optimizer`):

  dense    the HF dense model (transformers' LlamaForCausalLM)
  ours     `build_moe_model(UpcycledView(HFCheckpoint(dense), E, k))`: what `upcycle-ds train` runs
  ds-moe   (reference, --no-ds-moe to skip) the dense model with every MLP replaced by DeepSpeed's own
           `deepspeed.moe.layer.MoE` (TopKGate, k, drop_tokens=False: dropless, padded to the busiest expert)

A step is what the trainer does per micro-batch: forward -> LM loss (+ 0.01 * aux + 0.001 * z for MoE) ->
engine.backward -> engine.step. After warm-up the three models take turns, one step each, for --steps rounds; the
figures are medians. Forward, backward and optimizer step are timed separately too.

FLOP-ideal ratio (matmul FLOPs only, 2 per multiply-add; T = tokens per step = mbs * seq, S = seq, h hidden,
i intermediate, a = heads * head_dim, g = kv_heads * head_dim, V vocab, n layers, E experts, k top-k):
    forward(dense) = n * [2T h (2a + 2g) + 4 T S a + 2T * 3 h i] + 2T h V
                     (q,k,v,o projections; QK^T and PV over the full S x S; gate/up/down; lm_head)
    forward(moe)   = forward(dense) + n_moe * [(k - 1) * 2T * 3 h i + 2T h E]      (k experts per token + router)
    step           ~ 3 * forward (backward = 2 * forward); ideal ratio = forward(moe) / forward(dense).
Optimizer, norms, softmax, RoPE and dispatch are not counted: they are the overhead the measured ratio shows. A
second reference, "opt-ideal", adds an optimizer step that costs per parameter what the dense one does (the MoE has
~3.8x the parameters, and AdamW is memory-bound: no dispatch can remove that).

Every phase is timed on the wall clock and on this process's CPU clock. On a machine shared with other jobs, use
--threads 1 and read the CPU-time table: OpenMP's barriers make multi-threaded runs very sensitive to one
descheduled thread, and time spent descheduled is not CPU time.

    .venv/bin/python bench/step_time.py --threads 1           # h256/i688/4L, vocab 4096, seq 256 x mbs 4, E=8 k=2
    .venv/bin/python bench/step_time.py --threads 1 --zero 0  # plain torch AdamW step instead of ZeRO-1's
    .venv/bin/python bench/step_time.py --profile 3           # + torch.profiler table of our MoE step
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 bench/step_time.py --ep-size 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

AUX_COEF, Z_COEF = 0.01, 0.001


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
    a("--mbs", type=int, default=4, help="micro-batch size per rank")
    a("--experts", type=int, default=8)
    a("--top-k", type=int, default=2)
    a("--moe-layers", default="all", help="upcycle --layers spec: all | every:N | i,j,...")
    a("--zero", type=int, default=1, choices=(0, 1, 2))
    a("--ep-size", type=int, default=1)
    a("--warmup", type=int, default=3, help="warm-up steps per model")
    a("--steps", type=int, default=10, help="timed rounds (each model one step per round)")
    a("--fused-adamw", action=argparse.BooleanOptionalAction, default=True,
      help="torch AdamW(fused=True), the trainer's default (--no-fused-adamw: torch's foreach AdamW)")
    a("--no-ds-moe", action="store_true", help="skip DeepSpeed's native MoE reference")
    a("--profile", type=int, default=0, help="after timing, profile N steps of our MoE model (torch.profiler)")
    a("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default); on a shared machine 1 "
      "gives steadier ratios, as OpenMP's barriers suffer badly from a descheduled thread")
    a("--json", help="also write the results to this file")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------------- FLOPs
def forward_flops(args, *, moe: bool) -> float:
    T, S, h, i = args.mbs * args.seq, args.seq, args.hidden, args.intermediate
    hd = h // args.heads
    a, g = args.heads * hd, args.kv_heads * hd
    per_layer = 2 * T * h * (2 * a + 2 * g) + 4 * T * S * a + 2 * T * 3 * h * i
    total = args.layers * per_layer + 2 * T * h * args.vocab
    if moe:
        total += len(args.moe_layer_ids) * ((args.top_k - 1) * 2 * T * 3 * h * i + 2 * T * h * args.experts)
    return float(total)


# ---------------------------------------------------------------------------------------------------- models
def write_dense(path: Path, args) -> None:
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                                   max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


class DSNativeMLP(torch.nn.Module):
    """An HF MLP slot filled by `deepspeed.moe.layer.MoE` (its TopKGate and GShard dispatch); keeps l_aux."""

    def __init__(self, mlp: torch.nn.Module, hidden: int, args):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(hidden, copy.deepcopy(mlp), num_experts=args.experts, ep_size=args.ep_size, k=args.top_k,
                       drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
        self.l_aux = None

    def forward(self, x):
        out, self.l_aux, _ = self.moe(x)
        return out


def ds_config(args, world: int) -> dict:
    """The trainer's ds_config (ds_configs/zero{N}.json + its flag overrides), fp32, one micro-step per step."""
    from upcycle_ds.train.config import TrainArgs, deepspeed_config

    targs = TrainArgs(model="-", data="-", out="-", zero_stage=args.zero, dtype="fp32", micro_batch_size=args.mbs,
                      max_length=args.seq, ep_size=args.ep_size)
    return deepspeed_config(targs, world)


def wrap(model, args, world: int):
    import deepspeed

    from upcycle_ds.train.engine import optimizer_groups

    opt = torch.optim.AdamW(optimizer_groups(model, 0.0), lr=1e-5, betas=(0.9, 0.95), eps=1e-8,
                            fused=args.fused_adamw)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(args, world))
    engine.train()
    return engine


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
PHASES = ("step", "fwd", "bwd", "opt")


class Runner:
    """One model under DeepSpeed plus the per-micro-batch work the trainer does around it.

    Each phase is timed on two clocks: wall time, and this process's CPU time (all its threads). On a machine shared
    with other jobs the CPU time of a 1-thread run is the steadier measure (time spent descheduled is not counted).
    """

    def __init__(self, name: str, engine, aux_fn):
        self.name, self.engine, self.aux_fn = name, engine, aux_fn
        self.params = sum(p.numel() for p in engine.module.parameters())
        self.times = {c: {k: [] for k in PHASES} for c in CLOCKS}

    def step(self, batch, record: bool) -> None:
        from upcycle_ds.train.engine import causal_lm_loss

        marks = [{c: f() for c, f in CLOCKS.items()}]
        out = self.engine(input_ids=batch, use_cache=False)
        loss_sum, n = causal_lm_loss(out.logits, batch)
        loss = loss_sum / n.clamp_min(1)
        extra = self.aux_fn()
        if extra is not None:
            loss = loss + extra
        marks.append({c: f() for c, f in CLOCKS.items()})
        self.engine.backward(loss)
        marks.append({c: f() for c, f in CLOCKS.items()})
        self.engine.step()
        marks.append({c: f() for c, f in CLOCKS.items()})
        if record:
            for c in CLOCKS:
                t = [m[c] for m in marks]
                for k, v in zip(PHASES, (t[3] - t[0], t[1] - t[0], t[2] - t[1], t[3] - t[2])):
                    self.times[c][k].append(v)

    def median(self, clock: str, key: str) -> float:
        return statistics.median(self.times[clock][key])


def build_runners(args, dense_dir: Path, world: int) -> list[Runner]:
    import transformers

    from upcycle_ds.io.hf import HFCheckpoint
    from upcycle_ds.moe.layer import moe_layers
    from upcycle_ds.surgery import build_moe_model
    from upcycle_ds.train.engine import RouterMeter
    from upcycle_ds.upcycle import UpcycledView, UpcycleOptions

    runners = []
    dense = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    runners.append(Runner("dense", wrap(dense, args, world), lambda: None))

    view = UpcycledView(HFCheckpoint(dense_dir), UpcycleOptions(num_experts=args.experts, top_k=args.top_k,
                                                                 layers=args.moe_layers))
    ours = build_moe_model(view, ep_size=args.ep_size)
    layers = moe_layers(ours)
    args.moe_layer_ids = [i for i, _ in layers]
    meter = RouterMeter(layers, args.experts)

    def ours_aux():
        aux, z = meter.add()
        return AUX_COEF * aux + Z_COEF * z

    runners.append(Runner("ours", wrap(ours, args, world), ours_aux))

    if not args.no_ds_moe:
        native = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
        slots = []
        for i in args.moe_layer_ids:
            layer = native.model.layers[i]
            layer.mlp = DSNativeMLP(layer.mlp, args.hidden, args)
            slots.append(layer.mlp)
        runners.append(Runner("ds-moe", wrap(native, args, world),
                              lambda: AUX_COEF * sum(s.l_aux for s in slots)))
    return runners


def summarize(runners: list[Runner], clock: str, ideal: float) -> dict:
    """Per model: median phase times (the slowest rank's), and MoE/dense ratios as medians of per-round ratios."""
    med = torch.tensor([[r.median(clock, k) for k in PHASES] for r in runners], dtype=torch.float64)
    torch.distributed.all_reduce(med, op=torch.distributed.ReduceOp.MAX)  # ranks wait for each other anyway
    dense = runners[0]
    d_fb, d_opt = (med[0, 1] + med[0, 2]).item(), med[0, 3].item()

    def per_round(r, fn):
        rounds = range(len(r.times[clock]["step"]))
        return statistics.median(fn(r.times[clock], i) / fn(dense.times[clock], i) for i in rounds)

    out = {}
    for r, row in zip(runners, med.tolist()):
        flop_ideal = 1.0 if r is dense else ideal
        ratio = per_round(r, lambda t, i: t["step"][i])
        fb = per_round(r, lambda t, i: t["fwd"][i] + t["bwd"][i])
        with_opt = (flop_ideal * d_fb + d_opt * r.params / dense.params) / (d_fb + d_opt)
        out[r.name] = {**{k + "_ms": 1e3 * v for k, v in zip(PHASES, row)}, "params": r.params, "ratio": ratio,
                       "ratio_vs_ideal": ratio / flop_ideal, "ideal_with_optimizer": with_opt, "fwd_bwd_ratio": fb,
                       "fwd_bwd_ratio_vs_ideal": fb / flop_ideal}
    return out


# ---------------------------------------------------------------------------------------------------- main
def main() -> int:
    args = parse_args()
    from upcycle_ds.launch.distributed import init_distributed, shutdown

    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if args.experts % args.ep_size or world % args.ep_size:
        raise SystemExit(f"--ep-size {args.ep_size} must divide --experts {args.experts} and the world size {world}")

    tmp = [tempfile.mkdtemp(prefix="step_time_") if rank == 0 else None]  # one dir for all ranks (one host)
    torch.distributed.broadcast_object_list(tmp, src=0)
    dense_dir = Path(tmp[0]) / "dense"
    try:
        if rank == 0:
            write_dense(dense_dir, args)
        torch.distributed.barrier()
        torch.manual_seed(1234 + rank)
        runners = build_runners(args, dense_dir, world)
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
        order = runners[s % len(runners):] + runners[:s % len(runners)]  # rotate who goes first
        for r in order:
            r.step(batches[s % len(batches)], record=True)

    fd, fm = forward_flops(args, moe=False), forward_flops(args, moe=True)
    ideal = fm / fd
    result = {"shape": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads",
                                                        "vocab", "seq", "mbs", "experts", "top_k", "zero",
                                                        "ep_size")},
              "world": world, "threads": torch.get_num_threads(), "moe_layers": args.moe_layer_ids,
              "fused_adamw": args.fused_adamw, "steps": args.steps, "warmup": args.warmup,
              "flops_forward": {"dense": fd, "moe": fm}, "ideal_ratio": ideal,
              "clocks": {c: summarize(runners, c, ideal) for c in CLOCKS}}
    if rank == 0:
        sh = result["shape"]
        print(f"\nLlama h{sh['hidden']}/i{sh['intermediate']}/{sh['layers']}L vocab {sh['vocab']}, seq {sh['seq']} "
              f"x mbs {sh['mbs']}, fp32, ZeRO-{sh['zero']}, AdamW{' fused' if args.fused_adamw else ''}, "
              f"E={sh['experts']} k={sh['top_k']} in layers {args.moe_layer_ids}, ep_size {sh['ep_size']}, {world} "
              f"rank(s) x {result['threads']} threads; medians of {args.steps} rounds after {args.warmup} warm-up steps")
        print(f"FLOP-ideal MoE/dense step ratio: {ideal:.3f} (forward GFLOP dense {fd / 1e9:.2f}, MoE {fm / 1e9:.2f})")
        print("ratio = step / dense step (median of per-round ratios); /ideal = ratio / FLOP-ideal; opt-ideal = "
              "FLOP-ideal forward+backward plus an optimizer step costing the dense one's per parameter")
        for c, rows in result["clocks"].items():
            print(f"[{c} time] {'params':>7} {'step ms':>8} {'fwd':>7} {'bwd':>7} {'opt':>6}  {'ratio':>6} "
                  f"{'/ideal':>6} {'opt-ideal':>9} {'/opt-ideal':>10}  {'fwd+bwd ratio':>13} {'/ideal':>6}")
            for name, m in rows.items():
                print(f"{name:<11} {m['params'] / 1e6:6.1f}M {m['step_ms']:8.1f} {m['fwd_ms']:7.1f} "
                      f"{m['bwd_ms']:7.1f} {m['opt_ms']:6.1f}  {m['ratio']:6.3f} {m['ratio_vs_ideal']:6.3f} "
                      f"{m['ideal_with_optimizer']:9.3f} {m['ratio'] / m['ideal_with_optimizer']:10.3f}  "
                      f"{m['fwd_bwd_ratio']:13.3f} {m['fwd_bwd_ratio_vs_ideal']:6.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    if args.profile:
        ours = next(r for r in runners if r.name == "ours")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], with_stack=False) as prof:
            for s in range(args.profile):
                ours.step(batches[s % len(batches)], record=False)
        if rank == 0:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
