"""UpIT stage 1+2 (docs/upit.md): dense SFT checkpoints -> one HF MoE checkpoint, expanded when E > checkpoints.

`AssembledView` has the read interface of `io.hf.HFCheckpoint` (config, keys, shape, dtype, get), so
`io.hf.write_sharded` streams it like `upcycle.UpcycledView`. Choices (docs/upit.md marks them **[our choice]**):

- Expert i (every MoE layer) is checkpoint i's MLP, in the order given. With more checkpoints than E, the **last E
  given** are used (pass checkpoints oldest first: later checkpoints make better experts).
- Non-expert weights (embeddings, attention, norms, lm_head, the MLPs of dense layers): from the last checkpoint
  (`last`, default), or `average`: the elementwise mean over the checkpoints used as experts (computed in float64,
  cast back to the checkpoint dtype).
- Router: random, exactly as `upcycle` makes it (`upcycle.make_router`, seeded from --seed and the layer);
  `router-init` trains it later.
- Expansion base (deltas are taken from it): `--base`, the dense model before SFT, is what UpIT means and is
  recommended. Without it the **first checkpoint given** stands in for it (the earliest one, closest to the base);
  its own delta is then all zeros, which `expand.cosine` treats as orthogonal to every other delta (cosine 0).
- Streaming: one MoE layer at a time — its MLPs from every checkpoint (+ base), the expanded pool — is in memory.
- Granular (`--granularity G`, docs/granular.md): each of the C = E/G pool MLPs (checkpoints, then expanded ones) is
  split into G fine-grained experts (c*G + g = neuron group g of pool MLP c, `down` x G; one neuron split per layer,
  computed from the last checkpoint, for all of them), and the G experts of one pool MLP share a router row. With
  top-k = G*k' the result computes exactly what the coarse assembled MoE (C experts, top-k') computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..families import family_for
from ..granular import slice_mlp
from ..io.hf import HFCheckpoint
from ..upcycle import UpcycledView
from .config import AssembleConfig, AssembleOptions  # noqa: F401  (re-exported)
from .expand import PROJS, delta_cosine_matrix, expand_pool, flat_delta

REPORT = "upit_report.json"


def _check_dense(ck: HFCheckpoint, what: str):
    fam, is_moe = family_for(ck.config)
    if is_moe:
        raise UserError(f"{what} {ck.path} is an MoE checkpoint ({ck.config.get('model_type')}); "
                        f"upit-assemble needs dense checkpoints")
    return fam


class AssembledView:
    """Dense SFT checkpoints presented as their UpIT-assembled HF MoE checkpoint (hub per-expert layout), lazily."""

    def __init__(self, checkpoints: list[HFCheckpoint], opts: AssembleOptions, base: HFCheckpoint | None = None):
        opts.validate()
        if not checkpoints:
            raise UserError("--checkpoints: give at least one dense checkpoint")
        self.opts = opts
        fams = [_check_dense(ck, "checkpoint") for ck in checkpoints]
        self.family = fams[-1]
        last = checkpoints[-1]
        for ck, fam in zip(checkpoints, fams):
            if fam.name != self.family.name:
                raise UserError(f"checkpoints mix model families: {ck.path} is {fam.name}, {last.path} is "
                                f"{self.family.name}")
            _check_same_tensors(ck, last)
        C = opts.copies
        self.checkpoints = checkpoints
        self.used = checkpoints[-C:]
        self.view = UpcycledView(last, opts.upcycle_options(), self.family)
        self.moe_layers = self.view.moe_layers
        if C > len(self.used) and len(self.used) < 2:
            what = f"--num-experts {opts.num_experts}" + (f" (--granularity {opts.granularity}: {C} MLPs)"
                                                           if opts.granularity > 1 else "")
            raise UserError(f"{what} needs expert expansion, which merges pairs of checkpoints: give at "
                            f"least 2 checkpoints (got 1), or use `upcycle-ds upcycle` for copies of one MLP")
        if base is not None:
            if _check_dense(base, "--base").name != self.family.name:
                raise UserError(f"--base {base.path} is {family_for(base.config)[0].name}, the checkpoints are "
                                f"{self.family.name}")
            for l in self.moe_layers:
                for p in PROJS:
                    k = self.family.dense_mlp_key(l, p)
                    if k not in base or base.shape(k) != last.shape(k):
                        got = base.shape(k) if k in base else "missing"
                        raise UserError(f"--base {base.path}: {k} is {got}, the checkpoints have {last.shape(k)}")
        self.base = base
        self.base_ckpt = base if base is not None else checkpoints[0]
        self.path = last.path
        self.config = self.view.config
        self.config["upcycle_ds"]["upit"] = {
            "checkpoints": [str(ck.path) for ck in self.used], "shared_weights": opts.shared_weights,
            "dare_p": opts.dare_p, "base": str(base.path) if base is not None else None}
        self._copied = set(last.keys())
        self._layer: int | None = None
        self._pool: list[dict[str, torch.Tensor]] = []
        self.layer_reports: dict[int, dict] = {}

    # ------------------------------------------------------------------ read interface
    def keys(self) -> list[str]:
        return self.view.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.view

    def shape(self, key: str) -> tuple[int, ...]:
        return self.view.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.view.dtype(key)

    def get(self, key: str) -> torch.Tensor:
        parsed = self.family.parse_moe_key(key)
        if parsed is not None and parsed[0] == "expert" and key not in self._copied:
            m = parsed[1]
            G = self.opts.granularity
            mlp = self.pool(m["layer"])[m["expert"] // G]
            if G > 1:
                mlp = slice_mlp(mlp, self.view.split(m["layer"]).groups[m["expert"] % G], down_scale=G)
            return mlp[m["proj"]]
        if key in self._copied and self.opts.shared_weights == "average" and self.view.dtype(key).is_floating_point:
            ts = [ck.get(key) for ck in self.used]
            return torch.stack([t.double() for t in ts]).mean(0).to(ts[-1].dtype)
        return self.view.get(key)

    # ------------------------------------------------------------------ experts
    def mlp(self, ck: HFCheckpoint, layer: int) -> dict[str, torch.Tensor]:
        return {p: ck.get(self.family.dense_mlp_key(layer, p)) for p in PROJS}

    def pool(self, layer: int) -> list[dict[str, torch.Tensor]]:
        """The C = E/G pool MLPs of one MoE layer (checkpoint MLPs, then expanded ones); one layer is cached at a
        time."""
        if self._layer != layer:
            self._pool, self._layer = [], None
            experts = [self.mlp(ck, layer) for ck in self.used]
            base = self.mlp(self.base_ckpt, layer)
            if self.opts.copies > len(experts):
                new, prov, cos = expand_pool(base, experts, self.opts.copies, seed=self.opts.seed,
                                             layer=layer, p=self.opts.dare_p)
                experts = experts + new
            else:
                prov, cos = [], delta_cosine_matrix([flat_delta(e, base) for e in experts])
            self.layer_reports[layer] = {"cosine": cos.tolist(), "expansion": prov}
            self._pool, self._layer = experts, layer
        return self._pool

    def report(self) -> dict:
        """upit_report.json: where each expert came from, and the delta cosine similarities per layer."""
        n = len(self.used)
        experts = [{"expert": i, "source": "checkpoint", "checkpoint": str(ck.path)} for i, ck in enumerate(self.used)]
        for i in range(n, self.opts.copies):
            per_layer = {}
            for l, rep in sorted(self.layer_reports.items()):
                (p,) = [x for x in rep["expansion"] if x["expert"] == i]
                per_layer[str(l)] = {k: p[k] for k in ("parents", "alpha", "parent_cosine")}
            experts.append({"expert": i, "source": "expansion", "layers": per_layer})
        return {
            "family": self.family.name,
            "moe_model_type": self.family.moe_model_type,
            "num_experts": self.opts.num_experts,
            "top_k": self.opts.top_k,
            "granularity": self.opts.granularity,
            "copies": self.opts.copies,
            "moe_layers": list(self.moe_layers),
            "checkpoints_given": [str(ck.path) for ck in self.checkpoints],
            "checkpoints_used": [str(ck.path) for ck in self.used],
            "checkpoints_dropped": [str(ck.path) for ck in self.checkpoints[:-self.opts.copies]],
            "shared_weights": self.opts.shared_weights,
            "shared_weights_from": ([str(self.used[-1].path)] if self.opts.shared_weights == "last"
                                    else [str(ck.path) for ck in self.used]),
            "delta_base": str(self.base_ckpt.path),
            "delta_base_is_first_checkpoint": self.base is None,
            "dare_p": self.opts.dare_p,
            "seed": self.opts.seed,
            "experts": experts,
            "layers": {str(l): {"cosine": rep["cosine"]} for l, rep in sorted(self.layer_reports.items())},
        }


def _check_same_tensors(ck: HFCheckpoint, ref: HFCheckpoint) -> None:
    a, b = set(ck.keys()), set(ref.keys())
    if a != b:
        k = sorted(a ^ b)[0]
        where = ck.path if k in a else ref.path
        raise UserError(f"checkpoints differ in their tensors: {k} is only in {where} (all checkpoints must be "
                        f"the same model at different training steps)")
    for k in sorted(a):
        if ck.shape(k) != ref.shape(k):
            raise UserError(f"checkpoints differ in shape: {k} is {list(ck.shape(k))} in {ck.path}, "
                            f"{list(ref.shape(k))} in {ref.path}")
        if ck.dtype(k) != ref.dtype(k):
            raise UserError(f"checkpoints differ in dtype: {k} is {ck.dtype(k)} in {ck.path}, {ref.dtype(k)} in "
                            f"{ref.path}; re-save them in one dtype")


def open_checkpoints(paths: list[str]) -> list[HFCheckpoint]:
    seen = {}
    for p in paths:
        r = Path(p).resolve()
        if r in seen:
            raise UserError(f"--checkpoints: {p} is given twice")
        seen[r] = p
    return [HFCheckpoint(p) for p in paths]


# ------------------------------------------------------------------------------------------------------- the stage
@dataclass
class AssembleResult:
    out: Path
    nbytes: int
    view: AssembledView
    base_given: bool


def run_assemble(args: AssembleConfig) -> AssembleResult:
    """Write the assembled (and expanded) HF MoE checkpoint to args.out atomically, with upit_report.json."""
    import json

    from ..io.hf import check_output_dir, write_hf_checkpoint

    inputs = (*(("--checkpoints", c) for c in args.checkpoints), ("--base", args.base))
    check_output_dir(args.out, args.overwrite, inputs=inputs)
    cks = open_checkpoints(args.checkpoints)
    base = HFCheckpoint(args.base) if args.base else None
    view = AssembledView(cks, args, base)
    nbytes = write_hf_checkpoint(view, args.out, overwrite=args.overwrite, side_dir=view.path, desc="upit-assemble",
                                 max_shard_bytes=int(args.max_shard_gb * 1024**3), inputs=inputs,
                                 extra=lambda tmp: (tmp / REPORT).write_text(json.dumps(view.report(), indent=2) + "\n"))
    return AssembleResult(out=Path(args.out), nbytes=nbytes, view=view, base_given=base is not None)
