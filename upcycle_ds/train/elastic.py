"""Resume a checkpoint on another layout: world size, expert-parallel size, ZeRO stage (0/1/2), fp32 or bf16.

DeepSpeed loads ZeRO optimizer state only at the data-parallel size it was saved with, and its universal checkpoint
does not understand native MoE layers (docs/training.md, "Resuming on another layout", has the measurements). So we
re-partition the optimizer state ourselves, into a live engine:

1. DeepSpeed loads the module weights (`load_module_only`): non-expert weights, and the experts of this rank's
   expert-parallel slice from their per-expert files, at any ep size.
2. For every parameter the optimizer holds, the saved state (`io.ds_optim`: fp32 master, AdamW exp_avg, exp_avg_sq,
   step, read from the saved ranks' files, whatever their layout) is written into this rank's optimizer: into its
   ZeRO partition (the fragment addresses DeepSpeed links every parameter to, `safe_set_full_fp32_param` for the
   master), or into the per-parameter state of a ZeRO-0 optimizer; the model weight becomes the master in the
   training dtype.
3. LR schedule position, DeepSpeed's step counters and the data position carry over; RNG: see `restore_rng`.

The data position is global: TrainState.batch_in_epoch counts this rank's micro-batches, so the rows consumed in the
epoch are batch_in_epoch x world x micro_batch_size, the same at any layout with the same global batch
(docs/data.md). A checkpoint therefore fixes the global batch (rows per optimizer step): resuming on another world
size sets --grad-accum to keep it (`adapt_grad_accum`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..io.ds import MODEL_STATES
from ..io.ds_optim import ParamState, SavedOptimizer, has_optimizer_state, open_saved_optimizer, saved_layout
from ..io.safe_load import safe_load
from ..moe.names import to_global

LAYOUT_KEYS = ("world_size", "ep_size", "zero_stage", "dtype")
"""What the optimizer's partitions depend on: a checkpoint saved with other values is resumed elastically."""


# ------------------------------------------------------------------------------------------------------ layout
def read_run(tag_dir: Path) -> dict:
    """What checkpoint `tag_dir` holds about its run (train_state, layout, LR schedule, DeepSpeed's counters): from
    its model file, or from a converted checkpoint's universal optimizer file."""
    from ..io.ds_optim import UNIVERSAL, run_state

    tag_dir = Path(tag_dir)
    if (tag_dir / UNIVERSAL).is_file():
        run = safe_load(tag_dir / UNIVERSAL, "cpu", mmap=True).get("run")
        return run if isinstance(run, dict) else {}
    states = safe_load(tag_dir / MODEL_STATES, "cpu", mmap=True)
    return {**run_state(states), "ds_config": states.get("ds_config"), "dp_world_size": states.get("dp_world_size")}


def read_layout(tag_dir: Path) -> dict:
    """The layout checkpoint `tag_dir` was saved with (completed from DeepSpeed's ds_config where older checkpoints
    lack a key)."""
    return saved_layout(read_run(tag_dir))


def is_native(tag_dir: Path) -> bool:
    """A checkpoint DeepSpeed wrote itself (per-rank optimizer files), not a converted universal one."""
    return has_optimizer_state(tag_dir) and not (Path(tag_dir) / "universal_optim_states.pt").is_file()


def differences(saved: dict, now: dict) -> list[str]:
    """`key saved -> now` for every layout setting the optimizer partitions depend on that differs."""
    return [f"{k} {saved[k]} -> {now[k]}" for k in LAYOUT_KEYS if saved.get(k) is not None and saved[k] != now[k]]


def global_batch(layout: dict) -> int | None:
    """Rows per optimizer step (micro batch x ranks x grad accum), None when the layout does not say."""
    try:
        return int(layout["micro_batch_size"]) * int(layout["world_size"]) * int(layout["grad_accum"])
    except (KeyError, TypeError, ValueError):
        return None


def adapt_grad_accum(args, world: int, saved: dict) -> str | None:
    """Keep the checkpoint's global batch: set args.grad_accum to global / (micro batch x world) when this run's
    differs (another world size, or a config written for one). Returns a line saying what changed (None if nothing
    did); a UserError when the global batch cannot be kept. A run that wants another global batch starts anew from
    the checkpoint (--model)."""
    G = global_batch(saved)
    if G is None:
        return None
    per_step = args.micro_batch_size * world
    if args.micro_batch_size * args.grad_accum * world == G:
        return None
    if G % per_step:
        raise UserError(f"--resume: the checkpoint was trained with a global batch of {G} rows per step (micro batch "
                        f"{saved['micro_batch_size']} x {saved['world_size']} ranks x grad accum "
                        f"{saved['grad_accum']}), which micro batches of {args.micro_batch_size} on {world} ranks "
                        f"cannot make; use a --micro-batch-size that divides {G // world if G % world == 0 else G}, "
                        f"or start a new run from the checkpoint with --model")
    if args.global_batch_size is not None and args.global_batch_size != G:
        raise UserError(f"--resume: --global-batch-size {args.global_batch_size}, but the checkpoint was trained with "
                        f"{G} rows per step; the data order and LR schedule continue only with the same global batch")
    old, args.grad_accum = args.grad_accum, G // per_step
    return (f"--grad-accum {old} -> {args.grad_accum}: keeps the checkpoint's global batch of {G} rows per step on "
            f"{world} ranks x micro batch {args.micro_batch_size}")


def position(train_state: dict, saved: dict, now: dict) -> dict:
    """The TrainState of this layout at the checkpoint's data position (same rows, same steps)."""
    state = dict(train_state)
    try:
        rows = int(state["batch_in_epoch"]) * int(saved["world_size"]) * int(saved["micro_batch_size"])
    except (KeyError, TypeError, ValueError):
        if differences(saved, now) or saved.get("micro_batch_size") not in (None, now["micro_batch_size"]):
            raise UserError("--resume: the checkpoint does not record its world size and micro batch size, so its "
                            "data position cannot be carried to another layout") from None
        return state
    per = now["world_size"] * now["micro_batch_size"]
    if rows % per:
        raise UserError(f"--resume: the checkpoint's data position ({rows} rows into epoch {state.get('epoch')}) is "
                        f"not a whole number of micro-batches of {now['micro_batch_size']} on {now['world_size']} "
                        f"ranks")
    state["batch_in_epoch"] = rows // per
    return state


# ------------------------------------------------------------------------------------------------------ saving
def _live_kind(optimizer) -> str:
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        return "zero"
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        return "unfused"
    if isinstance(optimizer, torch.optim.Optimizer):
        return "plain"
    raise UserError(f"--resume on another layout does not support DeepSpeed's {type(optimizer).__name__}")


def _lp_groups(engine) -> list[list[torch.nn.Parameter]]:
    """The model parameters of each optimizer param group, in the optimizer's order."""
    opt = engine.optimizer
    kind = _live_kind(opt)
    if kind == "zero":
        return [list(g) for g in opt.bit16_groups]
    if kind == "unfused":
        return [list(g) for g in opt.fp16_groups]
    return [list(g["params"]) for g in opt.param_groups]


def optimizer_param_names(engine) -> list[list[str]]:
    """The names of the optimizer's parameters per param group (this rank's local expert ids): recorded with every
    checkpoint, since DeepSpeed records none for ZeRO 0 (whose state is indexed by position)."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in group] for group in _lp_groups(engine)]


# ----------------------------------------------------------------------------------------------------- loading
def _ep_rank(engine) -> int:
    if not getattr(engine, "has_moe_layers", False):
        return 0
    from deepspeed.utils import groups

    return groups._get_expert_parallel_rank(groups._get_max_expert_size_name())


def _step_tensor(step: float, group: dict, param: torch.Tensor) -> torch.Tensor:
    """AdamW's `step` as torch keeps it: on the parameter's device for fused/capturable, else a CPU scalar."""
    if group.get("fused") or group.get("capturable"):
        return torch.tensor(step, dtype=torch.float32, device=param.device)
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(step, dtype=dtype)


def _adam_state(st: ParamState, group: dict, param: torch.Tensor) -> dict:
    return {"step": _step_tensor(st.step, group, param),
            "exp_avg": st.exp_avg.to(param.device, param.dtype).reshape(param.shape),
            "exp_avg_sq": st.exp_avg_sq.to(param.device, param.dtype).reshape(param.shape)}


def apply_optimizer_state(engine, saved: SavedOptimizer, *, num_experts: int, ep_size: int,
                          lp_from_master: bool) -> dict:
    """Write `saved` into `engine`'s optimizer (this rank's share) and its trainable model weights.

    `lp_from_master`: set every model weight from its master (needed when the training dtype changed; otherwise the
    module weights DeepSpeed loaded already are the masters in the training dtype, and only this rank's partition is
    read). Returns counts {"params", "missing"} (missing: trainable parameters without saved state: they keep their
    loaded weight as master and start AdamW from zero)."""
    from deepspeed.utils import safe_set_full_fp32_param

    opt = engine.optimizer
    kind = _live_kind(opt)
    ep_rank, n_local = _ep_rank(engine), num_experts // ep_size
    names = {id(p): n for n, p in engine.module.named_parameters()}
    counts = {"params": 0, "missing": 0}

    def state_of(p) -> ParamState | None:
        name = to_global(names[id(p)], ep_rank, n_local)
        st = saved.get(name)
        if st is None:
            counts["missing"] += 1
            return None
        if tuple(st.fp32.shape) != tuple(p.shape):
            raise UserError(f"--resume: {name} is {tuple(st.fp32.shape)} in the checkpoint, {tuple(p.shape)} in this "
                            f"model")
        return st

    with torch.no_grad():
        if kind == "zero":
            base = opt.optimizer
            for i, lp_group in enumerate(opt.bit16_groups):
                flat = opt.single_partition_of_fp32_groups[i]
                assert base.param_groups[i]["params"][0] is flat, "DeepSpeed's ZeRO optimizer changed its layout"
                m, v, step = torch.zeros_like(flat), torch.zeros_like(flat), 0.0
                for p in lp_group:
                    counts["params"] += 1
                    hp = p._hp_mapping
                    if hp is None and not lp_from_master:  # not in this rank's partition: only its step
                        s = saved.step_of(to_global(names[id(p)], ep_rank, n_local))
                        counts["missing"] += s is None
                        step = max(step, s or 0.0)
                        continue
                    st = state_of(p)
                    if st is None:
                        continue
                    step = max(step, st.step)
                    master = st.fp32.to(flat.device)
                    p.data.copy_(master.reshape(p.shape).to(p.dtype))
                    if hp is not None:
                        safe_set_full_fp32_param(p, master)
                        if st.exp_avg is not None:
                            lp_a, hp_a = hp.lp_fragment_address, hp.hp_fragment_address
                            for dst, src in ((m, st.exp_avg), (v, st.exp_avg_sq)):
                                dst.narrow(0, hp_a.start, hp_a.numel).copy_(
                                    src.to(flat.device).flatten().narrow(0, lp_a.start, lp_a.numel))
                if step > 0:
                    base.state[flat] = {"step": _step_tensor(step, base.param_groups[i], flat), "exp_avg": m,
                                        "exp_avg_sq": v}
        else:
            base = opt.optimizer if kind == "unfused" else opt
            masters = opt.fp32_groups if kind == "unfused" else [g["params"] for g in opt.param_groups]
            for i, (lp_group, hp_group) in enumerate(zip(_lp_groups(engine), masters)):
                for p, hp in zip(lp_group, hp_group):
                    counts["params"] += 1
                    st = state_of(p)
                    if st is None:
                        continue
                    hp.data.copy_(st.fp32.to(hp.device, hp.dtype).reshape(hp.shape))
                    if p is not hp:
                        p.data.copy_(st.fp32.to(p.device, p.dtype).reshape(p.shape))
                    if st.exp_avg is not None:
                        base.state[hp] = _adam_state(st, base.param_groups[i], hp)
                    else:
                        base.state.pop(hp, None)
    return counts


def restore_schedule(engine, client: dict) -> None:
    """LR schedule position and DeepSpeed's step counters from the checkpoint; the learning rates are recomputed by
    this run's schedule at that position (its param groups may be split differently)."""
    from .optim import recompute_lrs

    sch, saved = engine.lr_scheduler, client.get("lr_scheduler")
    if sch is not None and isinstance(saved, dict) and "last_epoch" in saved:
        sch.last_epoch = int(saved["last_epoch"])
        sch._step_count = int(saved.get("_step_count", sch.last_epoch + 1))
        recompute_lrs(sch)
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if isinstance(client.get(key), int):
            setattr(engine, key, client[key])


def rng_seed(seed: int, step: int, rank: int) -> int:
    """The seed of rank `rank` when a run continues at `step` on another world size: a fixed function of the three,
    so such a resume is reproducible (it is not the random stream the saved ranks would have drawn)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def load(engine, ckpt_dir: Path, tag: str, *, num_experts: int, ep_size: int, lp_from_master: bool,
         param_names: list[list[str]] | None = None) -> tuple[dict, dict]:
    """Collective: load checkpoint `tag` (any layout) into `engine`. Returns (client state, counts)."""
    tag_dir = Path(ckpt_dir) / tag
    saved = open_saved_optimizer(tag_dir, param_names=param_names)
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=True,
                                          load_optimizer_states=False, load_lr_scheduler_states=False)
    if path is None:
        raise UserError(f"could not load DeepSpeed checkpoint {tag_dir}")
    client = {**(client or {}), **saved.run}
    counts = apply_optimizer_state(engine, saved, num_experts=num_experts, ep_size=ep_size,
                                   lp_from_master=lp_from_master)
    restore_schedule(engine, client)
    return client, counts


__all__ = ["LAYOUT_KEYS", "adapt_grad_accum", "apply_optimizer_state", "differences", "global_batch", "is_native",
           "load", "open_saved_optimizer", "optimizer_param_names", "position", "read_layout", "read_run",
           "restore_schedule", "rng_seed"]
