"""Merge an MoE back into one dense MLP per layer (`upcycle-ds convert --to hf-dense`), for cheap serving.

Experts of a layer are numbered e = c*G + g: copy c of neuron group g (G = 1 for whole-MLP experts; the granularity
comes from config.json's `upcycle_ds` record, or `--merge-granularity`). For each group g the C experts (c, g) are
averaged with weights a_{c,g} >= 0, the G averaged slices are concatenated along the intermediate dimension (their
`down` divided by G, undoing granular upcycling's x G), followed by the shared expert (Qwen2-MoE) with its `down`
multiplied by a constant standing in for its sigmoid gate:

    gate = concat_g( sum_c a_cg gate_cg / sum_c a_cg )        up likewise
    down = concat_g( sum_c a_cg down_cg / (G sum_c a_cg) )  ++  s * down_shared

- `average`: a_{c,g} = 1, s = sigmoid(0) = 1/2 (the gate's value at initialisation). The exact inverse of copy and
  granular upcycling (tensor for tensor with the contiguous split; with a random / cluster split the neurons come
  back in another order: the same function).
- `router-weighted` (XFT, arXiv 2404.15247, merges by routing statistics): a_{c,g} = token-slots routed to expert
  (c, g) on a calibration set, s = the mean sigmoid gate value over its tokens (`calibrate`).
- `--expert i`: a_{c,g} = 1 for copy c = i only (G = 1: expert i itself).

Sums are accumulated in float64 and divided once, so C identical copies give the copy back bit for bit.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from . import checks
from .families import family_for
from .families.base import PROJS
from .granular import SHARED_GATE_INIT
from .io.source import PlannedSource
from .options import MERGES, MergeOptions, granularity_of  # noqa: F401  (re-exported)
from .surgery import read_moe_tensor

REPORT = "merge_report.json"


class MergedView(PlannedSource):
    """An HF MoE checkpoint seen as a dense HF checkpoint: each MoE layer's experts (and shared expert) merged into
    one MLP as the module docstring states; router and shared gate dropped, every other tensor as it is.

    `counts`: {layer: (E,) non-negative weights a_e} (None = uniform); `shared_gate`: {layer: s} (None = 1/2);
    `expert`: take copy `expert` alone."""

    def __init__(self, moe, *, expert: int | None = None, granularity: int | None = None,
                 counts: dict[int, torch.Tensor] | None = None, shared_gate: dict[int, float] | None = None):
        self.moe, self.path = moe, moe.path
        cfg = dict(moe.config)
        self.family, is_moe = family_for(cfg)
        if not is_moe:
            raise UserError(f"{moe.path} is already a dense checkpoint")
        fam = self.family
        E = self.num_experts = fam.num_experts(cfg)
        G = self.granularity = granularity_of(cfg, granularity)
        if E % G:
            raise UserError(f"{E} experts cannot be {G}-way granular (E must be a multiple of the granularity)")
        self.copies = E // G
        if expert is not None and not 0 <= expert < self.copies:
            what = "experts" if G == 1 else f"copies of {G} slices"
            raise UserError(f"--expert {expert} out of range (the model has {self.copies} {what})")
        self.moe_layers = fam.moe_layers(cfg)
        self.weights = {l: self._copy_weights(l, expert, counts) for l in self.moe_layers}
        self.shared_gate = {l: float((shared_gate or {}).get(l, SHARED_GATE_INIT)) for l in self.moe_layers}

        self._plan: dict[str, tuple[torch.dtype, tuple[int, ...], tuple]] = {}
        skip, merged = set(), {}
        inter_sizes = set()
        for layer in self.moe_layers:
            skip.add(fam.router_key(layer))
            skip.update(t.format(layer=layer) for t in fam.moe_shared.values())
            skip.update(t.format(layer=layer) for t in fam.moe_fused.values())
            skip.update(fam.expert_key(layer, e, p) for e in range(E) for p in PROJS)
            dtype, (i_e, hidden) = self._expert_meta(layer, "gate")
            i_s = self._shared_size(layer)
            inter = G * i_e + i_s
            inter_sizes.add(inter)
            for p in PROJS:
                shape = (hidden, inter) if p == "down" else (inter, hidden)
                merged[fam.dense_mlp_key(layer, p)] = (dtype, shape, ("merge", layer, p, i_s))
        if len(inter_sizes) > 1:
            raise UserError(f"cannot merge to dense: MoE layers merge to different intermediate sizes "
                            f"{sorted(inter_sizes)}")
        inter = inter_sizes.pop() if inter_sizes else int(cfg["intermediate_size"])
        if len(self.moe_layers) < cfg["num_hidden_layers"] and inter != cfg.get("intermediate_size"):
            raise UserError(f"cannot merge to dense: the dense layers have intermediate_size "
                            f"{cfg.get('intermediate_size')} and the merged MoE layers {inter}")
        self.config = fam.dense_config(cfg)
        self.config["intermediate_size"] = inter
        self.config.pop("upcycle_ds", None)
        for key in moe.keys():
            if key in skip:
                continue
            parsed = fam.parse_moe_key(key)
            if parsed is not None and parsed[0] in ("expert", "fused"):
                raise UserError(f"{moe.path}: {key} belongs to an MoE layer config.json does not list")
            self._plan[key] = (moe.dtype(key), moe.shape(key), ("copy", key))
        self._plan.update(merged)
        self._order = sorted(self._plan, key=_layer_order)

    # ------------------------------------------------------------------ weights and shapes
    def _copy_weights(self, layer: int, expert: int | None, counts) -> torch.Tensor:
        """(C, G) float64 weights a_{c,g}."""
        C, G = self.copies, self.granularity
        if expert is not None:
            a = torch.zeros(C, G, dtype=torch.float64)
            a[expert] = 1
            return a
        if counts is None:
            return torch.ones(C, G, dtype=torch.float64)
        a = torch.as_tensor(counts[layer], dtype=torch.float64).reshape(C, G).clone()
        a[:, a.sum(0) == 0] = 1  # a group no calibration token reached: plain mean
        return a

    def _expert_meta(self, layer: int, proj: str):
        fam, moe = self.family, self.moe
        key = fam.expert_key(layer, 0, proj)
        if key in moe:
            return moe.dtype(key), tuple(moe.shape(key))
        fused = fam.moe_fused["down" if proj == "down" else "gate_up"].format(layer=layer)
        if fused not in moe:
            raise checks.missing_tensor_error(moe.path, key)
        shape = moe.shape(fused)[1:]
        if proj != "down":
            shape = (shape[0] // 2, shape[1])
        return moe.dtype(fused), tuple(shape)

    def _shared_size(self, layer: int) -> int:
        if not self.family.has_shared_expert:
            return 0
        key = self.family.shared_key(layer, "shared_mlp.gate_proj.weight")
        return int(self.moe.shape(key)[0]) if key in self.moe else 0

    # ------------------------------------------------------------------ read interface
    def keys(self) -> list[str]:
        return list(self._order)

    def get(self, key: str) -> torch.Tensor:
        dtype, shape, how = self._plan[key]
        if how[0] == "copy":
            return self.moe.get(how[1])
        _, layer, proj, i_s = how
        fam, G, C = self.family, self.granularity, self.copies
        a = self.weights[layer].tolist()
        dim = 1 if proj == "down" else 0
        parts = []
        for g in range(G):
            acc, norm = None, 0.0
            for c in range(C):
                if a[c][g] == 0:
                    continue
                t = read_moe_tensor(self.moe, fam, fam.expert_key(layer, c * G + g, proj)).to(torch.float64)
                t = t if a[c][g] == 1 else t.mul_(a[c][g])
                acc = t if acc is None else acc.add_(t)
                norm += a[c][g]
            acc = acc.div_(norm * (G if proj == "down" else 1))
            parts.append(acc.to(dtype))
        if i_s:
            t = self.moe.get(fam.shared_key(layer, f"shared_mlp.{proj}_proj.weight"))
            if proj == "down":
                t = (t.to(torch.float64) * self.shared_gate[layer]).to(dtype)
            parts.append(t)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _layer_order(key: str):
    parts = key.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return (1, int(parts[2]))
    return (0 if "embed" in key else 2, 0)


# ---------------------------------------------------------------------------------------------------- calibration
@dataclass
class Calibration:
    """What one pass of the MoE over the calibration rows measured."""

    tokens_per_expert: dict[int, torch.Tensor]
    """layer -> (E,) int64 token-slots routed to each expert."""
    shared_gate: dict[int, float]
    """layer -> mean sigmoid gate of the shared expert over the tokens (layers with a shared expert)."""
    loss: float
    """mean next-token cross-entropy over the labelled tokens."""
    rows: int
    tokens: int
    label_tokens: int
    losses: dict[str, float] = field(default_factory=dict)
    """name -> calibration loss of other models on the same rows (merged, baseline)."""


def calibration_rows(data: str, tokenizer, opts: MergeOptions) -> list[dict[str, torch.Tensor]]:
    """The calibration samples, one per row and without padding ({input_ids, labels, position_ids}, [1, n]), through
    the training data path (`upcycle_ds.data`: same formats, templates and labels as `upcycle-ds train`)."""
    from .data import DataConfig, batches, build_datasets

    cfg = DataConfig(data=data, max_length=opts.calib_max_length, eval_fraction=0.0, pack=False,
                     max_samples=opts.calib_max_rows)
    ds, _ = build_datasets(cfg, tokenizer)
    rows = []
    for b in batches(ds, micro_batch_size=1, rank=0, world_size=1, seed=0, epoch=0, shuffle=False):
        pos = b["position_ids"][0]
        restart = (pos[1:] == 0).nonzero()  # the padding tail restarts its position ids at 0
        n = int(restart[0]) + 1 if restart.numel() else pos.numel()
        rows.append({k: b[k][:, :n] for k in ("input_ids", "labels", "position_ids")})
    if not rows:
        raise UserError(f"--calib-data {data}: no usable sample")
    return rows


def _lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    from .data import IGNORE

    lab = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             lab.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return float(loss), int((lab != IGNORE).sum())


def _device(opts: MergeOptions) -> torch.device:
    return torch.device(opts.calib_device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _dtype(opts: MergeOptions) -> torch.dtype:
    from .dtypes import torch_dtype

    return torch_dtype(opts.calib_dtype, _device(opts))


@torch.no_grad()
def model_loss(model, rows, device) -> float:
    total, n = 0.0, 0
    for r in rows:
        out = model(input_ids=r["input_ids"].to(device), position_ids=r["position_ids"].to(device), use_cache=False)
        s, k = _lm_loss_sum(out.logits, r["labels"].to(device))
        total, n = total + s, n + k
    return total / max(n, 1)


@torch.no_grad()
def calibrate(source, rows, opts: MergeOptions) -> Calibration:
    """Run our MoE (`surgery.build_moe_model`, one process, eval mode) over the rows: token-slots per expert per
    layer (the router's own statistics), the mean shared-expert gate, and the loss."""
    from .moe.layer import moe_layers
    from .surgery import build_moe_model

    device = _device(opts)
    model = build_moe_model(source, ep_size=1, dtype=_dtype(opts)).to(device).eval()
    layers = moe_layers(model)
    counts = {l: None for l, _ in layers}
    gate_sum = {l: torch.zeros((), dtype=torch.float64, device=device) for l, m in layers if m.shared_mlp is not None}
    handles = []
    for l, m in layers:
        if m.shared_mlp_gate is not None:
            def hook(_mod, _inp, out, l=l):
                gate_sum[l] += torch.sigmoid(out.double()).sum()
            handles.append(m.shared_mlp_gate.register_forward_hook(hook))
    total, n_lab, n_tok = 0.0, 0, 0
    try:
        for r in rows:
            out = model(input_ids=r["input_ids"].to(device), position_ids=r["position_ids"].to(device),
                        use_cache=False)
            for l, m in layers:
                t = m.router.stats.tokens_per_expert
                counts[l] = t.clone() if counts[l] is None else counts[l] + t.to(counts[l].device)
            s, k = _lm_loss_sum(out.logits, r["labels"].to(device))
            total, n_lab, n_tok = total + s, n_lab + k, n_tok + r["input_ids"].numel()
    finally:
        for h in handles:
            h.remove()
    del model
    return Calibration(tokens_per_expert={l: c.cpu() for l, c in counts.items()},
                       shared_gate={l: float(s) / n_tok for l, s in gate_sum.items()},
                       loss=total / max(n_lab, 1), rows=len(rows), tokens=n_tok, label_tokens=n_lab)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"--calib-data needs the model's tokenizer next to the checkpoint ({path}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def hf_dense_loss(path: str | Path, rows, opts: MergeOptions) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype(opts)).to(_device(opts)).eval()
    return model_loss(model, rows, _device(opts))


def merge_report(view: MergedView, opts: MergeOptions, calib: Calibration | None) -> dict:
    rep = {"merge": opts.merge, "granularity": view.granularity, "copies": view.copies,
           "layers": {str(l): {"weights": (view.weights[l] / view.weights[l].sum(0)).tolist(),
                               "shared_gate": view.shared_gate[l]} for l in view.moe_layers}}
    if calib is not None:
        rep["calibration"] = {"data": opts.calib_data, "rows": calib.rows, "tokens": calib.tokens,
                              "label_tokens": calib.label_tokens,
                              "loss": {"moe": calib.loss, **calib.losses}}
        for l in view.moe_layers:
            rep["layers"][str(l)]["tokens_per_expert"] = calib.tokens_per_expert[l].tolist()
            if l in calib.shared_gate:
                rep["layers"][str(l)]["measured_shared_gate"] = calib.shared_gate[l]
    return rep


def merge_to_dense(reader, out: Path, *, opts: MergeOptions, expert: int | None, side_dir: Path, overwrite: bool,
                   max_shard_bytes: int, dry_run: bool, desc: str, inputs: tuple = ()) -> MergedView:
    """Build the merged view (calibrating first when asked), write it with `merge_report.json`; with calibration
    data, the merged model is loaded back with transformers and its loss reported next to the MoE's (and the
    baseline's)."""
    from .io.hf import write_hf_checkpoint

    calib, rows = None, None
    if opts.calib_baseline is not None:
        from .io.hf import read_config

        if family_for(read_config(opts.calib_baseline))[1]:
            raise UserError(f"--calib-baseline {opts.calib_baseline} is an MoE checkpoint; give a dense one")
    if opts.calib_data is not None and not dry_run:
        rows = calibration_rows(opts.calib_data, load_tokenizer(side_dir), opts)
        calib = calibrate(reader, rows, opts)
        if opts.calib_baseline is not None:
            calib.losses["baseline"] = hf_dense_loss(opts.calib_baseline, rows, opts)
    weighted = opts.merge == "router-weighted" and calib is not None
    view = MergedView(reader, expert=expert, granularity=opts.merge_granularity,
                      counts=calib.tokens_per_expert if weighted else None,
                      shared_gate=calib.shared_gate if weighted else None)
    if dry_run:
        return view

    def extra(tmp: Path) -> None:
        if calib is not None:
            calib.losses["merged"] = hf_dense_loss(tmp, rows, opts)
        (tmp / REPORT).write_text(json.dumps(merge_report(view, opts, calib), indent=2) + "\n")

    write_hf_checkpoint(view, out, overwrite=overwrite, side_dir=side_dir, desc=desc,
                        max_shard_bytes=max_shard_bytes, extra=extra, inputs=inputs)
    if calib is not None:
        line = f"calibration loss on {calib.label_tokens} tokens of {opts.calib_data}: MoE {calib.loss:.4f}, " \
               f"merged dense ({opts.merge}) {calib.losses['merged']:.4f}"
        if "baseline" in calib.losses:
            line += f", baseline dense {calib.losses['baseline']:.4f}"
        print(line, file=sys.stderr)
    return view

