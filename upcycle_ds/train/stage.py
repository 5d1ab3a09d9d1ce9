"""What a training stage built on the Trainer changes (torchtitan's `TrainSpec`, for our three stages): `upcycle-ds
train` is the default `Stage()`; `upit.sft.stage_for` (a dense model, HF checkpoints at fractions of an epoch) and
`upit.router_init.stage_for` (router BCE loss, per-sample labels) fill in typed hooks. Torch-free: the launcher
resolves a run with it before any rank exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class SetupHook(Protocol):
    def __call__(self, *, model: Any, layers: list, config: dict, data: Any) -> None:
        """Before `deepspeed.initialize`: model (on the device), layers = [(decoder layer, UpcycledMoE)], config =
        the source's config.json, data = the training PackedDataset. Check the data against the model, make the
        routers keep their logits, ... (a UserError here is one line for the whole job)."""


class LossHook(Protocol):
    def __call__(self, *, lm: Any, moe: Any, batch: Mapping[str, Any], layers: list) -> tuple[Any, dict[str, Any]]:
        """(loss to backpropagate, {metric: detached device scalar}) of one micro-batch; lm = the LM loss, moe =
        aux_loss_coef * sum(aux) + z_loss_coef * sum(z) over the MoE layers. Metrics are averaged over micro-steps
        and ranks."""


class AfterStepHook(Protocol):
    def __call__(self, *, engine: Any, step: int, steps_per_epoch: int, max_steps: int) -> None:
        """Collective (every rank), after each optimizer step."""


class ExportHook(Protocol):
    def __call__(self, *, engine: Any, ckpt_dir: Path, step: int) -> None:
        """Collective, at the end instead of the HF MoE export (when --export-hf)."""


@dataclass(frozen=True, kw_only=True)
class Stage:
    command: str = "train"
    """The subcommand: OUT/{command}_args.yaml records the run's settings, and log lines start `[upcycle-ds
    {command}]`."""
    dense: bool = False
    """Train --model as the HF dense model it is (no MoE layers, no aux/z loss; `upcycle-ds sft`)."""
    label_field: str | None = None
    """Data row field (an int per sample) carried to every token of the sample as batch["sample_labels"] (-1 on
    padding); router-init: 'expert'."""
    setup: SetupHook | None = None
    loss: LossHook | None = None
    after_step: AfterStepHook | None = None
    export: ExportHook | None = None
    prog: str | None = None
    """Prefix of the log lines (default `upcycle-ds {command}`)."""

    @property
    def log_prefix(self) -> str:
        return self.prog or f"upcycle-ds {self.command}"


TRAIN = Stage()
