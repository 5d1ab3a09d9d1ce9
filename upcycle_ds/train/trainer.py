"""The Trainer: one rank of a DeepSpeed training job — build, step, evaluate, save, export.

`upcycle-ds train`, `sft` and `router-init` (through `StageHooks`) and `bench/step_time.py` all train with it. Started
once per rank by `deepspeed`, `torchrun`, `srun` (slurm/train.sbatch) or `upcycle-ds train --nproc N`.

Device rules, kept here in one place (a CPU cannot see a violation, so tests check them: tests/test_device_rules.py):
- the model is built directly in the training dtype on this rank's device (meta -> empty on the device -> this
  rank's weights copied in tensor by tensor), so no rank ever holds the fp32 model on the host;
- every micro-batch is moved to the engine's device before the forward; losses and router statistics stay there
  (`metrics.StepMeter`), and one all_reduce + one device->host copy per logging step (`--log-every`) brings them to
  rank 0's log line, W&B and metrics.jsonl;
- waiting for another rank's disk writes (checkpoints, HF exports) happens in a host-side barrier with its own
  timeout (`launch.distributed.wait_for_io`), never inside a training collective.

Per optimizer step: grad_accum micro-steps of forward -> LM loss (response tokens) + aux_coef * sum(aux) +
z_coef * sum(z) over MoE layers -> engine.backward -> engine.step.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import UserError
from ..families import family_for
from ..io.atomic import write_text_atomic
from ..launch.lifeline import hold_run
from .inputs import check_run_apart
from ..launch.distributed import any_rank, init_distributed, one_error_for_all, shutdown, wait_for_io
from ..moe import balance
from ..moe.layer import moe_layers
from . import checkpoint, elastic
from .config import TrainArgs, deepspeed_config
from ..data import IGNORE, DataConfig, batches, num_batches, open_cache, prepare_cache
from .metrics import StepMeter, step_line
from .optim import apply_freeze, build_optimizer, lr_lambda
from .sources import open_dense_source, open_source
from .tracking import Tracker

STOPPED_FILE_ENV = "UPCYCLE_DS_STOPPED_FILE"
"""When set (slurm/*.sbatch set it), rank 0 writes the step into this file after stopping early on STOP_SIGNAL with
a checkpoint saved: the batch script then requeues the job."""
STOP_SIGNAL = signal.SIGUSR1
"""Save at the next logging step and exit (Slurm sends it before the time limit: slurm/train.sbatch)."""


@dataclass
class TrainState:
    """What a checkpoint must remember besides weights/optimizer/LR/RNG to continue bit-exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    """micro-batches this rank has consumed in `epoch` (the same on every rank)."""


@dataclass(kw_only=True)
class StageHooks:
    """What a stage built on the Trainer changes; the defaults are `upcycle-ds train` (UpIT: sft, router-init)."""

    prog: str = "upcycle-ds train"
    """Prefix of the log lines."""
    dense: bool = False
    """Train --model as the HF dense model it is (no MoE layers, no aux/z loss; `upcycle-ds sft`)."""
    label_field: str | None = None
    """Data row field (an int per sample) carried to every token of the sample as batch["sample_labels"] (-1 on
    padding); router-init: 'expert'."""
    setup: Callable[..., None] | None = None
    """(model=, layers=[(layer, UpcycledMoE)], config=the source's config.json dict, data=the training
    PackedDataset) before `deepspeed.initialize`: check the data against the model, make the routers keep their
    logits, ..."""
    loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    """(lm=, moe=, batch=, layers=) -> (loss to backpropagate, {metric: detached device scalar}); default lm + moe,
    where moe = aux_loss_coef * sum(aux) + z_loss_coef * sum(z). Metrics are averaged over micro-steps and ranks."""
    after_step: Callable[..., None] | None = None
    """Collective (every rank): (engine=, step=, steps_per_epoch=, max_steps=) after each optimizer step."""
    export: Callable[..., None] | None = None
    """Collective: (engine=, ckpt_dir=, step=) at the end instead of the HF MoE export (when --export-hf)."""


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of labelled tokens), both device tensors; labels are aligned with inputs."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, (labels != IGNORE).sum()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def drop_metrics_after(path: Path, step: int) -> None:
    """On resume, forget metrics.jsonl records of steps after the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


class Trainer:
    """One rank of a training job. `Trainer(args, hooks).fit()` runs it; see the module docstring."""

    def __init__(self, args: TrainArgs, hooks: StageHooks | None = None):
        self.args, self.hooks = args, hooks or StageHooks()
        self.stop_requested = False
        """Set by STOP_SIGNAL (host-side only); the ranks agree on it at the next logging step (`_agree_to_stop`)."""
        if threading.current_thread() is threading.main_thread():  # (signals reach the main thread only)
            signal.signal(STOP_SIGNAL, self._on_stop_signal)
        self.device = init_distributed(args.dist_timeout_s, args.io_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.on_gpu = self.device.type == "cuda"
        seed_everything(args.seed + self.rank)
        self.run_dir = Path(args.out)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = TrainState()
        self.lock = None
        with one_error_for_all():
            self._open_inputs()
        with one_error_for_all():  # after the barrier in one_error_for_all: the cache is there on every node
            self._open_data()
        self._build_engine()
        if self.resume_tag is not None:
            self._resume()
        if self.rank == 0:
            checkpoint.write_model_files(self.ckpt_dir, self.source.config, self.source.tokenizer_dir)
        self.tracker = Tracker.for_run(args, enabled=self.rank == 0, warn=self.log)
        self.saved_at = self.state.step if self.resume_tag is not None else -1

    # ------------------------------------------------------------------------------------------------------- build
    def _open_inputs(self) -> None:
        """Everything a rank can get wrong from user input, before any collective (errors agreed on by all ranks)."""
        from transformers import AutoTokenizer

        args, hooks = self.args, self.hooks
        check_run_apart(args)  # OUT and the data cache never over or inside an input (io.paths.check_apart)
        self.lifeline = hold_run(self.run_dir)  # dies with the `upcycle-ds` launcher; OUT stays locked while we live
        if self.rank == 0:  # one job per run dir (inherited from `--nproc N`'s launcher, taken here under srun etc.)
            from ..launch.run_lock import RunLock

            self.lock = RunLock(self.run_dir).acquire()
        if hooks.dense:
            self.source, self.num_experts = open_dense_source(args), 1
        else:
            self.source = open_source(args)
            family, _ = family_for(self.source.config)
            self.num_experts = family.num_experts(self.source.config)
        if args.resume:
            self._keep_global_batch()
        args.validate(self.world, self.num_experts)
        self.resume_tag = checkpoint.latest_tag(self.ckpt_dir)
        if not args.resume and self.resume_tag is not None:
            raise UserError(f"{self.ckpt_dir} already holds a checkpoint; pass --resume to continue it or use a new "
                            f"--out")
        if self.resume_tag is not None and self.rank == 0:
            self._check_resumable(self.ckpt_dir / self.resume_tag)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.source.tokenizer_dir),
                                                       trust_remote_code=args.trust_remote_code)
        self.data_cfg = DataConfig.from_args(args, label_field=hooks.label_field)
        if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
            prepare_cache(self.data_cfg, self.tokenizer)  # one tokeniser per node; a no-op when cached

    def _open_data(self) -> None:
        """After every node's local rank 0 has the tokenised data cached: open it (memory-mapped) on every rank."""
        args = self.args
        self.train_ds, self.eval_ds = open_cache(prepare_cache(self.data_cfg, self.tokenizer), self.tokenizer)
        self.per_epoch = num_batches(len(self.train_ds), micro_batch_size=args.micro_batch_size,
                                     world_size=self.world, grad_accum=args.grad_accum)
        if self.per_epoch < args.grad_accum:
            raise UserError(f"{args.data}: {len(self.train_ds)} packed rows of {args.max_length} tokens are too few "
                            f"for one step of {args.micro_batch_size} x {args.grad_accum} micro-batches on "
                            f"{self.world} ranks")
        self.steps_per_epoch = self.per_epoch // args.grad_accum
        self.max_steps = args.max_steps or max(1, math.ceil(args.epochs * self.steps_per_epoch))

    def layout(self) -> dict:
        a = self.args
        return {"world_size": self.world, "ep_size": a.ep_size, "zero_stage": a.zero_stage, "dtype": a.dtype,
                "num_experts": self.num_experts, "micro_batch_size": a.micro_batch_size, "grad_accum": a.grad_accum}

    def _check_resumable(self, tag_dir: Path) -> None:
        """Rank 0, before anything is loaded: every file opens safely, and the checkpoint is of this model and
        layout (one line naming the first setting that differs)."""
        checkpoint.precheck(tag_dir)
        saved_cfg = self.ckpt_dir / "config.json"
        if saved_cfg.is_file():  # the same check as the launcher's (jobs started by srun / torchrun have none)
            from ..io.hf import read_json_object
            from .preflight import compare_configs

            compare_configs(read_json_object(saved_cfg), self.source.config, saved_cfg, self.args.model)
        saved, now = elastic.read_layout(tag_dir), self.layout()
        if saved.get("num_experts") not in (None, now["num_experts"]):
            raise UserError(f"--resume: {tag_dir} holds a model with {saved['num_experts']} experts, --model "
                            f"{self.args.model} has {now['num_experts']}; use a new --out")
        if elastic.global_batch(saved) not in (None, elastic.global_batch(now)):
            raise UserError(f"--resume: {tag_dir} was trained with a global batch of {elastic.global_batch(saved)} "
                            f"rows per step, this run has {elastic.global_batch(now)} (micro batch "
                            f"{now['micro_batch_size']} x {now['world_size']} ranks x grad accum {now['grad_accum']}); "
                            f"the data order and LR schedule continue only with the same global batch")
        elastic.position(elastic.read_run(tag_dir).get("train_state") or {"batch_in_epoch": 0}, saved, now)
        if elastic.differences(saved, now) or not elastic.is_native(tag_dir):
            elastic.open_saved_optimizer(tag_dir)  # readable in full, before any rank loads it

    def _keep_global_batch(self) -> None:
        """The checkpoint's global batch fixes --grad-accum (so a job requeued on another number of nodes continues
        with the same config): every rank, before the data is opened and the engine built."""
        tag = checkpoint.latest_tag(self.ckpt_dir)
        if tag is None:
            return
        line = elastic.adapt_grad_accum(self.args, self.world, elastic.read_layout(self.ckpt_dir / tag))
        if line:
            self.log(line)

    def _build_engine(self) -> None:
        import deepspeed

        from ..surgery import build_dense_model, build_moe_model, hf_config, rebuild_non_persistent_buffers

        args, hooks = self.args, self.hooks
        dtype = args.torch_dtype()
        if hooks.dense:
            model = build_dense_model(self.source, dtype=dtype, device=self.device, attn_impl=args.attn_impl)
        else:
            model = build_moe_model(self.source, ep_size=args.ep_size, capacity_factor=args.capacity_factor,
                                    dtype=dtype, device=self.device, attn_impl=args.attn_impl,
                                    expert_impl=args.expert_impl)
        if hooks.setup is not None:
            hooks.setup(model=model, layers=moe_layers(model), config=dict(self.source.config), data=self.train_ds)
        if args.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        apply_freeze(model, args.freeze, args.train_only)
        optimizer = build_optimizer(model, args)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, self.max_steps,
                                                                           args.min_lr_ratio))
        from types import SimpleNamespace

        from ..launch.distributed import local_device_index

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            args=SimpleNamespace(device_rank=local_device_index()), model=model, optimizer=optimizer,
            lr_scheduler=scheduler, config=deepspeed_config(args, self.world, self.on_gpu))
        checkpoint.install_safe_engine(self.engine)
        rebuild_non_persistent_buffers(self.engine.module, hf_config(self.source.config))  # fp32 rotary again
        self.layers = moe_layers(self.engine.module)
        balance.install(self.engine.module, [m.router for _, m in self.layers], args.aux_loss_scope,
                        grad_accum=args.grad_accum)
        self.meter = StepMeter(self.layers, self.num_experts, self.device)
        from ..flops import peak_tflops, train_flops_per_token
        from ..plan import shape_from_config

        self.flops_per_token = train_flops_per_token(shape_from_config(self.source.config), args.max_length)
        name = torch.cuda.get_device_name(self.device) if self.on_gpu else None
        self.peak = args.peak_tflops or peak_tflops(name, args.dtype)
        self.log(f"{self.world} ranks on {self.device.type}, ep_size {args.ep_size}, ZeRO-{args.zero_stage}, "
                 f"{args.dtype}, attention {args.attn_impl}, activation checkpointing "
                 f"{'on' if args.activation_checkpointing else 'off'}; data: {self.train_ds.summary()}; {self.max_steps} steps "
                 f"({self.steps_per_epoch} per epoch)")

    def _resume(self) -> None:
        """Collective: continue from checkpoint `resume_tag`, saved with this layout (DeepSpeed's own load, bit-exact)
        or another one (`elastic.load`: optimizer state re-partitioned, see docs/training.md)."""
        tag_dir = self.ckpt_dir / self.resume_tag
        saved, now = elastic.read_layout(tag_dir), self.layout()
        changed = elastic.differences(saved, now)
        how = ""
        if not changed and elastic.is_native(tag_dir):
            client = checkpoint.load(self.engine, self.ckpt_dir, self.resume_tag)
        else:
            client, counts = elastic.load(self.engine, self.ckpt_dir, self.resume_tag, num_experts=self.num_experts,
                                          ep_size=self.args.ep_size,
                                          lp_from_master=saved.get("dtype") != now["dtype"])
            rng = checkpoint.restore_rng(self.ckpt_dir, self.resume_tag, saved_world=saved.get("world_size"),
                                         seed=self.args.seed, step=int(client["train_state"]["step"]))
            how = (f" on another layout ({', '.join(changed) or 'a converted checkpoint'}): optimizer state of "
                   f"{counts['params'] - counts['missing']} parameters re-partitioned"
                   + (f", {counts['missing']} without saved state start AdamW afresh" if counts["missing"] else "")
                   + f", RNG {rng}")
        self.state = TrainState(**elastic.position(client["train_state"], saved, now))
        self.log(f"resumed from {self.ckpt_dir}/{self.resume_tag} at step {self.state.step}{how}")
        if self.rank == 0:
            checkpoint.discard_uncommitted(self.ckpt_dir)  # before any rank can save again (after a training step)
            drop_metrics_after(self.run_dir / "metrics.jsonl", self.state.step)

    # ------------------------------------------------------------------------------------------ stop before a limit
    def _on_stop_signal(self, signum, frame) -> None:
        self.stop_requested = True  # a signal handler does nothing else; the training loop acts on it

    def _agree_to_stop(self) -> bool:
        """Collective, at a logging step: whether any rank got STOP_SIGNAL. One int all-reduced over the host-side
        gloo I/O group: no device sync and no NCCL op, and every rank stops at the same step even when the signal
        reached the ranks at different steps."""
        return any_rank(self.stop_requested)

    def _stop_for_requeue(self) -> int:
        """Collective: save this step, tell the batch script (STOPPED_FILE_ENV), exit cleanly."""
        self.save()
        stopped = os.environ.get(STOPPED_FILE_ENV)
        if self.rank == 0 and stopped:
            write_text_atomic(stopped, f"{self.state.step}\n")
        self.log(f"stopping at step {self.state.step} on {signal.Signals(STOP_SIGNAL).name}: checkpoint "
                 f"{checkpoint.tag_for(self.state.step)} saved; --resume continues (Slurm: the job requeues itself)")
        return 0

    # ------------------------------------------------------------------------------------------------------- utils
    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[{self.hooks.prog}] {msg}", file=sys.stderr, flush=True)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.on_gpu:
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}

    def micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's training micro-batches from the current data position, on the device, epoch after epoch."""
        a, st = self.args, self.state
        while True:
            if st.batch_in_epoch >= self.per_epoch:
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            for b in batches(self.train_ds, micro_batch_size=a.micro_batch_size, rank=self.rank,
                             world_size=self.world, seed=a.seed, epoch=st.epoch, start=st.batch_in_epoch,
                             grad_accum=a.grad_accum):
                st.batch_in_epoch += 1
                yield self.to_device(b)

    def forward(self, b: dict[str, torch.Tensor]):
        return self.engine(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)

    # -------------------------------------------------------------------------------------------------------- step
    def step(self, stream: Iterator[dict[str, torch.Tensor]]) -> None:
        """One optimizer step: grad_accum micro-steps; metrics accumulate on the device (no host sync here)."""
        a, hooks = self.args, self.hooks
        for _ in range(a.grad_accum):
            b = next(stream)
            out = self.forward(b)
            loss_sum, n_tok = causal_lm_loss(out.logits, b["labels"])
            lm = loss_sum / n_tok.clamp_min(1)
            extras: dict[str, torch.Tensor] = {}
            if hooks.loss is None:
                aux, z = self.meter.add_micro_step(lm)
                loss = lm + a.aux_loss_coef * aux + a.z_loss_coef * z
            else:
                aux, z = self._router_losses()
                moe = a.aux_loss_coef * aux + a.z_loss_coef * z
                loss, extras = hooks.loss(lm=lm, moe=moe, batch=b, layers=self.layers)
                self.meter.add_micro_step(lm, extras)
            self.engine.backward(loss)
            self.engine.step()
        self.meter.add_grad_norm(self.engine.get_global_grad_norm())
        self.state.step += 1

    def _router_losses(self):
        aux = z = 0.0
        for _, moe in self.layers:
            aux, z = aux + moe.router.aux_loss, z + moe.router.z_loss
        return aux, z

    def log_window(self, steps: int, dt: float, lr: float) -> None:
        """Collective: reduce the window's metrics (one all_reduce), then rank 0 prints and records them."""
        a = self.args
        red = self.meter.reduce(steps)
        self.meter.reset()
        tokens = a.micro_batch_size * a.grad_accum * self.world * a.max_length * steps
        tps = tokens / dt if dt > 0 else 0.0
        mfu = None
        if self.peak:
            mfu = self.flops_per_token * tps / (self.world * self.peak * 1e12)
        mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.on_gpu else None
        eta = (self.max_steps - self.state.step) * dt / max(1, steps)
        scalars = {"loss": red.loss, "lr": lr, "tokens_per_s": tps, "step_time_s": dt / max(1, steps),
                   "epoch": self.state.epoch, **red.extras}
        if red.grad_norm is not None:
            scalars["grad_norm"] = red.grad_norm
        if mfu is not None:
            scalars["mfu"] = mfu
        if mem is not None:
            scalars["max_mem_gib"] = mem
        self.tracker.log_step(self.state.step, scalars, red.layers)
        self.log(step_line(prog=self.hooks.prog, step=self.state.step, total=self.max_steps, loss=red.loss, lr=lr,
                           tokens_per_s=tps, step_time_s=dt / max(1, steps), mfu=mfu, max_mem_gib=mem,
                           grad_norm=red.grad_norm, eta_s=eta, extras=red.extras).split("] ", 1)[1])

    # --------------------------------------------------------------------------------------------- eval/save/export
    @torch.no_grad()
    def evaluate(self) -> float:
        """Collective: held-out loss (+ the expert-load heatmap on MoE models), logged at the current step."""
        a = self.args
        self.engine.eval()
        meter = StepMeter(self.layers, self.num_experts, self.device)
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        for b in batches(self.eval_ds, micro_batch_size=a.micro_batch_size, rank=self.rank, world_size=self.world,
                         seed=a.seed, epoch=0, shuffle=False, pad_remainder=True):
            b = self.to_device(b)
            loss_sum, n_tok = causal_lm_loss(self.forward(b).logits, b["labels"])
            meter.add_micro_step(loss_sum)
            tot += torch.stack([loss_sum.double(), n_tok.double()])
        red = meter.reduce(1)
        if self.world > 1:
            dist.all_reduce(tot)
        s, n = tot.tolist()
        loss = s / max(1.0, n)
        if red.layers:
            self.tracker.log_eval(self.state.step, {"loss": loss}, np.stack([st.fractions() for st in red.layers]),
                                  [st.layer for st in red.layers])
        else:  # a dense model (sft): no expert load to draw
            self.tracker.log_step(self.state.step, {"eval/loss": loss}, [])
        self.log(f"step {self.state.step}: eval loss {loss:.4f}")
        self.engine.train()
        return loss

    def save(self) -> None:
        """Collective: a checkpoint of the current step (once per step)."""
        if self.saved_at != self.state.step:
            checkpoint.save(self.engine, self.ckpt_dir, self.state.step,
                            {"train_state": asdict(self.state), "layout": self.layout()}, keep_last=self.args.keep_last)
            self.saved_at = self.state.step

    def export(self) -> None:
        """Collective: the final HF export (the stage's own, or the HF MoE checkpoint at OUT/hf)."""
        if self.hooks.export is not None:
            self.hooks.export(engine=self.engine, ckpt_dir=self.ckpt_dir, step=self.state.step)
            return
        from .export import export_hf_moe

        export_hf_moe(self.ckpt_dir, self.run_dir / "hf", checkpoint.tag_for(self.state.step))
        self.log(f"HF MoE export: {self.run_dir / 'hf'}")

    @torch.no_grad()
    def dump_final_logits(self) -> Path:
        """--debug-dump-logits: the trained engine's fp32 logits on this rank's first (unshuffled) micro-batch of the
        eval data (train rows if none), saved with its inputs to OUT/debug/final_logits_rank{r}.pt. Collective."""
        a = self.args
        self.engine.eval()
        ds = self.eval_ds if self.eval_ds is not None else self.train_ds
        b = next(batches(ds, micro_batch_size=a.micro_batch_size, rank=self.rank, world_size=self.world,
                         seed=a.seed, epoch=0, shuffle=False, pad_remainder=True))
        logits = self.forward(self.to_device(b)).logits.float().cpu()
        path = self.run_dir / "debug" / f"final_logits_rank{self.rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"input_ids": b["input_ids"], "position_ids": b["position_ids"], "logits": logits}, path)
        self.engine.train()
        return path

    # --------------------------------------------------------------------------------------------------------- fit
    def fit(self) -> int:
        """Collective: train to max_steps (or --exit-after-steps), evaluating, saving and exporting as asked."""
        a, st, hooks = self.args, self.state, self.hooks
        stream = self.micro_batches()
        steps_here, exit_code = 0, 0
        try:
            self.engine.train()
            t0, window, lr = time.perf_counter(), 0, self.scheduler.get_last_lr()[0]
            while st.step < self.max_steps:
                if window == 0:
                    lr = self.scheduler.get_last_lr()[0]
                self.step(stream)
                steps_here, window = steps_here + 1, window + 1
                stop = False
                if window >= a.log_every or st.step == self.max_steps or (
                        a.exit_after_steps and steps_here >= a.exit_after_steps):
                    self.log_window(window, time.perf_counter() - t0, lr)
                    t0, window = time.perf_counter(), 0
                    stop = self._agree_to_stop()
                if hooks.after_step is not None:
                    hooks.after_step(engine=self.engine, step=st.step, steps_per_epoch=self.steps_per_epoch,
                                     max_steps=self.max_steps)
                if a.eval_every and st.step % a.eval_every == 0 and self.eval_ds is not None:
                    self.evaluate()
                if a.save_every and st.step % a.save_every == 0:
                    self.save()
                if stop and st.step < self.max_steps:
                    return self._stop_for_requeue()
                if a.exit_after_steps and steps_here >= a.exit_after_steps and st.step < self.max_steps:
                    self.save()
                    self.log(f"exiting after {steps_here} steps at step {st.step} (--exit-after-steps)")
                    return 0
            if self.eval_ds is not None and not (a.eval_every and st.step % a.eval_every == 0):
                self.evaluate()
            self.save()
            if a.debug_dump_logits:
                self.dump_final_logits()
            if a.export_hf:
                self.export()
            return 0
        except BaseException:
            exit_code = 1
            raise
        finally:
            self.tracker.finish(exit_code=exit_code)
            if self.lock is not None:
                self.lock.release()


def run_rank(args: TrainArgs, hooks: StageHooks | None = None) -> int:
    """The body of one rank: train, then take the process group down (also on errors)."""
    try:
        return Trainer(args, hooks).fit()
    finally:
        shutdown()


__all__ = ["StageHooks", "Trainer", "TrainState", "causal_lm_loss", "run_rank", "wait_for_io"]
