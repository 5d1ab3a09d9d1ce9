"""Format-to-format conversions, streamed tensor by tensor: DeepSpeed MoE checkpoint <-> HF MoE <-> HF dense.

Every reader has the read interface of `io.hf.HFCheckpoint` (config, path, keys, get, shape, dtype, `in`) under HF
names: `HFCheckpoint` (HF dense or MoE), `io.ds.DSCheckpoint` (a DeepSpeed save dir), `upcycle.UpcycledView` (dense
seen as its upcycled MoE) and `merge.MergedView` (MoE merged back into dense: average / router-weighted). Writers
take such a view: `write_sharded` for HF safetensors, `io.ds.write_ds_checkpoint` for DeepSpeed. Outputs are written
into a temp dir and renamed at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from . import checks
from .progress import Progress
from .families import family_for
from .families.base import PROJS, weight_key
from .io.ds import DSCheckpoint, ds_expert_name, is_ds_checkpoint, module_layout, write_ds_checkpoint
from .io.ds_optim import open_saved_optimizer, write_universal
from .io.hf import (HFCheckpoint, _nbytes, atomic_output_dir, check_output_dir, copy_side_files, read_config,
                    write_config, write_hf_checkpoint)
from .io.paths import check_name
from .merge import MergeOptions, merge_to_dense

FORMATS = ("hf-dense", "hf-moe", "ds")


def detect_format(path: str | Path) -> str:
    """`ds` (DeepSpeed save dir with `latest`, or a tag dir), `hf-moe` or `hf-dense` (from config.json)."""
    p = Path(path)
    checks.existing(p)
    if p.is_dir() and is_ds_checkpoint(p):
        return "ds"
    _, is_moe = family_for(read_config(p))
    return "hf-moe" if is_moe else "hf-dense"


def open_checkpoint(path: str | Path, *, tag: str | None = None, weights: str = "module"):
    """(format, reader) for any supported input dir."""
    fmt = detect_format(path)
    if fmt == "ds":
        return fmt, DSCheckpoint(path, tag=tag, weights=weights)
    if tag is not None:
        raise UserError(f"--tag applies to DeepSpeed checkpoints; {path} is an HF checkpoint")
    if weights != "module":
        raise UserError(f"--weights master needs a DeepSpeed checkpoint with ZeRO optimizer files; {path} is HF")
    return fmt, HFCheckpoint(path)


# ------------------------------------------------------------------------------------------------------ plans
@dataclass
class Plan:
    """What a conversion will write: (name, dtype, shape) in write order, and how."""

    fmt: str
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]]
    config: dict

    @property
    def total_bytes(self) -> int:
        return sum(_nbytes(d, s) for _, d, s in self.entries)

    def describe(self) -> str:
        lines = [f"{'tensor':<80} {'shape':<18} {'dtype':<9} {'bytes':>14}"]
        for name, dtype, shape in self.entries:
            lines.append(f"{name:<80} {str(list(shape)):<18} {str(dtype).replace('torch.', ''):<9} "
                         f"{_nbytes(dtype, shape):>14,}")
        lines.append(f"total: {len(self.entries)} tensors, {self.total_bytes:,} bytes "
                     f"({self.total_bytes / 1e9:.3f} GB) as {self.fmt}")
        return "\n".join(lines)


def _hf_plan(view, fmt: str) -> Plan:
    return Plan(fmt, [(k, view.dtype(k), tuple(view.shape(k))) for k in view.keys()], view.config)


def _ds_plan(view, optimizer=None) -> Plan:
    """Our names and shapes as `write_ds_checkpoint` will write them (module file, then experts), then the optimizer
    state `write_universal` writes (with --with-optimizer)."""
    config = dict(view.config)
    fam, _ = family_for(config)
    entries = []
    for name, shape in module_layout(config):
        key = weight_key(config, fam.hf_key_for_ds_param(name, 0), lambda k: k in view)
        dtype = view.dtype(key) if key in view else torch.float32
        entries.append((name, dtype, shape))
    E = fam.num_experts(config)
    for layer in fam.moe_layers(config):
        for g in range(E):
            for p in PROJS:
                key = fam.expert_key(layer, g, p)
                dtype = view.dtype(key) if key in view else entries[0][1]
                hidden, inter = int(config["hidden_size"]), fam.expert_intermediate_size(config)
                entries.append((ds_expert_name(layer, g, p), dtype, (hidden, inter) if p == "down" else (inter, hidden)))
    for name in optimizer.names() if optimizer is not None else []:
        shape, moments, _ = optimizer.meta(name)
        entries += [(f"{name} [{k}]", torch.float32, shape)
                    for k in (("fp32", "exp_avg", "exp_avg_sq") if moments else ("fp32",))]
    return Plan("ds", entries, config)


# ------------------------------------------------------------------------------------------------------ writers
def _write_hf(view, out: Path, overwrite: bool, side_dir: Path, desc: str, max_shard_bytes: int,
              inputs: tuple) -> int:
    return write_hf_checkpoint(view, out, overwrite=overwrite, side_dir=side_dir, desc=desc,
                               max_shard_bytes=max_shard_bytes, inputs=inputs)


def _write_ds(view, out: Path, overwrite: bool, side_dir: Path, ep_size: int, tag: str, inputs: tuple,
              optimizer=None) -> int:
    n = len(_ds_plan(view, optimizer).entries)
    with atomic_output_dir(out, overwrite, inputs=inputs) as tmp:
        with Progress(n, "upcycle-ds convert (to ds)", "tensors") as bar:
            nbytes = write_ds_checkpoint(view, tmp, ep_size=ep_size, tag=tag, progress=bar)
            if optimizer is not None:
                fam, _ = family_for(view.config)
                nbytes += write_universal(optimizer, tmp / tag, fam.moe_layers(view.config), progress=bar)
        write_config(tmp, view.config)
        copy_side_files(side_dir, tmp)
    return nbytes


def _to_hf_dense(reader, out: Path, *, merge: MergeOptions, expert: int | None, side: Path, overwrite: bool,
                 max_shard_bytes: int, dry_run: bool, desc: str, inputs: tuple) -> Plan:
    """MoE -> dense with the chosen merge (`merge.merge_to_dense`: calibration, write, report)."""
    view = merge_to_dense(reader, out, opts=merge, expert=expert, side_dir=side, overwrite=overwrite,
                          max_shard_bytes=max_shard_bytes, dry_run=dry_run, desc=desc, inputs=inputs)
    return _hf_plan(view, "hf-dense")


def _side_dir(reader) -> Path:
    return reader.side_dir if isinstance(reader, DSCheckpoint) else Path(reader.path)


def ds_to_hf_moe(ckpt_dir: str | Path, out_dir: str | Path, *, tag: str | None = None, weights: str = "module",
                 overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """A DeepSpeed MoE checkpoint (save dir with `latest`, save dir + tag, or a tag dir) -> an HF MoE checkpoint
    (hub per-expert layout + config.json + tokenizer files) that `AutoModelForCausalLM.from_pretrained` loads."""
    inputs = (("--model", ckpt_dir),)
    check_output_dir(out_dir, overwrite, inputs)
    ckpt = DSCheckpoint(ckpt_dir, tag=tag, weights=weights)
    _write_hf(ckpt, Path(out_dir), overwrite, ckpt.side_dir, "ds -> hf-moe", max_shard_bytes, inputs)
    return Path(out_dir)


def convert_inputs(input, merge: MergeOptions) -> tuple:
    """(flag, path) of everything a conversion reads: the model, and for a calibrated merge its data and baseline."""
    from .data.sources import local_paths

    calib = [("--calib-data", p) for p in local_paths(merge.calib_data)] if merge.calib_data else []
    return (("--model", input), *calib, ("--calib-baseline", merge.calib_baseline))


def convert(input: str | Path, output: str | Path, to: str, *, ep_size: int = 1, tag: str | None = None,
            weights: str = "module", expert: int | None = None, dry_run: bool = False, overwrite: bool = False,
            upcycle=None, max_shard_bytes: int = 2 * 1024**3, out_tag: str | None = None,
            merge: MergeOptions | None = None, with_optimizer: bool = False) -> Plan:
    """Convert `input` (any format, detected) to `to`; returns the plan (written unless dry_run).

    `upcycle` (an `UpcycleOptions`) is used when an HF dense input must become an MoE (`--to ds`); `merge` (a
    `MergeOptions`) says how an MoE becomes dense (`--to hf-dense`). `with_optimizer` (ds -> ds): also write the
    optimizer state (fp32 masters, AdamW moments, steps) and the run's position, layout-free (`io.ds_optim`), so that
    `upcycle-ds train --resume` continues from the output on any layout; the tag defaults to the input's."""
    if to not in FORMATS:
        raise UserError(f"--to must be one of {', '.join(FORMATS)} (got {to!r})")
    merge = merge or MergeOptions()
    merge.validate_merge(to=to, expert=expert)
    if expert is not None and to != "hf-dense":
        raise UserError("--expert applies to --to hf-dense only")
    checks.positive("--max-shard-gb", float(f"{max_shard_bytes / 1024**3:g}"))
    if with_optimizer and to != "ds":
        raise UserError("--with-optimizer applies to --to ds (a DeepSpeed checkpoint to resume from)")
    if with_optimizer and weights != "module":
        raise UserError("--with-optimizer writes the module weights and the fp32 masters both; leave --weights module")
    if to == "ds" and out_tag is not None:
        check_name(out_tag, "--out-tag")
    inputs = convert_inputs(input, merge)
    if not dry_run:
        check_output_dir(output, overwrite, inputs=inputs)
    fmt, reader = open_checkpoint(input, tag=tag, weights=weights)
    optimizer = None
    if with_optimizer:
        if fmt != "ds":
            raise UserError(f"--with-optimizer needs a DeepSpeed checkpoint as --model; {input} is {fmt}")
        optimizer = open_saved_optimizer(reader.tag_dir)
    out_tag = out_tag or (reader.tag if optimizer is not None else "global_step0")
    side = _side_dir(reader)
    out = Path(output)
    if to == "hf-dense":
        if fmt == "hf-dense":
            raise UserError(f"{input} is already an HF dense checkpoint")
        return _to_hf_dense(reader, out, merge=merge, expert=expert, side=side, overwrite=overwrite,
                            max_shard_bytes=max_shard_bytes, dry_run=dry_run, desc=f"{fmt} -> hf-dense",
                            inputs=inputs)
    if fmt == "hf-dense":
        if to == "hf-moe":
            raise UserError("hf-dense -> hf-moe is `upcycle-ds upcycle`")
        from .upcycle import UpcycledView, UpcycleOptions

        reader = UpcycledView(reader, upcycle or UpcycleOptions())
    if to == "hf-moe":
        if fmt == "hf-moe":
            raise UserError(f"{input} is already an HF MoE checkpoint")
        plan = _hf_plan(reader, to)
        if not dry_run:
            _write_hf(reader, out, overwrite, side, f"{fmt} -> hf-moe", max_shard_bytes, inputs)
        return plan
    # to == "ds"
    fam, _ = family_for(reader.config)
    E = fam.num_experts(reader.config)
    checks.ep_divides(ep_size, E)
    plan = _ds_plan(reader, optimizer)
    if not dry_run:
        _write_ds(reader, out, overwrite, side, ep_size, out_tag, inputs, optimizer)
    return plan
