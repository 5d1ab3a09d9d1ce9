"""DeepSpeed checkpoints of a run: save with RNG + data position, commit `latest` only when complete, prune, resume
without running code from the checkpoint.

Saving. DeepSpeed's own `save_checkpoint` lets rank 0 write `latest` before the other ranks have finished their files
and truncates it in place; we save with `save_latest=False`, wait for every rank, then rank 0 replaces `latest`
atomically (temp file, fsync, rename). A process killed mid-save therefore leaves `latest` at the previous complete
checkpoint. On resume, rank 0 removes the tag dirs such saves leave behind (`discard_uncommitted`) before any rank
trains, so their files never mix with those of a later save of the same step (on another layout, say). Each rank's
RNG states go to `TAG/rng_rank{r}.pt` (tensors only); the names of the optimizer's parameters go into the model file
(`optimizer_param_names`: DeepSpeed records none for ZeRO 0, and resuming on another layout needs them). With
`keep_last` N, rank 0 then deletes all but the N newest tags — never the one `latest` names, and only after that
save is committed, while the other ranks wait for it: no save runs while a prune does, also across requeues.

Loading. A checkpoint is untrusted input: DeepSpeed's `TorchCheckpointEngine.load` calls `torch.load(...,
weights_only=False)`, which runs any pickled code. We hand DeepSpeed `SafeCheckpointEngine`, whose `load` uses
`weights_only=True` with exactly the DeepSpeed classes its files hold allow-listed, and before DeepSpeed opens
anything, rank 0 opens every file of the tag the same way (`precheck`), so a bad file is one clear error for the whole
job instead of a failure on some ranks while the others wait. Tags read from `latest` must name a directory inside
the checkpoint dir (`io.paths.child`).
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import UserError
from ..io.atomic import write_text_atomic
from ..io.ds import MODEL_STATES
from ..io.hf import copy_side_files, write_config
from ..io.safe_load import load_dict, safe_load
from ..launch.distributed import wait_for_io

LATEST = "latest"
_TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a model file, oldest first (by step)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    tags = [p.name for p in d.iterdir() if _TAG_RE.match(p.name) and not p.is_symlink() and (p / MODEL_STATES).is_file()]
    return sorted(tags, key=lambda t: int(_TAG_RE.match(t).group(1)))


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names (None when there is no `latest`); an error when it names nothing usable."""
    from ..io.ds import read_latest
    from ..io.paths import child

    f = Path(ckpt_dir) / LATEST
    if not f.is_file():
        return None
    tag = read_latest(f)
    tag_dir = child(ckpt_dir, tag, f"{f} names tag")  # a plain directory name inside the checkpoint dir
    if not (tag_dir / MODEL_STATES).is_file():
        have = complete_tags(ckpt_dir)
        hint = (f"the newest complete checkpoint is {have[-1]}: write `{have[-1]}` into {f} to resume from it, or "
                f"use a new --out") if have else "there is no complete checkpoint; use a new --out"
        raise UserError(f"{f} names {tag!r}, which is missing or incomplete; {hint}")
    return tag


# ------------------------------------------------------------------------------------------------- safe loading
def _engine_class():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with weights_only=True (see `safe_load`)."""

        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    return SafeCheckpointEngine


def install_safe_engine(engine) -> None:
    """Make every checkpoint file DeepSpeed loads for `engine` go through `safe_load`."""
    engine.checkpoint_engine = _engine_class()(engine._config)


def precheck(tag_dir: Path) -> None:
    """Open every .pt file of a tag the safe way (memory-mapped: only the pickled structure is read)."""
    for f in sorted(Path(tag_dir).iterdir()):
        if f.suffix == ".pt":
            load_dict(f, "loadable as a checkpoint file")


# ---------------------------------------------------------------------------------------------------------- RNG
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


def _set_rng_state(s: dict[str, torch.Tensor], source: Path) -> None:
    try:
        torch.set_rng_state(s["torch"])
        meta = s["numpy_meta"].tolist()
        np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), int(meta[0]), int(meta[1]),
                             meta[2]))
        random.setstate((int(s["python_version"]), tuple(s["python"].tolist()), None))
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state(s["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise UserError(f"{source}: not an RNG state file of ours ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------------ save/load
def write_model_files(ckpt_dir: Path, config: dict, side_files_from: Path | None) -> None:
    """config.json (the HF config the model was built from) + tokenizer files next to `latest` (rank 0)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_config(ckpt_dir, config)
    if side_files_from is not None:
        copy_side_files(side_files_from, ckpt_dir)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int | None = None) -> str:
    """Collective: every rank calls it. Returns the tag."""
    from .elastic import optimizer_param_names

    tag = tag_for(step)
    client_state = {**client_state, "optimizer_param_names": optimizer_param_names(engine)}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank()
    torch.save(_rng_state(), Path(ckpt_dir) / tag / f"rng_rank{rank}.pt")
    wait_for_io()  # every rank's files are on disk (host-side barrier: slow filesystems do not hit NCCL's timeout)
    if rank == 0:
        write_text_atomic(Path(ckpt_dir) / LATEST, tag, fsync=True)
        if keep_last:
            prune(Path(ckpt_dir), keep_last)
    wait_for_io()
    return tag


def _committed(ckpt_dir: Path) -> str | None:
    f = Path(ckpt_dir) / LATEST
    try:
        return f.read_text().strip() if f.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def discard_uncommitted(ckpt_dir: Path) -> list[str]:
    """Delete the tag dirs newer than the one `latest` names: never committed (a save that was killed), and the run
    resumed from `latest` writes those steps again. Rank 0, before training resumes. Returns the deleted tags."""
    current = _committed(ckpt_dir)
    if current is None or not _TAG_RE.match(current):
        return []
    limit = int(_TAG_RE.match(current).group(1))
    gone = []
    for p in sorted(Path(ckpt_dir).iterdir()):
        m = _TAG_RE.match(p.name)
        if m and int(m.group(1)) > limit and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def prune(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Keep the tag `latest` names and the `keep_last` - 1 newest complete tags before it; delete every other tag
    dir: older ones, and the never-committed leftovers of killed saves (incomplete, or newer than `latest`: a run
    resumed from an earlier checkpoint writes those steps again). Without `latest` nothing is deleted. Call it only
    right after `latest` was committed, while no other rank writes (as `save` does). Returns the deleted tags."""
    current = _committed(ckpt_dir)
    if current is None or not _TAG_RE.match(current):
        return []
    step_of = lambda p: int(_TAG_RE.match(p.name).group(1))  # noqa: E731
    tags = sorted((p for p in Path(ckpt_dir).iterdir() if _TAG_RE.match(p.name) and p.is_dir() and not p.is_symlink()),
                  key=step_of)
    limit = int(_TAG_RE.match(current).group(1))
    older = [p for p in tags if step_of(p) < limit and (p / MODEL_STATES).is_file()]
    keep = {current, *(p.name for p in older[max(0, len(older) - (keep_last - 1)):] if keep_last > 1)}
    gone = []
    for p in tags:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def restore_rng(ckpt_dir: Path, tag: str, *, saved_world: int | None, seed: int, step: int) -> str:
    """This rank's RNG after a resume on another layout: the saved stream of this rank when the world size is
    unchanged (`restored`); otherwise (rank r's stream has no counterpart) re-seeded from (seed, step, rank)
    (`re-seeded`: reproducible, not the stream the saved ranks would have drawn)."""
    from .elastic import rng_seed

    rank = dist.get_rank()
    f = Path(ckpt_dir) / tag / f"rng_rank{rank}.pt"
    if saved_world == dist.get_world_size() and f.is_file():
        _set_rng_state(safe_load(f), f)
        return "restored"
    s = rng_seed(seed, step, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also seeds every CUDA device
    return "re-seeded"


def check_complete(tag_dir: Path, model_config: dict, layout: dict) -> None:
    """Every file a load of `tag_dir` opens is there: one model file per MoE layer and global expert, and one
    optimizer file per saved rank (ZeRO 1/2) or expert-parallel rank (ZeRO 0). Checked once before any rank starts
    loading: a rank that found a file missing inside the collective load would leave the others waiting."""
    from ..families import family_for
    from ..io.ds import EXPERT_FILE, EXPP_FILE, ZERO_FILE

    tag_dir = Path(tag_dir)
    names = {p.name for p in tag_dir.iterdir()}
    want = []
    family, is_moe = family_for(model_config)
    if is_moe:
        n_layers, n_experts = len(family.moe_layers(model_config)), family.num_experts(model_config)
        want += [EXPERT_FILE.format(moe_layer=L, expert=G) for L in range(n_layers) for G in range(n_experts)]
    for pattern, count in ((ZERO_FILE, layout.get("world_size")), (EXPP_FILE, layout.get("ep_size"))):
        have = {int(m.group(1)): n for n in names if (m := pattern.match(n))}
        if have and isinstance(count, int):
            example = next(iter(have.values()))
            want += [re.sub(r"rank_\d+_", f"rank_{r}_", example, count=1) for r in range(count)]
    missing = [n for n in want if n not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        have = [t for t in complete_tags(tag_dir.parent) if t != tag_dir.name]
        hint = f"resume from {have[-1]} by writing `{have[-1]}` into {tag_dir.parent / LATEST}, or use a new --out" \
            if have else "use a new --out"
        raise UserError(f"--resume: checkpoint {tag_dir} is incomplete: {missing[0]} is missing{more}; {hint}")


def run_settings(engine) -> dict:
    """This run's optimizer settings (--lr through the schedule's base LRs, --weight-decay, --adam-betas) before a
    checkpoint is loaded: DeepSpeed's load restores the saved ones, and a resume applies this run's
    (`apply_run_settings`)."""
    sch = engine.lr_scheduler
    groups = [{k: g[k] for k in ("weight_decay", "betas", "eps") if k in g} for g in sch.optimizer.param_groups]
    return {"groups": groups, "base_lrs": list(sch.base_lrs)}


def apply_run_settings(engine, settings: dict) -> None:
    """Put `run_settings` back after a load, and recompute the current LR at the loaded schedule position."""
    from .optim import recompute_lrs

    sch = engine.lr_scheduler
    for group, saved in zip(sch.optimizer.param_groups, settings["groups"]):
        group.update(saved)
    sch.base_lrs = list(settings["base_lrs"])
    recompute_lrs(sch)


def load(engine, ckpt_dir: Path, tag: str) -> dict:
    """Collective: load checkpoint `tag` (already prechecked) into `engine` with DeepSpeed's own load (bit-exact:
    weights, optimizer state, schedule position), this run's optimizer settings applied on top; restores this rank's
    RNG; returns the client state."""
    settings = run_settings(engine)
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"could not load DeepSpeed checkpoint {ckpt_dir}/{tag}")
    apply_run_settings(engine, settings)
    rng = Path(ckpt_dir) / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng.is_file():
        _set_rng_state(safe_load(rng), rng)
    return client_state or {}
