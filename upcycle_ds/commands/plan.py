"""Per-rank GPU memory plan for training an MoE model (or a dense one upcycled to MoE) with native DeepSpeed-MoE:
parameters, gradients, optimizer states (exact, as DeepSpeed allocates them) and activations (an estimate), split into
the non-expert part (replicated) and the expert part (1/ep per rank); whether it fits the GPU, and the smallest
expert-parallel size / ZeRO stage that fits (also with the optimizer offloaded to host memory: ZeRO-Offload, with the
node's host memory it needs and an estimate of the time it adds per step); forward FLOPs per token (active parameters;
vs the dense model when upcycling one, also fine-grained: --granularity, --shared-fraction). Reads config.json only.
See docs/planning.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from ..errors import UserError
from ..families import family_for
from ..plan import (CPU_ADAM_NS_PER_PARAM, DEFAULT_HOST_MEMORY_GB, GIB, HOST_MEMORY_BANDWIDTH_GBS, Flops, Plan, Setup,
                    forward_flops, load_config, make_plan, shape_from_config, smallest_fit, suggestions, upcycled_shape,
                    usable_bytes, valid_ep_sizes)


@dataclass(kw_only=True)
class Args:
    model: str
    """HF checkpoint dir (dense or MoE) or a config.json file; only config.json is read."""
    num_experts: int | None = None
    """Experts per MoE layer when upcycling a dense model (an MoE config's own count is used otherwise)."""
    top_k: int | None = None
    """Experts per token when upcycling a dense model (an MoE config's own value is used otherwise)."""
    layers: str = "all"
    """Layers that become MoE when upcycling a dense model: all, every:N or i,j,..."""
    granularity: int = 1
    """Granular upcycling of a dense model: experts of intermediate size I/G (see `upcycle --granularity`)."""
    shared_fraction: float = 0.0
    """Granular upcycling of a dense Qwen2 model: fraction of the dense neurons in the shared expert."""
    ep_size: int = 1
    """Expert-parallel size (divides the number of experts and the world size)."""
    zero_stage: int = 1
    """ZeRO stage 0, 1 or 2 (native DeepSpeed-MoE does not support 3); as `upcycle-ds train --zero-stage`."""
    nodes: int = 1
    """Number of nodes."""
    gpus_per_node: int = 8
    """GPUs (ranks) per node."""
    micro_batch_size: int = 2
    """Packed rows per rank per micro step; as `upcycle-ds train --micro-batch-size`."""
    max_length: int = field(default=512, metadata={"aliases": ["seq_len"]})
    """Tokens per packed training row; as `upcycle-ds train --max-length`."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """Training precision: bf16 mixed precision (bf16 params/grads, fp32 master + Adam) or fp32."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward (HF gradient checkpointing); as `upcycle-ds train
    --activation-checkpointing` (same default: off)."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU in GiB (torch reports 79.2 GiB for an 80 GB H100; the margin covers the difference)."""
    margin: float = 0.10
    """Fraction of GPU memory kept free for what is not modelled: CUDA context and kernels, NCCL buffers, allocator
    fragmentation, temporaries in backward."""
    reduce_bucket_size: int = 500_000_000
    """DeepSpeed zero_optimization.reduce_bucket_size (elements); the bucket is allocated in full."""
    json: bool = False
    """Print the plan as JSON instead of tables."""
    grad_accum: int = 1
    """Micro-steps per optimizer step; as `upcycle-ds train --grad-accum` (with the optimizer offloaded, accumulation
    adds a host gradient buffer and host<->device copies per micro-step)."""
    offload_optimizer: bool = False
    """Plan with the optimizer offloaded to host memory (ZeRO-Offload, ZeRO 1/2); as `upcycle-ds train
    --offload-optimizer`. Without it the layout search still tries offloading when nothing else fits."""
    offload_pin_memory: bool = False
    """Pinned host buffers for the offloaded optimizer; as `upcycle-ds train --offload-pin-memory` (faster copies in the
    step-time estimate)."""
    host_memory_gb: float = DEFAULT_HOST_MEMORY_GB
    """Host RAM of one node in GiB, which the offloaded optimizer state of its ranks must fit (less --margin); the
    default is that of DGX H100/H200 and AWS p5 nodes (GCP a3-highgpu-8g has 1743 GiB, a DGX A100 1024)."""
    pcie_gbps: float | None = None
    """Host<->device copy bandwidth per GPU in GB/s for the offload step-time estimate (default: 50 with pinned
    buffers, 25 without: PCIe Gen5 x16)."""
    host_memory_bandwidth_gbs: float = HOST_MEMORY_BANDWIDTH_GBS
    """Sustained host memory bandwidth of one node in GB/s for the offload step-time estimate (the CPU AdamW step of all
    ranks streams through it)."""


def run(args: Args) -> int:
    from .. import checks

    checks.fraction("--margin", args.margin)
    for flag, v in (("--gpu-memory-gb", args.gpu_memory_gb), ("--host-memory-gb", args.host_memory_gb),
                    ("--host-memory-bandwidth-gbs", args.host_memory_bandwidth_gbs), ("--pcie-gbps", args.pcie_gbps)):
        if v is not None:
            checks.positive(flag, v)
    checks.pin_needs_offload(args.offload_pin_memory, args.offload_optimizer)
    config = load_config(args.model)
    family, is_moe = family_for(config)
    family.check_config(config, f"{args.model} config.json")
    if is_moe:
        shape = shape_from_config(config)
        for flag, want, have in (("--num-experts", args.num_experts, shape.num_experts),
                                 ("--top-k", args.top_k, shape.top_k)):
            if want is not None and want != have:
                raise UserError(f"{flag} {want} differs from the MoE config's {have}; drop the flag")
        for flag, given in (("--layers", args.layers != "all"), ("--granularity", args.granularity != 1),
                            ("--shared-fraction", args.shared_fraction != 0)):
            if given:
                raise UserError(f"{flag} applies to upcycling a dense model; the MoE config fixes its MoE layers "
                                f"and expert sizes")
        dense_shape = None
    else:
        if args.num_experts is None or args.top_k is None:
            raise UserError("a dense model needs --num-experts and --top-k (the MoE it will be upcycled into)")
        shape = upcycled_shape(config, num_experts=args.num_experts, top_k=args.top_k, layers=args.layers,
                               granularity=args.granularity, shared_fraction=args.shared_fraction)
        dense_shape = shape_from_config(config)
    setup = Setup(nodes=args.nodes, gpus_per_node=args.gpus_per_node, ep_size=args.ep_size,
                  zero_stage=args.zero_stage, dtype=args.dtype, micro_batch_size=args.micro_batch_size,
                  seq_len=args.max_length, activation_checkpointing=args.activation_checkpointing,
                  reduce_bucket_size=args.reduce_bucket_size, grad_accum=args.grad_accum,
                  offload_optimizer=args.offload_optimizer, offload_pin_memory=args.offload_pin_memory)
    estimate = {"pcie_gbs": args.pcie_gbps, "host_memory_bandwidth_gbs": args.host_memory_bandwidth_gbs}
    plan = make_plan(shape, setup, **estimate)
    grid = suggestions(shape, setup, args.gpu_memory_gb, args.margin, **estimate)
    best = smallest_fit(grid, args.gpu_memory_gb, args.margin, args.activation_checkpointing, args.offload_optimizer,
                        args.host_memory_gb)
    layout, why = run_layout(plan, grid, best, args)
    flops = forward_flops(shape, args.max_length)
    dense_flops = forward_flops(dense_shape, args.max_length) if dense_shape is not None else None
    command = train_command(args, layout) if layout is not None else None
    if args.json:
        print(json.dumps({**_as_json(plan, shape, grid, best, args), "flops": _flops_json(flops, dense_flops),
                          "train_command": command, "why": why}, indent=2))
    else:
        print(render(plan, shape, grid, best, args))
        print(render_flops(shape, flops, dense_flops, args.max_length))
        print("")
        print(f"command ({why}):\n  {command}" if command else f"no command: {why}")
    return 0


def run_layout(plan: Plan, grid, best, args: Args) -> tuple[tuple[int, int, bool, bool] | None, str]:
    """The one layout `plan` prints a command for, and why: the one asked for when it fits, else the smallest that
    fits (`best`), else none."""
    asked = (args.ep_size, args.zero_stage, args.activation_checkpointing, args.offload_optimizer)
    if plan.fits(args.gpu_memory_gb, args.margin, args.host_memory_gb):
        return asked, f"the layout asked for fits: {_gib(plan.peak)} GiB per GPU{_host(plan)}"
    if best is None:
        return None, ("nothing fits, even with the optimizer offloaded; lower --micro-batch-size / --max-length, or "
                      "add GPUs")
    pick = grid[best]
    return best, (f"the layout asked for does not fit; this is the smallest ep_size, then ZeRO stage, that fits: "
                  f"{_gib(pick.peak)} GiB per GPU{_host(pick)}")


def _host(plan: Plan) -> str:
    if not plan.setup.offload_optimizer:
        return ""
    return (f", {_gib(plan.host_per_node)} GiB host memory per node, ~+{plan.offload.total_s:.1f} s per optimizer "
            f"step (estimate)")


def train_command(args: Args, layout: tuple[int, int, bool, bool]) -> str:
    """The `upcycle-ds train` command of this plan with `layout` = (ep size, ZeRO stage, activation checkpointing,
    optimizer offloaded)."""
    import shlex

    ep, st, ac, off = layout
    cmd = ["upcycle-ds", "train", "--nproc", str(args.gpus_per_node), "--model", args.model, "--data", "DATA",
           "--out", "OUT", "--ep-size", str(ep), "--zero-stage", str(st), "--dtype", args.dtype,
           "--micro-batch-size", str(args.micro_batch_size), "--max-length", str(args.max_length)]
    if args.grad_accum != 1:
        cmd += ["--grad-accum", str(args.grad_accum)]
    if ac:
        cmd.append("--activation-checkpointing")
    if off:
        cmd.append("--offload-optimizer")
        if args.offload_pin_memory:
            cmd.append("--offload-pin-memory")
    if args.num_experts is not None and not family_for(load_config(args.model))[1]:
        if args.granularity != 1 or args.shared_fraction:
            cmd[5] = "MOE_DIR"  # granular upcycling happens in `upcycle-ds upcycle`, not on the fly
        else:
            cmd += ["--num-experts", str(args.num_experts), "--top-k", str(args.top_k), "--layers", args.layers]
    line = " ".join(shlex.quote(c) for c in cmd)
    if args.nodes > 1:
        line += f"   (x {args.nodes} nodes: see slurm/train.sbatch)"
    return line


def _flops_json(flops: Flops, dense: Flops | None) -> dict:
    out = {"forward_per_token": flops.total, "training_per_token": 3 * flops.total,
           "parts": {k: getattr(flops, k) for k in ("attention", "mlp", "experts", "router", "lm_head")},
           "active_params": flops.active_params}
    if dense is not None:
        out["dense_forward_per_token"] = dense.total
        out["ratio_to_dense"] = flops.total / dense.total
    return out


def render_flops(shape, flops: Flops, dense: Flops | None, seq_len: int) -> str:
    """Forward FLOPs per token, with where they go, and the expert sizes they come from."""
    moe = [m for m in shape.mlps if m.is_moe]
    sizes = ""
    if moe:
        m = moe[0]
        sizes = f"; experts: {m.num_experts} x intermediate {m.expert_intermediate}, top-{m.top_k}"
        if m.shared_intermediate:
            sizes += f", shared expert intermediate {m.shared_intermediate}"
    g = 1e9
    line = (f"forward FLOPs per token (matmuls, seq {seq_len}): {flops.total / g:.3f} GFLOP = attention "
            f"{flops.attention / g:.3f} + routed experts {flops.experts / g:.3f} + dense MLPs/shared "
            f"{flops.mlp / g:.3f} + routers {flops.router / g:.4f} + lm_head {flops.lm_head / g:.3f}; training ~3x; "
            f"active parameters {flops.active_params / 1e9:.3f} B{sizes}")
    if dense is not None:
        line += f"\n  vs the dense model: {dense.total / g:.3f} GFLOP per token, ratio {flops.total / dense.total:.3f}"
    return line


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def render(plan: Plan, shape, grid, best, args: Args) -> str:
    s, c = plan.setup, plan.params
    usable = usable_bytes(args.gpu_memory_gb, args.margin)
    offload = ("; optimizer offloaded to host memory" + (" (pinned)" if s.offload_pin_memory else "")
               if s.offload_optimizer else "")
    lines = [
        f"model: {shape.model_type}, {shape.num_layers} layers ({len(shape.moe_layers)} MoE), "
        f"{shape.num_experts} experts top-{shape.top_k}, hidden {shape.hidden}, vocab {shape.vocab}",
        f"parameters: {c.total / 1e9:.3f} B = {c.non_expert / 1e9:.3f} B non-expert (replicated) + "
        f"{c.expert / 1e9:.3f} B expert ({c.expert / s.ep_size / 1e9:.3f} B per rank at ep_size {s.ep_size})",
        f"layout: world {s.world} = {s.nodes} nodes x {s.gpus_per_node} GPUs; ep_size {s.ep_size}, expert-DP "
        f"{s.world // s.ep_size}; ZeRO-{s.zero_stage}; {s.dtype}; micro batch {s.micro_batch_size} x seq "
        f"{s.seq_len}" + (f" x grad accum {s.grad_accum}" if s.grad_accum != 1 else "")
        + f"; activation checkpointing {'on' if s.activation_checkpointing else 'off'}{offload}",
        "",
    ]
    head = ("component", "non-expert GiB", "expert GiB", "total GiB", "")
    body = [(r.name, _gib(r.non_expert), _gib(r.expert), _gib(r.total), r.note) for r in plan.rows.values()]
    held = [k for k in ("params", "grads", "optim", "bucket", "offload_buf") if k in plan.rows]
    trans = ["act_layers", "act_logits"] if plan.activations >= plan.rows["step_grads"].total else ["step_grads"]
    peak_ne = sum(plan.rows[k].non_expert for k in held + trans)
    peak_ex = sum(plan.rows[k].expert for k in held + trans)
    body.append(("peak per rank", _gib(peak_ne), _gib(peak_ex), _gib(plan.peak),
                 "states + max(activations, fp32 step grads)"))
    lines += _table(head, body, rule_before=len(body) - 1, left=(0, 4))
    fits = plan.fits_gpu(args.gpu_memory_gb, args.margin)
    lines += ["", f"usable per GPU: {_gib(usable)} GiB ({args.gpu_memory_gb:g} GiB - {args.margin:.0%} margin) -> "
                  f"{'FITS' if fits else 'DOES NOT FIT'} ({_gib(plan.peak)} GiB peak)", ""]
    if plan.host:
        lines += render_host(plan, args) + [""]
    eps = valid_ep_sizes(shape.num_experts, s.world)
    lines.append("peak GPU GiB per rank for every valid layout (* = fits" + (", host memory included" if any(
        k[3] for k in grid) else "") + "):")
    cols = [(st, ac, off) for off in (False, True) for ac in (False, True) for st in ((1, 2) if off else (0, 1, 2))]
    ghead = ("ep_size",) + tuple(f"Z{st}" + ("+AC" if ac else "") + ("+off" if off else "") for st, ac, off in cols)
    gbody = []
    for ep in eps:
        row = [str(ep)]
        for st, ac, off in cols:
            p = grid[(ep, st, ac, off)]
            row.append(_gib(p.peak) + ("*" if p.fits(args.gpu_memory_gb, args.margin, args.host_memory_gb) else " "))
        gbody.append(tuple(row))
    lines += _table(ghead, gbody)
    lines.append(f"(Z = ZeRO stage; AC = activation checkpointing; off = optimizer offloaded, {args.host_memory_gb:g} "
                 f"GiB of host memory per node)")
    lines.append("Model states follow DeepSpeed 0.19's allocations; activations are an estimate (docs/planning.md).")
    return "\n".join(lines)


def render_host(plan: Plan, args: Args) -> list[str]:
    """The offloaded optimizer: host bytes per rank and node against the node's RAM, and the step-time estimate."""
    s, cost = plan.setup, plan.offload
    head = ("host memory per rank", "non-expert GiB", "expert GiB", "total GiB", "")
    body = [(r.name, _gib(r.non_expert), _gib(r.expert), _gib(r.total), r.note) for r in plan.host.values()]
    body.append(("per rank", _gib(sum(r.non_expert for r in plan.host.values())),
                 _gib(sum(r.expert for r in plan.host.values())), _gib(plan.host_per_rank),
                 "pinned (page-locked)" if s.offload_pin_memory else "pageable"))
    lines = _table(head, body, rule_before=len(body) - 1, left=(0, 4))
    usable = usable_bytes(args.host_memory_gb, args.margin)
    fits = plan.fits_host(args.host_memory_gb, args.margin)
    lines += ["", f"host memory per node: {s.gpus_per_node} ranks x {_gib(plan.host_per_rank)} = "
                  f"{_gib(plan.host_per_node)} GiB; usable {_gib(usable)} GiB ({args.host_memory_gb:g} GiB - "
                  f"{args.margin:.0%} margin) -> {'FITS' if fits else 'DOES NOT FIT'}"]
    bound = "host memory bandwidth" if cost.adam_memory_s >= cost.adam_cpu_s else "one core per rank"
    lines.append(
        f"offload step time (estimate for a GPU node): +{cost.total_s:.2f} s per optimizer step = copies "
        f"{cost.copy_s:.2f} s ({(cost.d2h_bytes + cost.h2d_bytes) / 1e9:.2f} GB per GPU at {cost.pcie_gbs:g} GB/s) + "
        f"CPU AdamW {cost.adam_s:.2f} s ({cost.node_params / 1e9:.2f} B parameters per node, bound by {bound}: "
        f"{args.host_memory_bandwidth_gbs:g} GB/s, {CPU_ADAM_NS_PER_PARAM} ns per parameter per core)")
    return lines


def _table(head, body, rule_before: int | None = None, left: tuple[int, ...] = (0,)) -> list[str]:
    """Plain-text table; columns in `left` are left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in (head, *body)) for i in range(len(head))]

    def fmt(r):
        return "  ".join(str(v).ljust(w) if i in left else str(v).rjust(w)
                         for i, (v, w) in enumerate(zip(r, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths).rstrip()
    out = [fmt(head), rule]
    for i, r in enumerate(body):
        if i == rule_before:
            out.append(rule)
        out.append(fmt(r))
    return out


def _as_json(plan: Plan, shape, grid, best, args: Args) -> dict:
    return {
        "model_type": shape.model_type,
        "params": {"non_expert": plan.params.non_expert, "expert": plan.params.expert, "total": plan.params.total},
        "setup": asdict(plan.setup),
        "rows_bytes": {k: {"non_expert": r.non_expert, "expert": r.expert, "total": r.total}
                       for k, r in plan.rows.items()},
        "peak_bytes": plan.peak,
        "usable_bytes": usable_bytes(args.gpu_memory_gb, args.margin),
        "fits": plan.fits(args.gpu_memory_gb, args.margin, args.host_memory_gb),
        "fits_gpu": plan.fits_gpu(args.gpu_memory_gb, args.margin),
        "host": None if not plan.host else {
            "rows_bytes": {k: {"non_expert": r.non_expert, "expert": r.expert, "total": r.total}
                           for k, r in plan.host.items()},
            "per_rank_bytes": plan.host_per_rank, "per_node_bytes": plan.host_per_node,
            "usable_bytes": usable_bytes(args.host_memory_gb, args.margin),
            "fits": plan.fits_host(args.host_memory_gb, args.margin),
            "offload_estimate_s": {"copies": plan.offload.copy_s, "cpu_adam": plan.offload.adam_s,
                                   "total": plan.offload.total_s},
            "offload_bytes_per_rank": {"d2h": plan.offload.d2h_bytes, "h2d": plan.offload.h2d_bytes}},
        "grid": [{"ep_size": ep, "zero_stage": st, "activation_checkpointing": ac, "offload_optimizer": off,
                  "peak_bytes": p.peak, "host_per_node_bytes": p.host_per_node,
                  "fits": p.fits(args.gpu_memory_gb, args.margin, args.host_memory_gb)}
                 for (ep, st, ac, off), p in grid.items()],
        "suggestion": None if best is None else {"ep_size": best[0], "zero_stage": best[1],
                                                 "activation_checkpointing": best[2], "offload_optimizer": best[3]},
    }
