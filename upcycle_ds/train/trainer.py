"""The Trainer: one rank of a DeepSpeed training job — build, step, evaluate, save, export.

`upcycle-ds train`, `sft` and `router-init` (each a `stage.Stage`) and `bench/step_time.py` all train with it.
`run_rank` is the body of one rank, started by `deepspeed`, `torchrun`, `srun` (slurm/train.sbatch) or `upcycle-ds
train --nproc N`:

    init_distributed                      the process group, this rank's device
    setup.resolve(args, world, stage)     every decision and user error, before any engine (the launcher ran it too)
    Trainer(setup, device)                open the cached data, build the engine, load the checkpoint on --resume
    Trainer.fit()                         step / log / evaluate / save until max_steps, then the HF export

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
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..cli_args import dump_settings
from ..data import IGNORE, batches
from ..io.atomic import write_text_atomic
from ..launch.distributed import any_rank, init_distributed, one_error_for_all, shutdown, wait_for_io
from ..moe import balance
from ..moe.layer import moe_layers
from . import checkpoint, elastic
from .config import TrainArgs
from .engine import build_engine
from .metrics import StepMeter, checkpoint_line, eval_scalars, step_line, window_scalars
from .resume import TrainState, resolved_settings
from .setup import RunSetup, open_data, rank_role, resolve
from .stage import TRAIN, Stage
from .tracking import Tracker

STOPPED_FILE_ENV = "UPCYCLE_DS_STOPPED_FILE"
"""When set (slurm/*.sbatch set it), rank 0 writes the step into this file after stopping early on STOP_SIGNAL with
a checkpoint saved: the batch script then requeues the job."""
STOP_SIGNAL = signal.SIGUSR1
"""Save at the next logging step and exit (Slurm sends it before the time limit: slurm/train.sbatch)."""


class StopFlag:
    """Whether STOP_SIGNAL arrived. Its handler is bound to this small object, not to the Trainer, and `restore()`
    puts the previous handler back, so a finished Trainer (and its GPU memory) is not kept alive by the handler."""

    def __init__(self):
        self.requested = False
        self._old = None

    def install(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():  # (signals reach the main thread only)
            self._old = signal.signal(STOP_SIGNAL, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        self.requested = True  # a signal handler does nothing else; the training loop acts on it

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(STOP_SIGNAL, self._old)
            self._old = None


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
    """One rank of a training job: `Trainer(resolve(...), device).fit()`; see the module docstring."""

    def __init__(self, setup: RunSetup, device: torch.device):
        self.setup, self.args, self.stage, self.device = setup, setup.args, setup.stage, device
        self.rank, self.world, self.on_gpu = dist.get_rank(), setup.world, device.type == "cuda"
        self.run_dir, self.ckpt_dir = setup.run_dir, setup.ckpt_dir
        self.stop = StopFlag().install()
        """Set by STOP_SIGNAL (host-side only); the ranks agree on it at the next logging step (`_agree_to_stop`)."""
        seed_everything(self.args.seed + self.rank)
        with one_error_for_all():  # after the barrier in one_error_for_all: the cache is there on every node
            self.data = open_data(setup)
        self.max_steps = self.data.max_steps
        self.state = setup.resume.start_state(self.data.identity) if setup.resume else TrainState()
        self.engine, self.scheduler = build_engine(setup, self.data.train, self.max_steps, device)
        self.layers = moe_layers(self.engine.module)
        balance.install(self.engine.module, [m.router for _, m in self.layers], self.args.aux_loss_scope,
                        grad_accum=self.args.grad_accum)
        self.meter = StepMeter(self.layers, setup.num_experts, device)
        if setup.resume is not None:
            self._resume()
        if self.rank == 0:
            checkpoint.write_model_files(self.ckpt_dir, setup.config, setup.source.tokenizer_dir)
            write_text_atomic(setup.record, dump_settings(resolved_settings(self.args), type(self.args)))
        self.tracker = Tracker.for_run(self.args, enabled=self.rank == 0, warn=self.log)
        self.saved_at = self.state.step if setup.resume is not None else -1
        self._start_line()

    def _start_line(self) -> None:
        from ..flops import peak_tflops, train_flops_per_token
        from ..plan import shape_from_config

        a = self.args
        self.flops_per_token = train_flops_per_token(shape_from_config(self.setup.config), a.max_length)
        name = torch.cuda.get_device_name(self.device) if self.on_gpu else None
        self.peak = a.peak_tflops or peak_tflops(name, a.dtype)
        for note in self.setup.notes:
            self.log(note)
        self.log(f"{self.world} ranks on {self.device.type}, ep_size {a.ep_size}, ZeRO-{a.zero_stage}"
                 f"{' (optimizer state on the host)' if a.offload_optimizer else ''}, {a.dtype}, "
                 f"attention {a.attn_impl}, activation checkpointing {'on' if a.activation_checkpointing else 'off'}; "
                 f"data: {self.data.train.summary()}; {self.max_steps} steps ({self.data.steps_per_epoch} per epoch)")

    def layout(self) -> dict:
        return self.setup.layout()

    def _resume(self) -> None:
        """Collective: continue from the planned checkpoint, saved with this layout (DeepSpeed's own load,
        bit-exact) or another one (`elastic.load`: optimizer state re-partitioned, see docs/training.md)."""
        plan, how = self.setup.resume, ""
        if not plan.elastic:
            checkpoint.load(self.engine, self.ckpt_dir, plan.tag)
        else:
            client, counts = elastic.load(self.engine, self.ckpt_dir, plan.tag, num_experts=self.setup.num_experts,
                                          ep_size=self.args.ep_size,
                                          lp_from_master=plan.saved_layout.get("dtype") != self.args.dtype)
            rng = checkpoint.restore_rng(self.ckpt_dir, plan.tag, saved_world=plan.saved_layout.get("world_size"),
                                         seed=self.args.seed, step=int(client["train_state"]["step"]))
            how = (f" on another layout ({', '.join(plan.changes) or 'a converted checkpoint'}): optimizer state of "
                   f"{counts['params'] - counts['missing']} parameters re-partitioned"
                   + (f", {counts['missing']} without saved state start AdamW afresh" if counts["missing"] else "")
                   + f", RNG {rng}")
        self.log(f"resumed from {self.ckpt_dir}/{plan.tag} at step {self.state.step}{how}")
        if self.rank == 0:
            checkpoint.discard_uncommitted(self.ckpt_dir)  # before any rank can save again (after a training step)
            drop_metrics_after(self.run_dir / "metrics.jsonl", self.state.step)

    # ------------------------------------------------------------------------------------------ stop before a limit
    def _agree_to_stop(self) -> bool:
        """Collective, at a logging step: whether any rank got STOP_SIGNAL. One int all-reduced over the host-side
        gloo I/O group: no device sync and no NCCL op, and every rank stops at the same step even when the signal
        reached the ranks at different steps."""
        return any_rank(self.stop.requested)

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
            print(f"[{self.stage.log_prefix}] {msg}", file=sys.stderr, flush=True)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.on_gpu:
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}

    def micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's training micro-batches from the current data position, on the device, epoch after epoch."""
        a, st, data = self.args, self.state, self.data
        while True:
            if st.batch_in_epoch >= data.per_epoch:
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            for b in batches(data.train, micro_batch_size=a.micro_batch_size, rank=self.rank, world_size=self.world,
                             seed=a.seed, epoch=st.epoch, start=st.batch_in_epoch, grad_accum=a.grad_accum):
                st.batch_in_epoch += 1
                yield self.to_device(b)

    def forward(self, b: dict[str, torch.Tensor]):
        return self.engine(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)

    # -------------------------------------------------------------------------------------------------------- step
    def step(self, stream: Iterator[dict[str, torch.Tensor]]) -> None:
        """One optimizer step: grad_accum micro-steps; metrics accumulate on the device (no host sync here)."""
        a, stage = self.args, self.stage
        for _ in range(a.grad_accum):
            b = next(stream)
            out = self.forward(b)
            loss_sum, n_tok = causal_lm_loss(out.logits, b["labels"])
            lm = loss_sum / n_tok.clamp_min(1)
            if stage.loss is None:
                aux, z = self.meter.add_micro_step(lm, tokens=b["num_tokens"])
                loss = lm + a.aux_loss_coef * aux + a.z_loss_coef * z
            else:
                aux, z = self._router_losses()
                loss, extras = stage.loss(lm=lm, moe=a.aux_loss_coef * aux + a.z_loss_coef * z, batch=b,
                                          layers=self.layers)
                self.meter.add_micro_step(lm, extras, tokens=b["num_tokens"])
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
        st = self.state
        red = self.meter.reduce(steps)
        self.meter.reset()
        st.tokens += int(round(red.tokens))
        mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.on_gpu else None
        scalars = window_scalars(red, steps=steps, seconds=dt, lr=lr, tokens_seen=st.tokens,
                                 epoch=st.epoch + st.batch_in_epoch / self.data.per_epoch,
                                 flops_per_token=self.flops_per_token, devices=self.world, peak_tflops=self.peak,
                                 max_mem_gib=mem)
        self.tracker.log_step(st.step, scalars, red.layers)
        self.log(step_line(prog=self.stage.log_prefix, step=st.step, total=self.max_steps, loss=red.loss, lr=lr,
                           tokens_per_s=scalars["tokens_per_s"], step_time_s=scalars["step_time_s"],
                           mfu=scalars.get("mfu"), max_mem_gib=mem, grad_norm=red.grad_norm,
                           eta_s=(self.max_steps - st.step) * dt / max(1, steps), extras=red.extras).split("] ", 1)[1])

    # --------------------------------------------------------------------------------------------- eval/save/export
    @torch.no_grad()
    def evaluate(self) -> float:
        """Collective: held-out loss (+ the expert-load heatmap on MoE models), logged at the current step."""
        a = self.args
        self.engine.eval()
        meter = StepMeter(self.layers, self.setup.num_experts, self.device)
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        for b in batches(self.data.eval, micro_batch_size=a.micro_batch_size, rank=self.rank, world_size=self.world,
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
        scalars = eval_scalars(loss)
        if red.layers:
            self.tracker.log_eval(self.state.step, scalars, np.stack([st.fractions() for st in red.layers]),
                                  [st.layer for st in red.layers])
        else:  # a dense model (sft): no expert load to draw
            self.tracker.log_step(self.state.step, scalars, [])
        self.log(f"step {self.state.step}: eval loss {loss:.4f} (perplexity {scalars['eval/ppl']:.4g})")
        self.engine.train()
        return loss

    def save(self) -> None:
        """Collective: a checkpoint of the current step (once per step)."""
        if self.saved_at != self.state.step:
            t0 = time.perf_counter()
            state = {**asdict(self.state), "tokens": self.state.tokens + self.meter.pending_tokens()}
            client = {"train_state": state, "layout": self.layout(), "data_identity": self.data.identity}
            checkpoint.save(self.engine, self.ckpt_dir, self.state.step, client, keep_last=self.args.keep_last)
            self.saved_at = self.state.step
            if self.rank == 0:
                self.log(checkpoint_line(self.ckpt_dir / checkpoint.tag_for(self.state.step), time.perf_counter() - t0))

    def export(self) -> None:
        """Collective: the final HF export (the stage's own, or the HF MoE checkpoint at OUT/hf)."""
        if self.stage.export is not None:
            self.stage.export(engine=self.engine, ckpt_dir=self.ckpt_dir, step=self.state.step)
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
        ds = self.data.eval if self.data.eval is not None else self.data.train
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
        exit_code = 0
        try:
            rc = self._train()
            return self._finish() if rc is None else rc
        except BaseException:
            exit_code = 1
            raise
        finally:
            self.tracker.finish(exit_code=exit_code)
            self.stop.restore()

    def _train(self) -> int | None:
        """The training loop; returns 0 when it ended early (a stop signal, --exit-after-steps) with a checkpoint
        saved, None at max_steps."""
        a, st = self.args, self.state
        stream = self.micro_batches()
        self.engine.train()
        t0, window, steps_here, lr = time.perf_counter(), 0, 0, self.scheduler.get_last_lr()[0]
        while st.step < self.max_steps:
            if window == 0:
                lr = self.scheduler.get_last_lr()[0]
            self.step(stream)
            steps_here, window = steps_here + 1, window + 1
            leaving = bool(a.exit_after_steps) and steps_here >= a.exit_after_steps
            stop = False
            if window >= a.log_every or st.step == self.max_steps or leaving:
                self.log_window(window, time.perf_counter() - t0, lr)
                t0, window = time.perf_counter(), 0
                stop = self._agree_to_stop()
            self._after_step()
            if stop and st.step < self.max_steps:
                return self._stop_for_requeue()
            if leaving and st.step < self.max_steps:
                self.save()
                self.log(f"exiting after {steps_here} steps at step {st.step} (--exit-after-steps)")
                return 0
        return None

    def _after_step(self) -> None:
        """Collective: the stage's hook, eval and checkpoint at their cadence."""
        a, st = self.args, self.state
        if self.stage.after_step is not None:
            self.stage.after_step(engine=self.engine, step=st.step, steps_per_epoch=self.data.steps_per_epoch,
                                  max_steps=self.max_steps)
        if a.eval_every and st.step % a.eval_every == 0 and self.data.eval is not None:
            self.evaluate()
        if a.save_every and st.step % a.save_every == 0:
            self.save()

    def _finish(self) -> int:
        """Collective, at max_steps: final eval, checkpoint, debug logits, HF export."""
        a = self.args
        if self.data.eval is not None and not (a.eval_every and self.state.step % a.eval_every == 0):
            self.evaluate()
        self.save()
        if a.debug_dump_logits:
            self.dump_final_logits()
        if a.export_hf:
            self.export()
        return 0


def build_trainer(args: TrainArgs, stage: Stage = TRAIN, *, lock=None) -> Trainer:
    """This process's rank of the job: the process group, the resolved run (every rank; an error on any rank is one
    line for all), the Trainer. Rank 0 takes `lock` (a `RunLock` of --out) first. Benches and tests drive the
    returned Trainer's steps themselves; `run_rank` runs a whole job."""
    device = init_distributed(args.dist_timeout_s, args.io_timeout_s)
    rank = dist.get_rank()
    with one_error_for_all():
        if lock is not None and rank == 0:  # one job per run dir (inherited from `--nproc N`'s launcher)
            lock.acquire()
        setup = resolve(args, dist.get_world_size(), stage, rank_role(rank, local_rank()))
    return Trainer(setup, device)


def run_rank(args: TrainArgs, stage: Stage = TRAIN) -> int:
    """The body of one rank: train, then take the process group down — after a barrier when the job ended well, at
    once after an error (the job's launcher ends the other ranks; waiting for them could wait forever on a rank stuck
    in a collective)."""
    from ..launch.lifeline import hold_run
    from ..launch.run_lock import RunLock

    lifeline = hold_run(args.out)  # dies with an `upcycle-ds` launcher; OUT stays locked while this rank lives
    lock, ok = RunLock(args.out), False
    try:
        rc = build_trainer(args, stage, lock=lock).fit()
        ok = True
        return rc
    finally:
        lock.release()
        shutdown(wait_for_others=ok)
        del lifeline


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


__all__ = ["Trainer", "TrainState", "build_trainer", "causal_lm_loss", "run_rank", "wait_for_io"]
