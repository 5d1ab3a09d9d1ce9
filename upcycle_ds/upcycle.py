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
import math
from dataclasses import dataclass, fields
from typing import Literal

import torch

from .errors import UserError
from .families import Family, MoESpec, family_for
from .granular import SHARED_GATE_INIT, SPLITS, NeuronSplit, slice_mlp, split_neurons, split_sizes
from .io.source import PlannedSource

PROJS = ("gate", "up", "down")


@dataclass(kw_only=True)
class UpcycleOptions:
    num_experts: int = 8
    """Experts per MoE layer (E >= 2). With --granularity G: E = C * G, C copies of the G slices."""
    top_k: int = 2
    """Experts each token is routed to (1 <= k <= E). With --granularity G: a multiple of G (k/G copies per token)."""
    layers: str = "all"
    """Which layers become MoE: `all`, `every:N` (layers i with (i+1) % N == 0, as Qwen's decoder_sparse_step) or
    a comma list of 0-based indices `i,j,...`."""
    capacity_factor: float | None = None
    """Expert capacity factor used in training (tokens over capacity are dropped); None = dropless (default)."""
    noise_std: float = 0.0
    """Std of Gaussian noise added to every expert weight (breaks exact equivalence by design)."""
    reinit_ratio: float = 0.0
    """Drop-Upcycling: fraction of each expert's intermediate neurons re-drawn from N(mean, std) of the original
    slice, a different random subset per expert (0 = pure copies; the paper's default is 0.5)."""
    seed: int = 0
    """Seed for router init, noise and re-initialisation."""
    granularity: int = 1
    """Granular upcycling: split each dense MLP's intermediate neurons into G groups, one fine-grained expert (I/G
    neurons, `down` x G) per group and copy, with the G experts of a copy sharing one router row (virtual groups), so
    the MoE still computes exactly the dense model (docs/granular.md). 1 = whole-MLP copies."""
    split: Literal["contiguous", "random", "cluster"] = "contiguous"
    """How neurons are grouped for --granularity / --shared-fraction: contiguous ranges, a seeded random permutation,
    or balanced k-means on the neurons' gate/up weights."""
    shared_fraction: float = 0.0
    """Fraction of the dense neurons carved into the shared expert (Qwen2-MoE targets only; its sigmoid gate starts
    at 0, so its `down` is doubled); the rest is routed. 0 = an empty shared expert."""
    router_noise: float = 0.0
    """Std of Gaussian noise added to every router row, so that the experts of a virtual group (or copies) diverge
    once training starts; breaks exact equivalence by design."""

    def validate(self) -> None:
        for name in ("capacity_factor", "noise_std", "reinit_ratio"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number (got {v})")
        if self.num_experts < 2:
            raise UserError(f"--num-experts must be >= 2 (got {self.num_experts})")
        if not 1 <= self.top_k <= self.num_experts:
            raise UserError(f"--top-k must be between 1 and --num-experts={self.num_experts} (got {self.top_k})")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise UserError(f"--capacity-factor must be > 0 (got {self.capacity_factor})")
        if self.noise_std < 0:
            raise UserError(f"--noise-std must be >= 0 (got {self.noise_std})")
        if not 0 <= self.reinit_ratio <= 1:
            raise UserError(f"--reinit-ratio must be in [0, 1] (got {self.reinit_ratio})")
        self.validate_granular()

    def validate_granular(self) -> None:
        """Checks of the granular-upcycling options that need no model (the model-dependent ones are in
        `UpcycledView`): integers in range, finite floats, E and k multiples of G."""
        G, E, k = self.granularity, self.num_experts, self.top_k
        if isinstance(G, bool) or not isinstance(G, int) or G < 1:
            raise UserError(f"--granularity must be an integer >= 1 (got {G!r})")
        if self.split not in SPLITS:
            raise UserError(f"--split must be one of {', '.join(SPLITS)} (got {self.split!r})")
        if not (isinstance(self.shared_fraction, (int, float)) and math.isfinite(self.shared_fraction)
                and 0 <= self.shared_fraction < 1):
            raise UserError(f"--shared-fraction must be in [0, 1) (got {self.shared_fraction})")
        if not (isinstance(self.router_noise, (int, float)) and math.isfinite(self.router_noise)
                and self.router_noise >= 0):
            raise UserError(f"--router-noise must be a finite number >= 0 (got {self.router_noise})")
        if E % G:
            valid = ", ".join(str(G * c) for c in range(1, 5))
            raise UserError(f"--num-experts {E} is not a multiple of --granularity {G} (E = copies x G); valid: "
                            f"{valid}, ...")
        if k % G:
            valid = ", ".join(str(G * c) for c in range(1, E // G + 1))
            raise UserError(f"--top-k {k} is not a multiple of --granularity {G}: the {G} slices of a copy must be "
                            f"selected together for the MoE to equal the dense model; valid --top-k: {valid}")

    @property
    def copies(self) -> int:
        """C = E / G: how many copies of the dense MLP the experts hold."""
        return self.num_experts // self.granularity

    @property
    def is_granular(self) -> bool:
        """Whether experts are slices of the dense MLP (G > 1 or a shared expert) rather than whole copies."""
        return self.granularity > 1 or self.shared_fraction > 0


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """`all` | `every:N` | `i,j,...` -> sorted layer indices; a clear error naming the flag otherwise."""
    s = str(spec).strip()
    if s == "all":
        return tuple(range(num_layers))
    if s.startswith("every:"):
        try:
            n = int(s.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise UserError(f"--layers {spec!r}: every:N needs a positive integer N")
        layers = tuple(i for i in range(num_layers) if (i + 1) % n == 0)
    else:
        try:
            layers = tuple(sorted({int(x) for x in s.split(",") if x.strip() != ""}))
        except ValueError:
            raise UserError(f"--layers {spec!r}: expected all, every:N or a comma list of layer indices") from None
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise UserError(f"--layers {spec!r}: layer {bad[0]} out of range (model has {num_layers} layers)")
    if not layers:
        raise UserError(f"--layers {spec!r} selects no layer")
    return layers


def check_shared_target(family: Family, opts: UpcycleOptions) -> None:
    """--shared-fraction needs an export target that has a shared expert (Qwen2-MoE)."""
    if opts.shared_fraction > 0 and not family.has_shared_expert:
        raise UserError(f"--shared-fraction needs an export target with a shared expert: Qwen2-MoE (upcycle a Qwen2 "
                        f"model); {family.name} -> {family.moe_model_type} has none")


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
