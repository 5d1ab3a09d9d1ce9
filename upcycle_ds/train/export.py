"""HF exports at the end of (and during) training, safe at any size: no rank waits for disk writes inside a
collective whose timeout is sized for the training step.

- `export_hf_moe` (collective): the HF MoE checkpoint of a saved DeepSpeed checkpoint. Every rank writes its share of
  the safetensors shards (shard i by rank i mod world, read from the checkpoint files on disk), so a 95 GB export of
  an 8B x 8 model is written by all ranks of the job in parallel; rank 0 then adds the index, config and tokenizer
  and renames the finished directory into place. Ranks wait for each other in the host-side I/O barrier
  (`launch.distributed.wait_for_io`), whose timeout is `--io-timeout-s`.
- `export_hf_dense` (collective): an HF dense checkpoint of a training engine (`upcycle-ds sft`). Under bf16 the fp32
  master weights are gathered from the ZeRO partitions one parameter at a time (DeepSpeed's
  `safe_get_full_fp32_param`, an all-reduce every rank takes part in) and only rank 0 keeps each one, writing it
  straight into the shard; the other ranks discard theirs at once. Host memory: one parameter.
Both write into a temp dir next to the output and rename it at the end (never half-written).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..io.hf import copy_side_files, replace_dir, shard_layout, write_config, write_index, write_shard
from ..launch.distributed import wait_for_io

MAX_SHARD_BYTES = 2 * 1024**3


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _fresh_tmp(out: Path, tag: str) -> Path:
    """Rank 0: an empty temp dir next to `out` with a name every rank can compute."""
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def export_hf_moe(ckpt_dir: Path, out: Path, tag: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Collective: the DeepSpeed checkpoint `ckpt_dir/tag` as an HF MoE checkpoint at `out` (see module docs)."""
    from ..io.ds import DSCheckpoint

    rank, world = _rank_world()
    out, tmp = Path(out), Path(out).parent / f".{Path(out).name}.tmp-{tag}"
    if rank == 0:
        _fresh_tmp(out, tag)
    wait_for_io()
    try:
        ckpt = DSCheckpoint(ckpt_dir, tag=tag)
        plan = [(k, ckpt.dtype(k), tuple(ckpt.shape(k))) for k in ckpt.keys()]
        layout = shard_layout(plan, max_shard_bytes)
        for i, (name, idxs) in enumerate(layout):
            if i % world == rank:
                write_shard(tmp / name, plan, idxs, ckpt.get)
        ckpt.close()
    finally:
        wait_for_io()  # also on an error: the other ranks must not be left waiting
    if rank == 0:
        write_index(tmp, plan, layout)
        write_config(tmp, ckpt.config)
        copy_side_files(ckpt.side_dir, tmp)
        replace_dir(tmp, out, overwrite=True)  # the run dir is this job's (locked): a resumed run exports again
    wait_for_io()
    return out


def dense_export_plan(engine, which: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every parameter written by `export_hf_dense` (tied weights once)."""
    master = which == "master" and engine.bfloat16_enabled()
    plan = []
    for name, p in engine.module.named_parameters():
        dtype = torch.float32 if master or which == "master" else p.dtype
        plan.append((name, dtype, tuple(p.shape)))
    return plan


def export_hf_dense(engine, out: Path, tokenizer_dir: Path, which: str, meta: dict,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Collective: the engine's dense model as an HF checkpoint at `out`, with `meta` as sft_checkpoint.json.

    which = "master": the fp32 master weights (gathered from the ZeRO partitions under bf16; the fp32 module weights
    otherwise); "module": the module's own weights (bf16 under --dtype bf16)."""
    from deepspeed.utils import safe_get_full_fp32_param

    rank, _ = _rank_world()
    out = Path(out)
    gather = which == "master" and engine.bfloat16_enabled()
    params = dict(engine.module.named_parameters())
    plan = dense_export_plan(engine, which)

    def fetch(name: str) -> torch.Tensor:
        p = params[name]
        if gather and p.requires_grad:
            full = safe_get_full_fp32_param(p)  # collective: every rank calls it, in plan order
            if full is None:
                raise RuntimeError(f"no fp32 master weight for {name} (use --hf-weights module)")
            return full.detach().float() if rank == 0 else None
        return p.detach().float() if which == "master" else p.detach()

    tag = f"step{meta.get('step', 0)}"
    if rank == 0:
        tmp = _fresh_tmp(out, tag)
        try:
            layout = shard_layout(plan, max_shard_bytes)
            for name, idxs in layout:
                write_shard(tmp / name, plan, idxs, fetch)
            write_index(tmp, plan, layout)
            engine.module.config.save_pretrained(str(tmp))
            gen = getattr(engine.module, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(str(tmp))
            cfg = json.loads((tmp / "config.json").read_text())
            dtype = plan[0][1] if plan else torch.float32
            cfg["dtype"] = str(dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            copy_side_files(tokenizer_dir, tmp)
            (tmp / "sft_checkpoint.json").write_text(json.dumps({**meta, "weights": which, "dtype": str(dtype)},
                                                                indent=2) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, out, overwrite=True)  # the run dir is this job's (locked): a resumed run exports again
    elif gather:
        for name, _, _ in plan:
            fetch(name)  # take part in every gather; the result is rank 0's business
    wait_for_io()
    return out
