"""UpIT stage 1 (expert preparation): instruction-tune an HF dense model with DeepSpeed (ZeRO 0/1/2, bf16 or fp32,
the data pipeline of `upcycle-ds train`) and save complete HF dense checkpoints at a fixed fraction of an epoch:
OUT/checkpoints_hf/ckpt-XXXX (XXXX = optimizer step), each with config, tokenizer and sft_checkpoint.json. They are
the experts of `upcycle-ds upit-assemble` (pass them oldest first). OUT/checkpoints holds the DeepSpeed checkpoints
for --resume; OUT/hf is the final model.

Weights saved (--hf-weights): `master` (default) = the fp32 master weights of the optimizer (under --dtype bf16
gathered from the ZeRO partitions of all ranks: collective), so small SFT deltas are not rounded away; `module` = the
module's own weights (bf16 under --dtype bf16, what forward computes with). Under --dtype fp32 the two are identical.
Each checkpoint dir is written by rank 0 into a temp dir and renamed into place (never half-written); under bf16 the
masters are gathered one parameter at a time and only rank 0 keeps them (`train.export.export_hf_dense`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import UserError
from ..train.config import TrainArgs

HF_DIR = "checkpoints_hf"
META = "sft_checkpoint.json"


@dataclass(kw_only=True)
class SFTConfig(TrainArgs):
    SECTIONS = {**TrainArgs.SECTIONS, "sft": ("save_every_epochs", "save_until_epochs", "hf_weights")}
    NOT_FLAGS = frozenset({"ep_size", "num_experts", "top_k", "layers", "capacity_factor", "expert_impl",
                           "aux_loss_coef", "aux_loss_scope", "z_loss_coef", "heatmap_every", "collapse_factor",
                           "collapse_steps", "wandb_expert_shares_max"})
    """`train` flags for MoE models that sft (a dense model) does not offer; they keep their defaults."""

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


def stage_for(args: SFTConfig):
    """The sft stage of the Trainer: a dense model, HF checkpoints at fractions of an epoch, an HF dense export."""
    from ..train.export import export_hf_dense
    from ..train.stage import Stage

    run_dir = Path(args.out)
    plan: dict = {}

    def log(msg: str) -> None:
        import sys

        import torch.distributed as dist

        if dist.get_rank() == 0:
            print(f"[upcycle-ds sft] {msg}", file=sys.stderr, flush=True)

    def after_step(*, engine, step: int, steps_per_epoch: int, max_steps: int) -> None:
        if "steps" not in plan:
            plan["steps"] = hf_save_steps(steps_per_epoch, max_steps, args.save_every_epochs, args.save_until_epochs)
            want = (args.save_until_epochs or max_steps / steps_per_epoch) / args.save_every_epochs
            log(f"HF checkpoints after steps {plan['steps']} ({steps_per_epoch} steps per epoch)")
            if len(plan["steps"]) < math.floor(want + 1e-9) and max_steps >= steps_per_epoch * (
                    args.save_until_epochs or 0):
                log(f"warning: --save-every-epochs {args.save_every_epochs} is finer than one optimizer step; "
                    f"{len(plan['steps'])} distinct checkpoints instead of {math.floor(want)}")
        if step in plan["steps"]:
            out = run_dir / HF_DIR / f"ckpt-{step:04d}"
            export_hf_dense(engine, out, Path(args.model), args.hf_weights,
                            {"step": step, "epoch": step / steps_per_epoch, "source": str(args.model)})
            log(f"step {step}: HF checkpoint {out}")

    def export(*, engine, ckpt_dir: Path, step: int) -> None:
        export_hf_dense(engine, run_dir / "hf", Path(args.model), args.hf_weights,
                        {"step": step, "final": True, "source": str(args.model)})
        log(f"HF dense export: {run_dir / 'hf'}")

    return Stage(command="sft", dense=True, after_step=after_step, export=export)


def run_sft(args: SFTConfig) -> int:
    """Run sft: as one rank of a job already started by a launcher, or (with --nproc) start N ranks on this node."""
    from ..launch.local import launched_by_a_launcher

    if args.nproc is not None and not launched_by_a_launcher():
        from ..train.preflight import launch_checked

        return launch_checked(args, stage_for(args))
    from ..train.trainer import run_rank

    return run_rank(args, stage_for(args))
