"""One resolved run: `resolve(args, world, stage, role) -> RunSetup`, everything decided before an engine exists,
and every user error of `train` / `sft` / `router-init` raised here, once.

The launcher of `--nproc N` calls it before it starts any rank (`preflight.launch_checked`); every rank calls it
again first thing (`trainer.run_rank`), so jobs started by `deepspeed`, `torchrun` or `srun` get the same checks.
What a `Role` adds is the work one process per node or per job does: tokenising the data into the cache (the
launcher; local rank 0 of each node) and opening every file of the checkpoint a resume loads (the launcher; rank 0).

    resolve
      args.validate_values              flags alone (finite, in range, regexes compile)
      inputs.check_run_apart            OUT and the data cache apart from every input
      open_model                        --model: HF MoE / HF dense (upcycled on the fly) / DeepSpeed dir; E
      resume.plan_resume                OUT/checkpoints: fresh run, or the tag, layout, position, settings
      args.validate(world, E)           flags against the world size and the model
      offload.check_host_memory         --offload-optimizer on --nproc N: this node's RAM holds the host state
      check_trainable                   --freeze / --train-only against the model's parameter names
      deepspeed_config                  the ds_config the engine gets
      load_tokenizer, prepare_data      tokenised into the cache, enough rows for one step, same data on resume
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..families import family_for
from .config import TrainArgs, deepspeed_config
from .inputs import check_run_apart
from .resume import ResumePlan, layout_of, plan_resume
from .stage import TRAIN, Stage


@dataclass(frozen=True, kw_only=True)
class Role:
    """The work of resolving that only some processes do."""

    tokenise: bool
    """Tokenise the data into the cache and check it (the launcher; local rank 0 of each node — the other ranks
    open the cache after a barrier)."""
    deep_checks: bool
    """Open every checkpoint file a resume loads, check the checkpoint is complete, match --freeze / --train-only
    against the model (the launcher; rank 0)."""
    launcher: bool = False
    """The `--nproc N` launcher: all N ranks run on this node (its host memory must hold an offloaded optimizer),
    and no progress bars or data warnings while tokenising (its error must be one line)."""


LAUNCHER = Role(tokenise=True, deep_checks=True, launcher=True)


def rank_role(rank: int, local_rank: int) -> Role:
    return Role(tokenise=local_rank == 0, deep_checks=rank == 0)


@dataclass(frozen=True, kw_only=True)
class RunSetup:
    args: TrainArgs
    """The settings that run (with --resume: --grad-accum set to keep the checkpoint's global batch)."""
    stage: Stage
    world: int
    source: Any
    """The weights the ranks load: HFCheckpoint, DSCheckpoint or UpcycledView (`train.sources`)."""
    num_experts: int
    """Experts per MoE layer (1 for a dense stage)."""
    tokenizer: Any
    data: Any
    """The DataConfig every rank opens (`data.DataConfig.from_args`)."""
    data_entry: Path | None
    """The tokenised data in the cache, on the process that prepared it (None on the others)."""
    ds_config: dict
    resume: ResumePlan | None
    """What --resume continues from; None for a fresh run."""
    notes: tuple[str, ...] = ()
    """Lines for the log: what resolving adapted or applied."""

    @property
    def config(self) -> dict:
        return self.source.config

    @property
    def run_dir(self) -> Path:
        return Path(self.args.out)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def record(self) -> Path:
        """OUT/{command}_args.yaml: the settings of the last run started in OUT."""
        return self.run_dir / f"{self.stage.command}_args.yaml"

    def layout(self) -> dict:
        return layout_of(self.args, self.world, self.num_experts)


def resolve(args: TrainArgs, world: int, stage: Stage = TRAIN, role: Role = LAUNCHER, *,
            on_gpu: bool | None = None) -> RunSetup:
    """Everything about a run that is decided before the engine is built (see the module docstring); raises
    `UserError` with one line on any bad input. `on_gpu`: the ranks' device (default: whether torch sees CUDA)."""
    if world < 1:
        raise UserError("--nproc must be >= 1")
    args.validate_values()
    check_run_apart(args)  # OUT and the data cache never over or inside an input (train --model RUN/hf --out RUN)
    source, num_experts = open_model(args, stage)
    args, resume, notes = plan_resume(args, world, stage.command, source.config, num_experts,
                                      deep=role.deep_checks)
    args.validate(world, num_experts)
    if role.launcher and not stage.dense:
        from .offload import check_host_memory

        check_host_memory(args, source.config, world)  # --offload-optimizer: this node's RAM holds it
    if role.deep_checks:
        check_trainable(args, source.config, dense=stage.dense)
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    ds_config = deepspeed_config(args, world, on_gpu)
    from ..data import DataConfig

    data = DataConfig.from_args(args, label_field=stage.label_field)
    tokenizer = load_tokenizer(source.tokenizer_dir, args.trust_remote_code)
    entry = None
    if role.tokenise:
        entry = prepare_data(args, data, tokenizer, world, quiet=role.launcher)
        if resume is not None:
            line = resume.check_data(entry.name, list(args.data))
            notes = notes + ([line] if line else [])
    return RunSetup(args=args, stage=stage, world=world, source=source, num_experts=num_experts,
                    tokenizer=tokenizer, data=data, data_entry=entry, ds_config=ds_config, resume=resume,
                    notes=tuple(notes))


# --------------------------------------------------------------------------------------------------- the model
def open_model(args, stage: Stage) -> tuple[Any, int]:
    """(the weights source, experts per MoE layer): the HF dense model itself for a dense stage (sft), else an HF
    MoE, an HF dense model upcycled on the fly, or a DeepSpeed checkpoint dir."""
    if stage.dense:
        from .sources import open_dense_source

        return open_dense_source(args), 1
    from .sources import open_source

    source = open_source(args)
    family, _ = family_for(source.config)
    return source, family.num_experts(source.config)


def meta_param_names(config: dict, *, dense: bool, ep_size: int = 1) -> list[tuple[str, int]]:
    """(name, numel) of every parameter of the model a rank trains, built on the meta device (no weights)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dense:
            import transformers

            from ..surgery import hf_config

            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(hf_config(config))
        else:
            from ..surgery import build_meta_model

            model = build_meta_model(config, ep_size=ep_size)
    return [(n, p.numel()) for n, p in model.named_parameters()]


def check_trainable(args, config: dict, *, dense: bool) -> None:
    """--freeze / --train-only: each regex matches a parameter of the model, and together they leave something to
    train (the rule of `train.optim.trainable`)."""
    if not args.freeze and not args.train_only:
        return
    try:
        params = meta_param_names(config, dense=dense, ep_size=args.ep_size)
    except UserError:
        raise
    except Exception:  # e.g. an ep_size that needs process groups to build: names are the same at ep 1 but for ids
        params = meta_param_names(config, dense=dense)
    names = [n for n, _ in params]
    examples = ", ".join(_example_names(names))
    for flag, pats in (("--freeze", args.freeze), ("--train-only", args.train_only)):
        for pat in pats:
            if not any(re.search(pat, n) for n in names):
                raise UserError(f"{flag} {pat!r} matches no parameter of the model (names look like {examples})")
    from .optim import check_some_trainable, trainable

    n = sum(k for name, k in params if trainable(name, args.freeze, args.train_only))
    check_some_trainable(n, args.freeze, args.train_only)


def _example_names(names: list[str]) -> list[str]:
    picks = [n for n in names if ".layers.0." in n and ("q_proj" in n or "gate" in n or "experts.0." in n)]
    return (picks[:3] or names[:3]) + ["..."]


# ---------------------------------------------------------------------------------------------------- the data
def load_tokenizer(path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # missing / broken tokenizer files: OSError, ValueError, JSON errors, ...
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"{path}: cannot load its tokenizer ({msg})") from None


def prepare_data(args, cfg, tokenizer, world: int, *, quiet: bool = False) -> Path:
    """Tokenise the data into the cache (a no-op when it is there) and check it: every local text file is UTF-8,
    every row has a known format, and there are enough packed rows for one optimizer step. Returns the cache entry
    every rank opens (`open_data`)."""
    from ..data import num_batches, open_cache, prepare_cache
    from ..data.build import check_data as check_rows
    from ..data.sources import parse_sources
    from ..io.text import check_utf8

    for flag, given in (("--data", args.data), ("--eval-data", args.eval_data)):
        for spec in parse_sources(given) if given else []:
            check_utf8(spec.path, flag)
    with _quiet_data(quiet):
        check_rows(cfg)  # unreadable sources and rows of no known format, before tokenising
        entry = prepare_cache(cfg, tokenizer)
    train_ds, _ = open_cache(entry, tokenizer)
    per_epoch = num_batches(len(train_ds), micro_batch_size=args.micro_batch_size, world_size=world,
                            grad_accum=args.grad_accum)
    if per_epoch < args.grad_accum:
        raise UserError(f"{' '.join(args.data)}: {len(train_ds)} packed rows of {args.max_length} tokens are too few "
                        f"for one step of {args.micro_batch_size} x {args.grad_accum} micro-batches on {world} ranks")
    return entry


class _quiet_data:
    """Within (when on): no `datasets` progress bars and no data warnings (the launcher's error must be one line;
    the ranks warn about truncation themselves)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if not self.on:
            return
        import logging

        import datasets

        self.bars_were_off = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        self.log = logging.getLogger("upcycle_ds.data")
        self.level = self.log.level
        self.log.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        if not self.on:
            return
        import datasets

        self.log.setLevel(self.level)
        if not self.bars_were_off:
            datasets.enable_progress_bars()


@dataclass(frozen=True, kw_only=True)
class RunData:
    """The data a rank trains on, opened from the cache (memory-mapped)."""

    train: Any
    eval: Any | None
    identity: str
    """The cache entry's key: what a checkpoint records to tell, on resume, that the data is the same."""
    per_epoch: int
    """Micro-batches per rank per epoch."""
    steps_per_epoch: int
    max_steps: int


def open_data(setup: RunSetup) -> RunData:
    """Every rank, after the processes that tokenise have: the cached train (and eval) data."""
    from ..data import num_batches, open_cache, prepare_cache

    args = setup.args
    entry = setup.data_entry or prepare_cache(setup.data, setup.tokenizer)  # present by now: returns at once
    train, evals = open_cache(entry, setup.tokenizer)
    per_epoch = num_batches(len(train), micro_batch_size=args.micro_batch_size, world_size=setup.world,
                            grad_accum=args.grad_accum)
    steps = max(1, per_epoch // args.grad_accum)
    return RunData(train=train, eval=evals, identity=Path(entry).name, per_epoch=per_epoch, steps_per_epoch=steps,
                   max_steps=args.max_steps or max(1, math.ceil(args.epochs * steps)))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


__all__ = ["LAUNCHER", "Role", "RunData", "RunSetup", "open_data", "rank_role", "resolve"]
