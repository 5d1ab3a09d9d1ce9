"""`upcycle-ds train --nproc N`: check the run, then start N ranks on this node with the `deepspeed` launcher.

The parent process validates everything that needs no model (flags, data file and its columns, model dir, expert
count vs ep size, batch sizes) so bad input is one clear error before any rank starts; it then writes the resolved
run config to OUT/train_args.yaml and runs `deepspeed --num_gpus N --master_port P --module upcycle_ds.cli train
--config OUT/train_args.yaml`. On CPU it sets OMP_NUM_THREADS = cores / N (the launcher does not) unless set.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ..errors import UserError
from ..families import family_for
from ..io.hf import read_config
from .dist_env import free_port


def launched_by_a_launcher() -> bool:
    return "RANK" in os.environ or "LOCAL_RANK" in os.environ or "SLURM_STEP_ID" in os.environ


def _num_experts(args) -> int:
    path = Path(args.model)
    cfg_dir = path
    if (path / "latest").is_file() or not (path / "config.json").is_file():
        cfg_dir = path if (path / "config.json").is_file() else path.parent
    config = read_config(cfg_dir if (cfg_dir / "config.json").is_file() else path)
    family, is_moe = family_for(config)
    if is_moe:
        return family.num_experts(config)
    if args.num_experts is None:
        raise UserError(f"{path} is a dense {config.get('model_type')} checkpoint: pass --num-experts (and --top-k, "
                        f"--layers) to upcycle it on the fly, or run `upcycle-ds upcycle` first")
    return args.num_experts


def preflight(args, world_size: int) -> None:
    """Every check that needs no model weights and no ranks (raises UserError)."""
    from ..data.preflight import preflight_data

    if world_size < 1:
        raise UserError("--nproc must be >= 1")
    args.validate(world_size, _num_experts(args))
    preflight_data(args, label_field=getattr(args, "label_field", None))
    ckpt = Path(args.out) / "checkpoints" / "latest"
    if ckpt.is_file() and not args.resume:
        raise UserError(f"{ckpt.parent} already holds a checkpoint; pass --resume to continue it or use a new --out")


def launch_local(args, command: str = "train") -> int:
    """Start `args.nproc` ranks of `upcycle-ds COMMAND --config OUT/{COMMAND}_args.yaml` (`train`: train_args.yaml)."""
    if shutil.which("deepspeed") is None and not (Path(sys.executable).parent / "deepspeed").exists():
        raise UserError("the `deepspeed` launcher is not on PATH (pip install deepspeed)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(args).items()}
    resolved["nproc"] = None
    cfg = out / f"{command}_args.yaml"
    cfg.write_text(yaml.safe_dump(resolved, sort_keys=False))
    env = dict(os.environ)
    try:
        import torch

        on_gpu = torch.cuda.is_available()
    except ImportError:
        on_gpu = False
    if not on_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", str(args.nproc), "--master_port", str(free_port()), "--no_local_rank", "--module",
           "upcycle_ds.cli", command, "--config", str(cfg)]
    print(f"[upcycle-ds {command}] launching: {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)
