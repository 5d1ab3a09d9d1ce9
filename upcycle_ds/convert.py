"""Format-to-format conversions, streamed tensor by tensor: DeepSpeed MoE checkpoint <-> HF MoE <-> HF dense.

Every reader has the read interface of `io.hf.HFCheckpoint` (config, path, keys, get, shape, dtype, `in`) under HF
names: `HFCheckpoint` (HF dense or MoE), `io.ds.DSCheckpoint` (a DeepSpeed save dir), `upcycle.UpcycledView` (dense
seen as its upcycled MoE) and `CollapsedView` here (MoE seen as dense). Writers take such a view: `write_sharded` for
HF safetensors, `io.ds.write_ds_checkpoint` for DeepSpeed. Outputs are written into a temp dir and renamed at the end.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import UserError
from .families import family_for
from .families.base import PROJS
from .io.ds import DSCheckpoint, ds_expert_name, is_ds_checkpoint, module_layout, write_ds_checkpoint
from .io.hf import (HFCheckpoint, _nbytes, atomic_output_dir, check_output_dir, copy_side_files, read_config,
                    write_config, write_hf_checkpoint)
from .io.paths import check_name
from .io.source import PlannedSource
from .surgery import read_moe_tensor

FORMATS = ("hf-dense", "hf-moe", "ds")


def detect_format(path: str | Path) -> str:
    """`ds` (DeepSpeed save dir with `latest`, or a tag dir), `hf-moe` or `hf-dense` (from config.json)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such directory")
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


class CollapsedView(PlannedSource):
    """An HF MoE checkpoint seen as the HF dense model it came from: each MoE layer's experts collapsed into one MLP
    (the mean of the experts, accumulated in float64 so that E identical copies give back the copy bit for bit, or
    expert `expert`), router dropped. The exact inverse of copy-upcycling."""

    def __init__(self, moe, expert: int | None = None):
        self.moe, self.expert = moe, expert
        self.path = moe.path
        cfg = dict(moe.config)
        self.family, is_moe = family_for(cfg)
        if not is_moe:
            raise UserError(f"{moe.path} is already a dense checkpoint")
        fam = self.family
        self.num_experts = fam.num_experts(cfg)
        if expert is not None and not 0 <= expert < self.num_experts:
            raise UserError(f"--expert {expert} out of range (the model has {self.num_experts} experts)")
        moe_layers = fam.moe_layers(cfg)
        if len(moe_layers) < cfg["num_hidden_layers"] and fam.expert_intermediate_size(cfg) != cfg.get(
                "intermediate_size"):
            raise UserError(f"cannot collapse to dense: the dense layers have intermediate_size "
                            f"{cfg.get('intermediate_size')} and the experts {fam.expert_intermediate_size(cfg)}")
        self.config = fam.dense_config(cfg)
        self.config.pop("upcycle_ds", None)
        self._plan: dict[str, tuple[torch.dtype, tuple[int, ...], tuple]] = {}
        skip = set()
        for layer in moe_layers:
            skip.add(fam.router_key(layer))
            skip.update(t.format(layer=layer) for t in fam.moe_shared.values())
            skip.update(t.format(layer=layer) for t in fam.moe_fused.values())
            skip.update(fam.expert_key(layer, e, p) for e in range(self.num_experts) for p in PROJS)
            for ours, tmpl in fam.moe_shared.items():
                key = tmpl.format(layer=layer)
                if ours.endswith("proj.weight") and key in moe and 0 not in moe.shape(key):
                    raise UserError(f"{moe.path}: layer {layer} has a non-empty shared expert ({key} "
                                    f"{list(moe.shape(key))}); a dense MLP cannot hold experts + shared expert")
        by_layer = {}
        for key in moe.keys():
            if key in skip:
                continue
            parsed = fam.parse_moe_key(key)
            if parsed is not None and parsed[0] in ("expert", "fused"):
                raise UserError(f"{moe.path}: {key} belongs to an MoE layer config.json does not list")
            self._plan[key] = (moe.dtype(key), moe.shape(key), ("copy", key))
        for layer in moe_layers:
            for p in PROJS:
                dtype, shape = self._expert_meta(layer, p)
                by_layer[fam.dense_mlp_key(layer, p)] = (dtype, shape, ("collapse", layer, p))
        self._plan.update(by_layer)
        self._order = sorted(self._plan, key=_layer_order)

    def _expert_meta(self, layer: int, proj: str):
        fam, moe = self.family, self.moe
        key = fam.expert_key(layer, 0, proj)
        if key in moe:
            return moe.dtype(key), moe.shape(key)
        fused = fam.moe_fused["down" if proj == "down" else "gate_up"].format(layer=layer)
        if fused not in moe:
            raise UserError(f"{moe.path}: tensor {key} is missing")
        shape = moe.shape(fused)[1:]
        if proj != "down":
            shape = (shape[0] // 2, shape[1])
        return moe.dtype(fused), tuple(shape)

    def keys(self) -> list[str]:
        return list(self._order)

    def get(self, key: str) -> torch.Tensor:
        dtype, shape, how = self._plan[key]
        if how[0] == "copy":
            return self.moe.get(how[1])
        _, layer, proj = how
        fam = self.family
        if self.expert is not None:
            return read_moe_tensor(self.moe, fam, fam.expert_key(layer, self.expert, proj))
        acc = None
        for e in range(self.num_experts):
            t = read_moe_tensor(self.moe, fam, fam.expert_key(layer, e, proj)).to(torch.float64)
            acc = t if acc is None else acc.add_(t)
        return acc.div_(self.num_experts).to(dtype)


def _layer_order(key: str):
    parts = key.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return (1, int(parts[2]))
    return (0 if "embed" in key else 2, 0)


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


def _ds_plan(view) -> Plan:
    """Our names and shapes as `write_ds_checkpoint` will write them (module file, then experts)."""
    config = dict(view.config)
    fam, _ = family_for(config)
    entries = []
    tied = bool(config.get("tie_word_embeddings", False))
    for name, shape in module_layout(config):
        key = fam.hf_key_for_ds_param(name, 0)
        if tied and name == "lm_head.weight" and key not in view:
            key = "model.embed_tokens.weight"
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
    return Plan("ds", entries, config)


# ------------------------------------------------------------------------------------------------------ writers
def _write_hf(view, out: Path, overwrite: bool, side_dir: Path, desc: str, max_shard_bytes: int) -> int:
    return write_hf_checkpoint(view, out, overwrite=overwrite, side_dir=side_dir, desc=desc,
                               max_shard_bytes=max_shard_bytes, inputs=(view.path,))


def _write_ds(view, out: Path, overwrite: bool, side_dir: Path, ep_size: int, tag: str) -> int:
    n = len(_ds_plan(view).entries)
    with atomic_output_dir(out, overwrite, inputs=(view.path,)) as tmp:
        with tqdm(total=n, desc="to ds", unit="tensor", file=sys.stderr, disable=None) as bar:
            nbytes = write_ds_checkpoint(view, tmp, ep_size=ep_size, tag=tag, progress=bar)
        write_config(tmp, view.config)
        copy_side_files(side_dir, tmp)
    return nbytes


def _side_dir(reader) -> Path:
    return reader.side_dir if isinstance(reader, DSCheckpoint) else Path(reader.path)


def ds_to_hf_moe(ckpt_dir: str | Path, out_dir: str | Path, *, tag: str | None = None, weights: str = "module",
                 overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """A DeepSpeed MoE checkpoint (save dir with `latest`, save dir + tag, or a tag dir) -> an HF MoE checkpoint
    (hub per-expert layout + config.json + tokenizer files) that `AutoModelForCausalLM.from_pretrained` loads."""
    check_output_dir(out_dir, overwrite)
    ckpt = DSCheckpoint(ckpt_dir, tag=tag, weights=weights)
    _write_hf(ckpt, Path(out_dir), overwrite, ckpt.side_dir, "ds -> hf-moe", max_shard_bytes)
    return Path(out_dir)


def convert(input: str | Path, output: str | Path, to: str, *, ep_size: int = 1, tag: str | None = None,
            weights: str = "module", expert: int | None = None, dry_run: bool = False, overwrite: bool = False,
            upcycle=None, max_shard_bytes: int = 2 * 1024**3, out_tag: str = "global_step0") -> Plan:
    """Convert `input` (any format, detected) to `to`; returns the plan (written unless dry_run).

    `upcycle` (an `UpcycleOptions`) is used when an HF dense input must become an MoE (`--to ds`)."""
    if to not in FORMATS:
        raise UserError(f"--to must be one of {', '.join(FORMATS)} (got {to!r})")
    if expert is not None and to != "hf-dense":
        raise UserError("--expert applies to --to hf-dense only")
    if not max_shard_bytes > 0:
        raise UserError(f"--max-shard-gb must be > 0 (got {max_shard_bytes / 1024**3:g})")
    if to == "ds":
        check_name(out_tag, "--out-tag")
    if Path(output).resolve() == Path(input).resolve():
        raise UserError("--output must differ from --input")
    if not dry_run:
        check_output_dir(output, overwrite, inputs=(input,))
    fmt, reader = open_checkpoint(input, tag=tag, weights=weights)
    side = _side_dir(reader)
    out = Path(output)
    if to == "hf-dense":
        if fmt == "hf-dense":
            raise UserError(f"{input} is already an HF dense checkpoint")
        view = CollapsedView(reader, expert)
        plan = _hf_plan(view, to)
        if not dry_run:
            _write_hf(view, out, overwrite, side, f"{fmt} -> hf-dense", max_shard_bytes)
        return plan
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
            _write_hf(reader, out, overwrite, side, f"{fmt} -> hf-moe", max_shard_bytes)
        return plan
    # to == "ds"
    fam, _ = family_for(reader.config)
    E = fam.num_experts(reader.config)
    if ep_size < 1 or E % ep_size:
        raise UserError(f"--ep-size {ep_size} does not divide the number of experts {E}")
    plan = _ds_plan(reader)
    if not dry_run:
        _write_ds(reader, out, overwrite, side, ep_size, out_tag)
    return plan
