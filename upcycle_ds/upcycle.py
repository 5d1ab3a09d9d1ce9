"""Sparse upcycling math: a dense checkpoint seen as an HF MoE checkpoint (no I/O of its own).

`UpcycledView` has the same read interface as `io.hf.HFCheckpoint` (config, keys, shape, dtype, get), computing expert
tensors on demand from the dense MLP: copies (Komatsuzaki et al.), or with `granularity` G > 1 fine-grained experts,
each one slice of I/G neurons of the dense MLP with virtual-group routers (`granular`, docs/granular.md), optionally
with a shared expert carved out of the dense neurons (Qwen2-MoE); optional Gaussian noise and Drop-Upcycling partial
re-initialisation (Nakamura et al.) per expert. Every random draw is seeded from (seed, layer, expert, what), so a
tensor is the same whichever rank or process computes it, and in whatever order.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields

import torch

from .errors import UserError
from .families import Family, MoESpec, family_for
from .granular import SHARED_GATE_INIT, NeuronSplit, slice_mlp, split_neurons, split_sizes
from .options import UpcycleOptions, check_shared_target, parse_layers  # noqa: F401  (re-exported)
from .io.source import PlannedSource

PROJS = ("gate", "up", "down")


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (same on every machine and Python run)."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def make_expert(dense: dict[str, torch.Tensor], *, layer: int, expert: int, opts: UpcycleOptions
                ) -> dict[str, torch.Tensor]:
    """One expert's {gate, up, down} from the dense MLP: copy, then Drop-Upcycling re-init, then noise."""
    if opts.reinit_ratio == 0 and opts.noise_std == 0:
        return {p: dense[p].clone() for p in PROJS}
    out = {p: dense[p].float().clone() for p in PROJS}
    g = torch.Generator().manual_seed(derive_seed(opts.seed, "reinit", layer, expert))
    inter = out["gate"].shape[0]
    n_drop = int(round(opts.reinit_ratio * inter))
    if n_drop:
        idx = torch.randperm(inter, generator=g)[:n_drop]
        for p in ("gate", "up"):  # rows = intermediate neurons
            sl = out[p][idx]
            out[p][idx] = torch.randn(sl.shape, generator=g) * sl.std() + sl.mean()
        sl = out["down"][:, idx]  # columns = intermediate neurons
        out["down"][:, idx] = torch.randn(sl.shape, generator=g) * sl.std() + sl.mean()
    if opts.noise_std:
        gn = torch.Generator().manual_seed(derive_seed(opts.seed, "noise", layer, expert))
        for p in PROJS:
            out[p] += torch.randn(out[p].shape, generator=gn) * opts.noise_std
    return {p: out[p].to(dense[p].dtype) for p in PROJS}


def make_router(*, hidden: int, num_experts: int, layer: int, std: float, seed: int, dtype: torch.dtype,
                granularity: int = 1, noise: float = 0.0) -> torch.Tensor:
    """Router weight (E, hidden): C = E/G random rows N(0, std), each repeated for the G experts of its copy
    (virtual groups; G = 1: E random rows), plus N(0, noise) on every row when `noise` > 0."""
    g = torch.Generator().manual_seed(derive_seed(seed, "router", layer))
    w = torch.randn(num_experts // granularity, hidden, generator=g) * std
    w = w.repeat_interleave(granularity, dim=0)
    if noise:
        gn = torch.Generator().manual_seed(derive_seed(seed, "router-noise", layer))
        w = w + torch.randn(w.shape, generator=gn) * noise
    return w.to(dtype)


class UpcycledView(PlannedSource):
    """An HF dense checkpoint presented as its upcycled HF MoE checkpoint (hub per-expert layout), lazily.

    Expert e of a layer is copy c = e // G of neuron group g = e % G (G = 1: the whole MLP), `down` scaled by G, then
    Drop-Upcycling re-init and noise (`make_expert`, seeded per expert); the shared expert (Qwen2-MoE) holds the
    neurons `split` leaves to it with `down` scaled by 1 / sigmoid(0) = 2, and a zero gate."""

    def __init__(self, dense, opts: UpcycleOptions, family: Family | None = None):
        opts.validate()
        self.dense, self.opts = dense, opts
        fam, is_moe = family_for(dense.config)
        if is_moe:
            raise UserError(f"{dense.path} is already an MoE checkpoint ({dense.config.get('model_type')}); "
                            f"upcycling needs a dense one")
        self.family = family or fam
        n_layers = int(dense.config["num_hidden_layers"])
        self.moe_layers = parse_layers(opts.layers, n_layers)
        check_shared_target(self.family, opts)
        self.dense_intermediate = int(dense.config["intermediate_size"])
        self.expert_intermediate, self.shared_intermediate = split_sizes(
            self.dense_intermediate, opts.granularity, opts.shared_fraction)
        spec = MoESpec(num_experts=opts.num_experts, top_k=opts.top_k, moe_layers=self.moe_layers,
                       expert_intermediate=self.expert_intermediate, shared_intermediate=self.shared_intermediate)
        self.config = self.family.moe_config(dense.config, spec)
        # only the upcycling options (not a CLI subclass's paths/flags): same options -> identical config.json
        self.config["upcycle_ds"] = {"upcycled_from": self.family.dense_model_type,
                                     **{f.name: getattr(opts, f.name) for f in fields(UpcycleOptions)},
                                     "dense_intermediate_size": self.dense_intermediate}
        self.path = dense.path
        self._plan: dict[str, tuple[torch.dtype, tuple[int, ...], tuple]] = {}
        self._build_plan()
        self._cache_key = None
        self._cache: dict[str, torch.Tensor] = {}
        self._dense_key = None  # the dense MLP (and its neuron split) of one layer, read once for all its experts
        self._dense_cache: dict[str, torch.Tensor] = {}
        self._split: NeuronSplit | None = None
        self._slices: dict[int, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ plan
    def _build_plan(self) -> None:
        fam, d, E = self.family, self.dense, self.opts.num_experts
        moe = set(self.moe_layers)
        dense_mlp = {fam.dense_mlp_key(l, p): (l, p) for l in moe for p in PROJS}
        for key in d.keys():
            if key not in dense_mlp:
                self._plan[key] = (d.dtype(key), d.shape(key), ("copy", key))
        i_e, i_s = self.expert_intermediate, self.shared_intermediate
        for l in self.moe_layers:
            keys = {p: fam.dense_mlp_key(l, p) for p in PROJS}
            for k in keys.values():
                if k not in d:
                    raise UserError(f"{d.path}: tensor {k} is missing (layer {l} has no dense MLP)")
            inter, hidden = d.shape(keys["gate"])
            if inter != self.dense_intermediate:
                raise UserError(f"{d.path}: {keys['gate']} has {inter} rows; config.json says intermediate_size "
                                f"{self.dense_intermediate}")
            dtype = d.dtype(keys["gate"])
            self._plan[fam.router_key(l)] = (dtype, (E, hidden), ("router", l))
            shapes = {"gate": (i_e, hidden), "up": (i_e, hidden), "down": (hidden, i_e)}
            for e in range(E):
                for p in PROJS:
                    self._plan[fam.expert_key(l, e, p)] = (dtype, shapes[p], ("expert", l, e, p))
            for ours in fam.moe_shared:  # Qwen2-MoE: the shared expert (empty unless --shared-fraction) + its gate
                shape, how = {"shared_mlp.gate_proj.weight": ((i_s, hidden), ("shared", l, "gate")),
                              "shared_mlp.up_proj.weight": ((i_s, hidden), ("shared", l, "up")),
                              "shared_mlp.down_proj.weight": ((hidden, i_s), ("shared", l, "down")),
                              "shared_mlp_gate.weight": ((1, hidden), ("zeros",))}[ours]
                self._plan[fam.shared_key(l, ours)] = (dtype, shape, how if i_s else ("zeros",))

    # ------------------------------------------------------------------ tensors
    def dense_mlp(self, layer: int) -> dict[str, torch.Tensor]:
        if self._dense_key != layer:
            self._dense_cache, self._split, self._slices = {}, None, {}  # drop the previous layer's first
            self._dense_cache = {p: self.dense.get(self.family.dense_mlp_key(layer, p)) for p in PROJS}
            self._dense_key = layer
        return self._dense_cache

    def split(self, layer: int) -> NeuronSplit:
        """Which neurons of `layer`'s dense MLP each group and the shared expert take (seeded per layer)."""
        mlp = self.dense_mlp(layer)
        if self._split is None:
            g = torch.Generator().manual_seed(derive_seed(self.opts.seed, "split", layer))
            self._split = split_neurons(mlp["gate"], mlp["up"], granularity=self.opts.granularity,
                                        shared_fraction=self.opts.shared_fraction, method=self.opts.split,
                                        generator=g)
        return self._split

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        if self._cache_key != (layer, expert):
            self._cache = {}
            if self.opts.is_granular:
                mlp = self.group_slice(layer, expert % self.opts.granularity)
                if self.opts.reinit_ratio or self.opts.noise_std:  # new tensors; the slice stays as it is
                    mlp = make_expert(mlp, layer=layer, expert=expert, opts=self.opts)
                self._cache = mlp
            else:
                self._cache = make_expert(self.dense_mlp(layer), layer=layer, expert=expert, opts=self.opts)
            self._cache_key = (layer, expert)
        return self._cache

    def group_slice(self, layer: int, group: int) -> dict[str, torch.Tensor]:
        """Neuron group `group` of `layer`'s dense MLP with `down` x G: what every copy of that group starts as.
        Computed once per layer and group (the copies share it; callers must not modify it)."""
        mlp = self.dense_mlp(layer)
        if group not in self._slices:
            self._slices[group] = slice_mlp(mlp, self.split(layer).groups[group], down_scale=self.opts.granularity)
        return self._slices[group]

    def shared_expert(self, layer: int) -> dict[str, torch.Tensor]:
        return slice_mlp(self.dense_mlp(layer), self.split(layer).shared, down_scale=1 / SHARED_GATE_INIT)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._plan:
            raise UserError(f"tensor {key} is not part of the upcycled model")
        dtype, shape, how = self._plan[key]
        if how[0] == "copy":
            return self.dense.get(how[1])
        if how[0] == "router":
            std = float(self.dense.config.get("initializer_range", 0.02))
            return make_router(hidden=shape[1], num_experts=shape[0], layer=how[1], std=std,
                               seed=self.opts.seed, dtype=dtype, granularity=self.opts.granularity,
                               noise=self.opts.router_noise)
        if how[0] == "expert":
            return self.expert(how[1], how[2])[how[3]]
        if how[0] == "shared":
            return self.shared_expert(how[1])[how[2]]
        return torch.zeros(shape, dtype=dtype)
