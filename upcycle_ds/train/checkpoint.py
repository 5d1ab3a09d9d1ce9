"""DeepSpeed checkpoints of a run: save with RNG + data position, commit `latest` only when complete, resume.

DeepSpeed's own `save_checkpoint` lets rank 0 write `latest` before the other ranks have finished their files and
truncates it in place; we save with `save_latest=False`, wait for every rank, then rank 0 replaces `latest`
atomically (write a temp file, fsync, rename). A process killed mid-save therefore leaves `latest` at the previous
complete checkpoint. Each rank's RNG states go to `TAG/rng_rank{r}.pt` (tensors only: loadable with weights_only).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import UserError
from ..io.hf import copy_side_files, write_config

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def latest_tag(ckpt_dir: Path) -> str | None:
    f = Path(ckpt_dir) / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def _rng_state() -> dict[str, torch.Tensor]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": torch.tensor([np_state[2], np_state[3], np_state[4]], dtype=torch.float64),
        "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_version": torch.tensor(py_state[0]),
        **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
    }


def _set_rng_state(s: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(s["torch"])
    meta = s["numpy_meta"].tolist()
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), int(meta[0]), int(meta[1]), meta[2]))
    random.setstate((int(s["python_version"]), tuple(s["python"].tolist()), None))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def write_model_files(ckpt_dir: Path, config: dict, side_files_from: Path | None) -> None:
    """config.json (the HF MoE config the model was built from) + tokenizer files next to `latest` (rank 0)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_config(ckpt_dir, config)
    if side_files_from is not None:
        copy_side_files(side_files_from, ckpt_dir)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int | None = None) -> str:
    """Collective: every rank calls it. Returns the tag."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank()
    torch.save(_rng_state(), Path(ckpt_dir) / tag / f"rng_rank{rank}.pt")
    _fault_injection(step)
    dist.barrier()
    if rank == 0:
        tmp = Path(ckpt_dir) / f".{LATEST}.tmp"
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, Path(ckpt_dir) / LATEST)
        if keep_last:
            _prune(Path(ckpt_dir), keep_last, tag)
    dist.barrier()
    return tag


def _fault_injection(step: int) -> None:
    """Tests only: UPCYCLE_DS_KILL_IN_SAVE=STEP SIGKILLs rank 0 after its checkpoint files for STEP are written and
    before `latest` is committed — the window a crash during save hits."""
    if os.environ.get("UPCYCLE_DS_KILL_IN_SAVE") == str(step) and dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def _prune(ckpt_dir: Path, keep_last: int, current: str) -> None:
    tags = sorted((p for p in ckpt_dir.glob("global_step*") if p.is_dir()),
                  key=lambda p: int(p.name.removeprefix("global_step") or 0))
    for p in tags[:-keep_last]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def load(engine, ckpt_dir: Path) -> tuple[str, dict] | None:
    """Collective: load the checkpoint `latest` points at (None if there is none); restores this rank's RNG."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"could not load DeepSpeed checkpoint {ckpt_dir}/{tag}")
    rng = Path(ckpt_dir) / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return tag, client_state or {}


def read_run_meta(ckpt_dir: Path) -> dict | None:
    f = Path(ckpt_dir) / "config.json"
    return json.loads(f.read_text()) if f.is_file() else None
