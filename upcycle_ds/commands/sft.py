"""UpIT stage 1 (expert preparation): instruction-tune an HF dense model with DeepSpeed (ZeRO 0/1/2, bf16 or fp32,
the data pipeline of `upcycle-ds train`) and save complete HF dense checkpoints at a fixed fraction of an epoch:
OUT/checkpoints_hf/ckpt-XXXX (XXXX = optimizer step), each with config, tokenizer and sft_checkpoint.json. They are
the experts of `upcycle-ds upit-assemble` (pass them oldest first). OUT/checkpoints holds the DeepSpeed checkpoints
for --resume; OUT/hf is the final model.

Weights saved (--hf-weights): `master` (default) = the fp32 master weights of the optimizer (under --dtype bf16
gathered from the ZeRO partitions of all ranks: collective), so small SFT deltas are not rounded away; `module` = the
module's own weights (bf16 under --dtype bf16, what forward computes with). Under --dtype fp32 the two are identical.
Each checkpoint dir is written by rank 0 into a temp dir and renamed into place (never half-written).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import UserError
from ..train.config import TrainArgs

YAML_CONFIG = True
HF_DIR = "checkpoints_hf"
META = "sft_checkpoint.json"


@dataclass(kw_only=True)
class Args(TrainArgs):
    model: str
    """HF dense checkpoint to instruction-tune (Llama, Mistral, Qwen2, Qwen3)."""
    out: str
    """Run dir: checkpoints_hf/ckpt-XXXX (HF dense, the UpIT experts), checkpoints/ (DeepSpeed, for --resume),
    metrics.jsonl, hf/ (final HF dense model)."""
    lr: float = 2e-5
    """Peak learning rate (AdamW; UpIT FFN setting: 2e-5)."""
    epochs: float = 4.0
    """Epochs over the training data when --max-steps is not given (UpIT: 4)."""
    save_every_epochs: float = 0.25
    """Write an HF dense checkpoint every this fraction of an epoch (UpIT: 0.25); steps = round(k * f * steps/epoch)."""
    save_until_epochs: float | None = 2.0
    """Only checkpoints up to this many epochs (UpIT: the first 2 of 4 epochs -> 8 checkpoints); None = all run."""
    hf_weights: Literal["master", "module"] = "master"
    """Weights written to the HF checkpoints: the fp32 master weights, or the module's (bf16 under --dtype bf16)."""

    def validate(self, world_size: int, num_experts: int = 1) -> None:
        if self.ep_size != 1:
            raise UserError("--ep-size applies to MoE models; sft trains a dense model (leave it at 1)")
        super().validate(world_size, 1)
        if not self.save_every_epochs > 0:
            raise UserError(f"--save-every-epochs must be > 0 (got {self.save_every_epochs})")
        if self.save_until_epochs is not None and self.save_until_epochs <= 0:
            raise UserError(f"--save-until-epochs must be > 0 (got {self.save_until_epochs})")


def hf_save_steps(steps_per_epoch: int, max_steps: int, every_epochs: float, until_epochs: float | None) -> list[int]:
    """Optimizer steps after which an HF checkpoint is written: round(k * every * steps_per_epoch), k = 1, 2, ...,
    up to until_epochs (inclusive) and max_steps; duplicates (fractions finer than one step) collapse."""
    out, k = set(), 1
    while True:
        e = k * every_epochs
        if until_epochs is not None and e > until_epochs + 1e-9:
            break
        s = round(e * steps_per_epoch)
        if s > max_steps:
            break
        if s >= 1:
            out.add(s)
        k += 1
    return sorted(out)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete HF checkpoints of an sft run, oldest first (by step)."""
    d = Path(run_dir) / HF_DIR
    cks = [p for p in d.glob("ckpt-*") if p.is_dir() and (p / META).is_file()] if d.is_dir() else []
    return sorted(cks, key=lambda p: int(p.name.removeprefix("ckpt-")))


def gather_state_dict(engine, which: str) -> dict:
    """Collective. The full dense state dict on every rank (CPU tensors): module weights, or fp32 masters.

    Under ZeRO 0/1/2 every rank holds the complete module parameters; the fp32 masters of a bf16 run are partitioned
    (ZeRO 1/2) and assembled by `deepspeed.utils.safe_get_full_fp32_param` (an all-reduce per parameter)."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    sd = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    if which == "master" and engine.bfloat16_enabled():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            full = safe_get_full_fp32_param(p)
            if full is None:
                raise RuntimeError(f"no fp32 master weight for {name} (use --hf-weights module)")
            sd[name] = full.detach().to("cpu", torch.float32, copy=True)
        for k, v in sd.items():  # frozen params / buffers: only the module copy exists; keep one dtype per file
            if v.is_floating_point():
                sd[k] = v.float()
    return sd


def save_hf_dense(engine, out: Path, tokenizer_dir: Path, which: str, meta: dict) -> None:
    """Collective: gather (every rank), rank 0 writes OUT atomically (temp dir + rename), then a barrier."""
    import torch.distributed as dist

    from ..io.hf import copy_side_files, replace_dir

    sd = gather_state_dict(engine, which)
    if dist.get_rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            dtype = next(iter(v.dtype for v in sd.values() if v.is_floating_point()))
            engine.module.save_pretrained(str(tmp), state_dict=sd)
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["dtype"] = str(dtype).removeprefix("torch.")  # the module's dtype is bf16 when masters are saved
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            copy_side_files(tokenizer_dir, tmp)
            (tmp / META).write_text(json.dumps({**meta, "weights": which, "dtype": str(dtype)}, indent=2) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, out)
    dist.barrier()


def hooks_for(args: Args):
    from ..train.engine import StageHooks, log0

    run_dir = Path(args.out)
    plan: dict = {}

    def after_step(*, engine, step: int, steps_per_epoch: int, max_steps: int) -> None:
        if "steps" not in plan:
            plan["steps"] = hf_save_steps(steps_per_epoch, max_steps, args.save_every_epochs, args.save_until_epochs)
            want = (args.save_until_epochs or max_steps / steps_per_epoch) / args.save_every_epochs
            log0(f"[upcycle-ds sft] HF checkpoints after steps {plan['steps']} ({steps_per_epoch} steps per epoch)")
            if len(plan["steps"]) < math.floor(want + 1e-9) and max_steps >= steps_per_epoch * (
                    args.save_until_epochs or 0):
                log0(f"[upcycle-ds sft] warning: --save-every-epochs {args.save_every_epochs} is finer than one "
                     f"optimizer step; {len(plan['steps'])} distinct checkpoints instead of {math.floor(want)}")
        if step in plan["steps"]:
            out = run_dir / HF_DIR / f"ckpt-{step:04d}"
            save_hf_dense(engine, out, Path(args.model), args.hf_weights,
                          {"step": step, "epoch": step / steps_per_epoch, "source": str(args.model)})
            log0(f"[upcycle-ds sft] step {step}: HF checkpoint {out}")

    def export(*, engine, ckpt_dir: Path, step: int) -> None:
        save_hf_dense(engine, run_dir / "hf", Path(args.model), args.hf_weights,
                      {"step": step, "final": True, "source": str(args.model)})
        log0(f"[upcycle-ds sft] HF dense export: {run_dir / 'hf'}")

    return StageHooks(dense=True, after_step=after_step, export=export)


def run(args: Args) -> int:
    from ..launch.local import launch_checked, launched_by_a_launcher

    if args.nproc is not None and not launched_by_a_launcher():
        return launch_checked(args, "sft", dense=True)
    from ..train.engine import run_rank

    print(f"[upcycle-ds sft] {args.model} -> {args.out}", file=sys.stderr, flush=True)
    return run_rank(args, hooks_for(args))
