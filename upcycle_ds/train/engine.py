"""One training rank: build the DeepSpeed-MoE model, `deepspeed.initialize`, train, checkpoint, evaluate, export.

Started once per rank by `deepspeed`, `torchrun`, `srun` (slurm/train.sbatch) or `upcycle-ds train --nproc N`.
Per optimizer step: grad_accum micro-steps of forward -> LM loss (response tokens) + aux_coef * sum(aux) +
z_coef * sum(z) over MoE layers -> engine.backward -> engine.step; router statistics are summed over micro-steps
and all ranks, then logged on rank 0 (W&B + metrics.jsonl).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..dist import init_distributed, shutdown
from ..errors import UserError
from ..families import family_for
from ..moe.layer import moe_layers
from ..surgery import build_moe_model
from . import checkpoint
from .config import TrainArgs, deepspeed_config
from .data import IGNORE, DataConfig, batches, build_datasets, num_batches
from .sources import open_dense_source, open_source
from .tracking import LayerStats, Tracker


@dataclass
class TrainState:
    """What a checkpoint must remember besides weights/optimizer/LR/RNG to continue bit-exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    """micro-batches this rank has consumed in `epoch` (the same on every rank)."""


@dataclass(kw_only=True)
class StageHooks:
    """What a stage built on this engine changes; the defaults are `upcycle-ds train` (UpIT: sft, router-init)."""

    dense: bool = False
    """Train --model as the HF dense model it is (`from_pretrained`, no MoE layers, no aux/z loss; `upcycle-ds sft`)."""
    label_field: str | None = None
    """Data row field (an int per sample) carried to every token of the sample as batch["sample_labels"] (-1 on
    padding); router-init: 'expert'."""
    setup: Callable[[torch.nn.Module, list], None] | None = None
    """(model, [(layer, UpcycledMoE)]) before `deepspeed.initialize` (e.g. make the routers keep their logits)."""
    loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    """(lm=, moe=, batch=, layers=) -> (loss to backpropagate, {metric: detached scalar tensor}); default lm + moe,
    where moe = aux_loss_coef * sum(aux) + z_loss_coef * sum(z). Metrics are averaged over micro-steps and ranks."""
    after_step: Callable[..., None] | None = None
    """Collective (every rank): (engine=, step=, steps_per_epoch=, max_steps=) after each optimizer step."""
    export: Callable[..., None] | None = None
    """Collective: (engine=, ckpt_dir=, step=) at the end instead of the HF MoE export (when --export-hf)."""


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of labelled tokens); labels are aligned with inputs (shifted here)."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, (labels != IGNORE).sum()


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def apply_freeze(model: torch.nn.Module, freeze: list[str], train_only: list[str]) -> int:
    """Freeze parameters by regex; returns the number of trainable parameters (error if none)."""
    fz, only = [re.compile(p) for p in freeze], [re.compile(p) for p in train_only]
    n = 0
    for name, p in model.named_parameters():
        trainable = (not only or any(r.search(name) for r in only)) and not any(r.search(name) for r in fz)
        p.requires_grad_(trainable)
        n += p.numel() if trainable else 0
    if n == 0:
        raise UserError(f"--freeze {freeze} / --train-only {train_only} leave no trainable parameter")
    return n


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups (no decay for norms, biases, routers), split into DeepSpeed's MoE / non-MoE groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "deepspeed_moe.gate" in name or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
    if not any(g.get("moe") for g in groups):
        # DeepSpeed's ZeRO/bf16 optimizers insist on a non-empty MoE param group of trainable params when the model
        # has MoE layers. With every expert frozen (router-init) one expert weight per rank (the first) is handed to
        # the optimizer in a group with lr 0 and no decay: AdamW then adds exactly 0 to it, so it stays bit-identical.
        from deepspeed.moe.utils import is_moe_param

        frozen = [p for p in model.parameters() if is_moe_param(p)][:1]
        if frozen:
            frozen[0].requires_grad_(True)
            extra = [{"params": frozen, "weight_decay": 0.0, "lr": 0.0, "name": "frozen_experts"}]
            groups += [g for g in split_params_into_different_moe_groups_for_optimizer(extra)
                       if g["params"] and g.get("moe")]
    return groups


class RouterMeter:
    """Router statistics of the MoE layers, summed over micro-steps on this rank, reduced over all ranks."""

    def __init__(self, layers: list[tuple[int, object]], num_experts: int):
        self.layers, self.E = layers, num_experts
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(len(self.layers), self.E, dtype=torch.float64)
        self.other = torch.zeros(len(self.layers), 5, dtype=torch.float64)  # dropped, slots, aux, z, entropy
        self.n = 0

    def add(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the last forward; returns (sum of aux losses, sum of z losses) with gradients."""
        aux = z = 0.0
        for i, (_, moe) in enumerate(self.layers):
            r = moe.router
            s = r.stats
            self.counts[i] += s.tokens_per_expert.double()
            self.other[i] += torch.tensor([s.dropped, s.slots, s.aux_loss, s.z_loss, s.entropy], dtype=torch.float64)
            aux, z = aux + r.aux_loss, z + r.z_loss
        self.n += 1
        return aux, z

    def reduce(self) -> list[LayerStats]:
        flat = torch.cat([self.counts, self.other], dim=1)
        flat = torch.cat([flat.reshape(-1), torch.tensor([float(self.n)], dtype=torch.float64)])
        dist.all_reduce(flat)
        n = flat[-1].item()
        flat = flat[:-1].reshape(len(self.layers), self.E + 5)
        out = []
        for i, (layer, _) in enumerate(self.layers):
            counts, (dropped, slots, aux, z, ent) = flat[i, :self.E], flat[i, self.E:].tolist()
            out.append(LayerStats(layer=layer, tokens_per_expert=[int(c) for c in counts.tolist()],
                                  aux_loss=aux / n, z_loss=z / n, entropy=ent / n,
                                  dropped_fraction=dropped / slots if slots else 0.0))
        return out


def drop_metrics_after(path: Path, step: int) -> None:
    """On resume, forget metrics.jsonl records of steps after the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def log0(*a) -> None:
    if dist.get_rank() == 0:
        print(*a, file=sys.stderr, flush=True)


def train(args: TrainArgs, hooks: StageHooks | None = None) -> int:
    """The body of one rank. Collective: every rank of the job runs it."""
    import deepspeed
    from transformers import AutoTokenizer

    hooks = hooks or StageHooks()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    seed_everything(args.seed + rank)
    if hooks.dense:
        source = open_dense_source(args)
        num_experts = 1
    else:
        source = open_source(args)
        family, _ = family_for(source.config)
        num_experts = family.num_experts(source.config)
    args.validate(world, num_experts)
    run_dir, ckpt_dir = Path(args.out), Path(args.out) / "checkpoints"
    if not args.resume and checkpoint.latest_tag(ckpt_dir) is not None:
        raise UserError(f"{ckpt_dir} already holds a checkpoint; pass --resume to continue it or use a new --out")

    tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir), trust_remote_code=args.trust_remote_code)
    data_cfg = DataConfig(data=args.data, max_length=args.max_length, eval_fraction=args.eval_fraction,
                          eval_data=args.eval_data, seed=args.seed, max_samples=args.max_samples,
                          label_field=hooks.label_field)
    train_ds, eval_ds = build_datasets(data_cfg, tokenizer)
    per_epoch = num_batches(len(train_ds), micro_batch_size=args.micro_batch_size, world_size=world)
    if per_epoch < args.grad_accum:
        raise UserError(f"{args.data}: {len(train_ds)} packed rows of {args.max_length} tokens are too few for one "
                        f"step of {args.micro_batch_size} x {args.grad_accum} micro-batches on {world} ranks")
    steps_per_epoch = per_epoch // args.grad_accum
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    log0(f"[upcycle-ds train] {world} ranks, ep_size {args.ep_size}, ZeRO-{args.zero_stage}, {args.dtype}; "
         f"data: {train_ds.summary()}; {max_steps} steps ({steps_per_epoch} per epoch)")

    if hooks.dense:
        model = source.load_model()
    else:
        model = build_moe_model(source, ep_size=args.ep_size, capacity_factor=args.capacity_factor)
    if hooks.setup is not None:
        hooks.setup(model, moe_layers(model))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    apply_freeze(model, args.freeze, args.train_only)
    optimizer = torch.optim.AdamW(optimizer_groups(model, args.weight_decay), lr=args.lr,
                                  betas=tuple(args.adam_betas), eps=1e-8, fused=args.fused_adam)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, max_steps,
                                                                       args.min_lr_ratio))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(args, world))
    layers = moe_layers(engine.module)
    meter = RouterMeter(layers, num_experts)

    state = TrainState()
    if args.resume:
        loaded = checkpoint.load(engine, ckpt_dir)
        if loaded is not None:
            state = TrainState(**loaded[1]["train_state"])
            log0(f"[upcycle-ds train] resumed from {ckpt_dir}/{loaded[0]} at step {state.step}")
            if rank == 0:
                drop_metrics_after(run_dir / "metrics.jsonl", state.step)
    if rank == 0:
        checkpoint.write_model_files(ckpt_dir, source.config, source.tokenizer_dir)
    tracker = Tracker(run_dir, args.to_dict(), enabled=rank == 0, mode=args.wandb_mode, project=args.wandb_project)
    saved_at = state.step if args.resume else -1

    def save() -> None:
        nonlocal saved_at
        if saved_at != state.step:
            checkpoint.save(engine, ckpt_dir, state.step, {"train_state": vars(state).copy()})
            saved_at = state.step

    def micro_batches():
        while True:
            if state.batch_in_epoch >= per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            for b in batches(train_ds, micro_batch_size=args.micro_batch_size, rank=rank, world_size=world,
                             seed=args.seed, epoch=state.epoch, start=state.batch_in_epoch):
                state.batch_in_epoch += 1
                yield b

    stream = micro_batches()
    steps_here = 0
    exit_code = 0
    try:
        engine.train()
        while state.step < max_steps:
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            meter.reset()
            lm_sum = torch.zeros(2, dtype=torch.float64)
            extra: dict[str, torch.Tensor] = {}
            for _ in range(args.grad_accum):
                b = next(stream)
                out = engine(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)
                loss_sum, n_tok = causal_lm_loss(out.logits, b["labels"])
                lm = loss_sum / n_tok.clamp_min(1)
                aux, z = meter.add()
                loss = lm + args.aux_loss_coef * aux + args.z_loss_coef * z
                if hooks.loss is not None:
                    loss, metrics = hooks.loss(lm=lm, moe=loss - lm, batch=b, layers=layers)
                    for k, v in metrics.items():
                        extra[k] = extra.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float64).detach()
                engine.backward(loss)
                engine.step()
                lm_sum += torch.tensor([float(lm.detach()), 1.0], dtype=torch.float64)
            state.step += 1
            steps_here += 1
            dist.all_reduce(lm_sum)
            names = sorted(extra)
            if names:
                ex = torch.stack([extra[k] for k in names]).double()
                dist.all_reduce(ex)
                extra = {k: v / lm_sum[1].item() for k, v in zip(names, ex.tolist())}
            stats = meter.reduce()
            dt = time.perf_counter() - t0
            tokens = args.micro_batch_size * args.grad_accum * world * args.max_length
            tracker.log_step(state.step, {"loss": lm_sum[0].item() / lm_sum[1].item(),
                                          "lr": lr, "tokens_per_s": tokens / dt,
                                          "step_time_s": dt, "epoch": state.epoch, **extra}, stats)
            if hooks.after_step is not None:
                hooks.after_step(engine=engine, step=state.step, steps_per_epoch=steps_per_epoch,
                                 max_steps=max_steps)
            if args.eval_every and state.step % args.eval_every == 0 and eval_ds is not None:
                evaluate(engine, eval_ds, args, world, rank, layers, num_experts, tracker, state.step)
            if args.save_every and state.step % args.save_every == 0:
                save()
            if args.exit_after_steps and steps_here >= args.exit_after_steps and state.step < max_steps:
                save()
                log0(f"[upcycle-ds train] exiting after {steps_here} steps at step {state.step} (--exit-after-steps)")
                return 0
        if eval_ds is not None and not (args.eval_every and state.step % args.eval_every == 0):
            evaluate(engine, eval_ds, args, world, rank, layers, num_experts, tracker, state.step)
        save()
        if args.debug_dump_logits:
            dump_final_logits(engine, eval_ds if eval_ds is not None else train_ds, args, world, rank, run_dir)
        if args.export_hf and hooks.export is not None:
            hooks.export(engine=engine, ckpt_dir=ckpt_dir, step=state.step)
        elif args.export_hf:
            dist.barrier()
            if rank == 0:
                from ..convert import ds_to_hf_moe

                ds_to_hf_moe(ckpt_dir, run_dir / "hf", tag=checkpoint.tag_for(state.step), overwrite=True)
                log0(f"[upcycle-ds train] HF MoE export: {run_dir / 'hf'}")
        return 0
    except BaseException:
        exit_code = 1
        raise
    finally:
        tracker.finish(exit_code=exit_code)


@torch.no_grad()
def evaluate(engine, eval_ds, args: TrainArgs, world: int, rank: int, layers, num_experts: int, tracker: Tracker,
             step: int) -> float:
    engine.eval()
    meter = RouterMeter(layers, num_experts)
    tot = torch.zeros(2, dtype=torch.float64)
    for b in batches(eval_ds, micro_batch_size=args.micro_batch_size, rank=rank, world_size=world, seed=args.seed,
                     epoch=0, shuffle=False, pad_remainder=True):
        out = engine(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)
        loss_sum, n_tok = causal_lm_loss(out.logits, b["labels"])
        meter.add()
        tot += torch.tensor([float(loss_sum), float(n_tok)], dtype=torch.float64)
    dist.all_reduce(tot)
    stats = meter.reduce()
    loss = tot[0].item() / max(1.0, tot[1].item())
    if stats:
        tracker.log_eval(step, {"loss": loss}, np.stack([s.fractions() for s in stats]), [s.layer for s in stats])
    else:  # a dense model (sft): no expert load to draw
        tracker.log_step(step, {"eval/loss": loss}, [])
    log0(f"[upcycle-ds train] step {step}: eval loss {loss:.4f}")
    engine.train()
    return loss


@torch.no_grad()
def dump_final_logits(engine, ds, args: TrainArgs, world: int, rank: int, run_dir: Path) -> Path:
    """--debug-dump-logits: the trained engine's fp32 logits on this rank's first (unshuffled) micro-batch of `ds`,
    saved with its inputs to OUT/debug/final_logits_rank{r}.pt. Collective (expert parallelism): every rank calls it."""
    engine.eval()
    b = next(batches(ds, micro_batch_size=args.micro_batch_size, rank=rank, world_size=world, seed=args.seed,
                     epoch=0, shuffle=False, pad_remainder=True))
    out = engine(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)
    path = Path(run_dir) / "debug" / f"final_logits_rank{rank}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"input_ids": b["input_ids"], "position_ids": b["position_ids"], "logits": out.logits.float()}, path)
    engine.train()
    return path


def run_rank(args: TrainArgs, hooks: StageHooks | None = None) -> int:
    try:
        return train(args, hooks)
    finally:
        shutdown()
