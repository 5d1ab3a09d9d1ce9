"""The UpIT recipe runner (docs/upit.md): sft -> assemble -> seed-data -> router-init -> train, each stage resumable.

Layout of OUT (every stage dir ends with a `DONE` file holding the stage's resolved config, JSON):
    sft/           `upcycle-ds sft` run: checkpoints_hf/ckpt-XXXX (the experts), hf/ (final dense model)
    assemble/hf    `upcycle-ds upit-assemble` of the sft checkpoints (+ genetic expansion to E), --base = the model
    seed_data/     seed.jsonl + seed_report.json (`upcycle-ds seed-data`, experts = the checkpoints used)
    router_init/   `upcycle-ds router-init` run (hf/ = the MoE with initialised routers)
    train/         `upcycle-ds train` run on the full data (hf/ = the final UpIT model)

A stage with a DONE file is skipped when its config is unchanged (a changed config is an error naming the field:
delete that stage dir to redo it; stages after it too). A training stage without DONE runs with --resume, so an
interrupted run (crash, Slurm time limit with `exit_after_steps`) continues where its last checkpoint was.

How it runs: as a single process (`--nproc N` or nothing), each training stage is a child process group — the
`deepspeed` launcher with N ranks (`--nproc`), or one plain rank. As one rank of a job (`deepspeed ... upit`,
`torchrun`, `srun` in slurm/upit.sbatch) every rank runs the recipe; training stages start one child per rank with
the job's rank environment (a fresh process per stage: DeepSpeed's process groups cannot be re-made in one process);
assemble and seed-data run on rank 0 while the other ranks wait for their DONE file (a shared filesystem is needed).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..cli_args import canonical_settings
from ..errors import UserError
from ..io.atomic import write_text_atomic

STAGES = ("sft", "assemble", "seed_data", "router_init", "train")
DONE, FAILED = "DONE", "FAILED"
IGNORED_IN_COMPARISON = {"nproc", "resume", "exit_after_steps", "wandb_mode", "overwrite", "device"}
SCORING_ONLY = {"seed_data": {"micro_batch_size"}}
"""Per stage: fields that change how fast it runs, not what it writes (not compared with a DONE stage)."""
TRAIN_DEFAULTS = {"lr": 2e-5, "epochs": 2.0}
"""Post-training defaults (UpIT FFN setting): lr 2e-5, 2 epochs; LM loss + load balancing (aux_loss_coef 0.01)."""


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _checked(section: str, values: dict | None, cls, fixed: set[str]) -> dict:
    values = dict(values or {})
    if not isinstance(values, dict):
        raise UserError(f"recipe `{section}` must be a mapping of field: value")
    values = canonical_settings(values, cls)  # old spellings (`batch_size`, `float32`) as today's
    unknown = sorted(set(values) - _fields(cls))
    if unknown:
        raise UserError(f"recipe `{section}`: unknown field {unknown[0]!r} (see `upcycle-ds "
                        f"{section.replace('_', '-') if section != 'common' else 'train'} --help`)")
    clash = sorted(set(values) & fixed)
    if clash:
        raise UserError(f"recipe `{section}`: {clash[0]!r} is set by the recipe itself (top-level field or stage "
                        f"wiring); remove it there")
    return values


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def job_rank() -> tuple[int, int] | None:
    """(rank, world size) when started as one rank of a job (deepspeed/torchrun/srun), else None."""
    from ..launch.local import launched_by_a_launcher

    if not launched_by_a_launcher():
        return None
    from ..launch.dist_env import dist_env

    de = dist_env()
    return de.rank, de.world_size


class Recipe:
    """The resolved recipe: one dataclass instance (or dict) per stage, built before anything runs."""

    def __init__(self, args):
        from .router_init import RouterInitConfig as RouterInitArgs
        from .seed_data import SeedDataConfig as SeedDataArgs
        from .sft import SFTConfig as SFTArgs
        from ..train.config import TrainArgs
        from .assemble import AssembleOptions

        self.args = args
        self.classes = {"sft": SFTArgs, "assemble": AssembleOptions, "seed_data": SeedDataArgs,
                        "router_init": RouterInitArgs, "train": TrainArgs}
        out = Path(args.out)
        self.dirs = {s: out / s for s in STAGES}
        wiring = {"model", "data", "out", "eval_data", "seed", "nproc", "resume", "seed_data", "export_hf"}
        common = _checked("common", args.common, TrainArgs, wiring)
        shared = {"data": args.data, "eval_data": args.eval_data, "seed": args.seed, "nproc": args.nproc,
                  "resume": True, "export_hf": True}
        sft = _checked("sft", args.sft, SFTArgs, wiring)
        self.sft = SFTArgs(model=args.model, out=str(self.dirs["sft"]), **{**shared, **common, **sft})
        asm = _checked("assemble", args.assemble, AssembleOptions, {"num_experts", "top_k", "layers", "seed"})
        self.assemble = AssembleOptions(num_experts=args.num_experts, top_k=args.top_k, layers=args.layers,
                                        seed=args.seed, **asm)
        self.assemble.validate()
        sd = _checked("seed_data", args.seed_data, SeedDataArgs, {"experts", "data", "out", "moe", "seed"})
        self.seed_data_opts = sd
        SeedDataArgs(experts=["x"], data=args.data, out="x", **sd)  # field types are checked when it runs
        ri = _checked("router_init", args.router_init, RouterInitArgs, wiring)
        if ri.get("mode", "bce") == "hidden" and not ri.get("prompts"):
            raise UserError("recipe `router_init`: mode hidden needs `prompts: prompts.yaml`")
        self.router_init = RouterInitArgs(model=str(self.dirs["assemble"] / "hf"), out=str(self.dirs["router_init"]),
                                          **{**shared, "eval_data": None, **common, **ri,
                                             "data": [str(self.dirs["seed_data"] / "seed.jsonl")]})
        tr = _checked("train", args.train, TrainArgs, wiring)
        self.train = TrainArgs(model=str(self.dirs["router_init"] / "hf"), out=str(self.dirs["train"]),
                               **{**shared, **TRAIN_DEFAULTS, **common, **tr})
        for name in (args.stages or []):
            if name not in STAGES:
                raise UserError(f"--stages: unknown stage {name!r}; choose from {', '.join(STAGES)}")
        self.stages = [s for s in STAGES if not args.stages or s in args.stages]

    # ------------------------------------------------------------------ per-stage config (what DONE records)
    def config(self, stage: str) -> dict:
        if stage == "sft":
            return dataclasses.asdict(self.sft)
        if stage == "assemble":
            return {**dataclasses.asdict(self.assemble), "checkpoints": "all of sft/checkpoints_hf (last E used)",
                    "base": self.args.model}
        if stage == "seed_data":
            return {"data": self.args.data, "seed": self.args.seed, **self.seed_data_opts}
        if stage == "router_init":
            return dataclasses.asdict(self.router_init)
        return dataclasses.asdict(self.train)


def _done(stage_dir: Path) -> dict | None:
    f = stage_dir / DONE
    return json.loads(f.read_text()) if f.is_file() else None


def _compare(stage: str, old: dict, new: dict) -> None:
    """A DONE stage must have run with the recipe's current values. Fields only one side knows (added to or removed
    from upcycle_ds after the stage finished) are not compared, so upgrading never invalidates a finished stage."""
    for k in sorted(set(old) & set(new)):
        if k in IGNORED_IN_COMPARISON or k in SCORING_ONLY.get(stage, ()):
            continue
        if _plain(old.get(k)) != _plain(new.get(k)):
            raise UserError(f"stage {stage} is DONE with {k}={old.get(k)!r}, the recipe now says {new.get(k)!r}: "
                            f"delete its dir (and the later stages') to redo it, or use a new out")


def _child_cmd(stage: str) -> str:
    return {"sft": "sft", "router_init": "router-init", "train": "train"}[stage]


def _stage_of(stage: str, args_obj):
    """The Trainer stage of a recipe training stage."""
    from ..train.stage import TRAIN

    if stage == "sft":
        from .sft import stage_for
    elif stage == "router_init":
        from .router_init import stage_for
    else:
        return TRAIN
    return stage_for(args_obj)


def _run_training(stage: str, args_obj, nproc: int | None, in_job: bool) -> int:
    """Start a training stage as child process(es); returns their exit code. With --nproc: the checks of
    `setup.resolve`, then N ranks (`train.preflight`); inside a job (srun): one child rank per process, its
    settings in the environment (as the launcher hands them to its ranks)."""
    import os

    from ..cli_args import dump_settings, settings_of
    from ..launch.local import ARGS_ENV

    if nproc is not None and not in_job:
        from ..train.preflight import launch_checked

        return launch_checked(dataclasses.replace(args_obj, nproc=nproc), _stage_of(stage, args_obj))
    env = {**os.environ, ARGS_ENV: dump_settings({**settings_of(args_obj), "nproc": None}, type(args_obj))}
    cmd = [sys.executable, "-m", "upcycle_ds.cli", _child_cmd(stage), "--config", f"env:{ARGS_ENV}"]
    print(f"[upcycle-ds upit] {stage}: {' '.join(cmd[:4])}", file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)


def _wait_for(stage: str, stage_dir: Path, since: float, poll_s: float = 2.0) -> None:
    """Ranks > 0: wait until rank 0 finishes a rank-0-only stage (DONE), or fail if it wrote FAILED."""
    while True:
        if (stage_dir / DONE).is_file():
            return
        f = stage_dir / FAILED
        if f.is_file() and f.stat().st_mtime >= since:
            raise UserError(f"stage {stage} failed on rank 0: {f.read_text().strip()}")
        time.sleep(poll_s)


def stage_assemble(recipe: Recipe) -> None:
    from .assemble import AssembleConfig, run_assemble
    from .sft import list_checkpoints

    cks = list_checkpoints(recipe.dirs["sft"])
    if not cks:
        raise UserError(f"{recipe.dirs['sft']}/checkpoints_hf holds no checkpoint; sft saved none (check "
                        f"save_every_epochs / save_until_epochs against the run length)")
    run_assemble(AssembleConfig(checkpoints=[str(c) for c in cks], out=str(recipe.dirs["assemble"] / "hf"),
                                base=recipe.args.model, overwrite=True, **dataclasses.asdict(recipe.assemble)))


def stage_seed_data(recipe: Recipe) -> None:
    from .seed_data import SeedDataConfig, run_seed_data
    from .sft import list_checkpoints

    cks = list_checkpoints(recipe.dirs["sft"])
    used = cks[-recipe.assemble.copies:]  # the checkpoints assemble took (C = E / granularity of them)
    out = recipe.dirs["seed_data"]
    out.mkdir(parents=True, exist_ok=True)
    run_seed_data(SeedDataConfig(experts=[str(c) for c in used], data=recipe.args.data, out=str(out),
                                 moe=str(recipe.dirs["assemble"] / "hf"), seed=recipe.args.seed, overwrite=True,
                                 **recipe.seed_data_opts))


def run_recipe(args) -> int:
    recipe = Recipe(args)
    job = job_rank()
    rank = job[0] if job else 0
    from ..train.inputs import check_run_apart

    check_run_apart(args)  # OUT holds every stage's output: never over or inside the model or the data
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_text_atomic(Path(args.out) / "recipe.yaml",
                      yaml.safe_dump(_plain(dataclasses.asdict(args)), sort_keys=False))
    ran, started = [], time.time()
    for stage in recipe.stages:
        d, cfg = recipe.dirs[stage], _plain(recipe.config(stage))
        done = _done(d)
        if done is not None:
            # ranks > 0 may find a DONE that rank 0 wrote in this very run (it got ahead of them): not stale
            fresh = rank > 0 and (d / DONE).stat().st_mtime >= started - 1
            if ran and not fresh:
                raise UserError(f"stage {stage} is DONE but earlier stage(s) {ran} ran again now: delete {d} (its "
                                f"inputs changed)")
            # (a stage DONE before a field or value was renamed recorded the old spelling)
            _compare(stage, canonical_settings(done.get("config", {}), recipe.classes[stage]), cfg)
            print(f"[upcycle-ds upit] {stage}: done, skipped ({d / DONE})", file=sys.stderr, flush=True)
            continue
        if stage == "router_init" and recipe.router_init.mode == "hidden":
            training = False
        else:
            training = stage in ("sft", "router_init", "train")
        print(f"[upcycle-ds upit] {stage}: running -> {d}", file=sys.stderr, flush=True)
        t0 = time.time()
        if training:
            rc = _run_training(stage, getattr(recipe, stage), args.nproc, job is not None)
            if rc != 0:
                print(f"[upcycle-ds upit] {stage} failed (exit {rc})", file=sys.stderr, flush=True)
                return rc
            if not (d / "hf" / "config.json").is_file():  # exit_after_steps: not finished; a requeue resumes
                print(f"[upcycle-ds upit] {stage}: stopped before the end (exit_after_steps?); run again to resume",
                      file=sys.stderr, flush=True)
                return 0
        elif rank == 0:
            d.mkdir(parents=True, exist_ok=True)
            try:
                if stage == "assemble":
                    stage_assemble(recipe)
                elif stage == "seed_data":
                    stage_seed_data(recipe)
                else:
                    from . import router_init

                    router_init.run_hidden(dataclasses.replace(recipe.router_init, overwrite=True))
            except BaseException as e:
                write_text_atomic(d / FAILED, f"{type(e).__name__}: {e}\n")
                raise
        else:
            _wait_for(stage, d, t0)
            ran.append(stage)
            continue
        if rank == 0:
            write_text_atomic(d / DONE, json.dumps({"stage": stage, "config": cfg, "seconds": round(time.time() - t0, 1),
                                                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
            (d / FAILED).unlink(missing_ok=True)
        ran.append(stage)
    final = recipe.dirs["train"] / "hf"
    if rank == 0 and "train" in recipe.stages:
        print(f"[upcycle-ds upit] done: {final}", file=sys.stderr, flush=True)
    return 0
