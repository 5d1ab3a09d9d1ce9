"""Sparse upcycling math: a dense checkpoint seen as an HF MoE checkpoint (no I/O of its own).

`UpcycledView` has the same read interface as `io.hf.HFCheckpoint` (config, keys, shape, dtype, get), computing expert
tensors on demand from the dense MLP: copies (Komatsuzaki et al.), optional Gaussian noise, optional Drop-Upcycling
partial re-initialisation (Nakamura et al.). Every random draw is seeded from (seed, layer, expert, what), so a
tensor is the same whichever rank or process computes it, and in whatever order.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields

import torch

from .errors import UserError
from .families import Family, MoESpec, family_for
from .io.source import PlannedSource

PROJS = ("gate", "up", "down")


@dataclass(kw_only=True)
class UpcycleOptions:
    num_experts: int = 8
    """Experts per MoE layer (E >= 2)."""
    top_k: int = 2
    """Experts each token is routed to (1 <= k <= E)."""
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


def make_router(*, hidden: int, num_experts: int, layer: int, std: float, seed: int, dtype: torch.dtype
                ) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed(seed, "router", layer))
    return (torch.randn(num_experts, hidden, generator=g) * std).to(dtype)


class UpcycledView(PlannedSource):
    """An HF dense checkpoint presented as its upcycled HF MoE checkpoint (hub per-expert layout), lazily."""

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
        spec = MoESpec(num_experts=opts.num_experts, top_k=opts.top_k, moe_layers=self.moe_layers)
        self.config = self.family.moe_config(dense.config, spec)
        # only the upcycling options (not a CLI subclass's paths/flags): same options -> identical config.json
        self.config["upcycle_ds"] = {"upcycled_from": self.family.dense_model_type,
                                     **{f.name: getattr(opts, f.name) for f in fields(UpcycleOptions)}}
        self.path = dense.path
        self._plan: dict[str, tuple[torch.dtype, tuple[int, ...], tuple]] = {}
        self._build_plan()
        self._cache_key = None
        self._cache: dict[str, torch.Tensor] = {}
        self._dense_key = None  # the dense MLP of one layer, read once for all its experts
        self._dense_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ plan
    def _build_plan(self) -> None:
        fam, d, E = self.family, self.dense, self.opts.num_experts
        moe = set(self.moe_layers)
        dense_mlp = {fam.dense_mlp_key(l, p): (l, p) for l in moe for p in PROJS}
        for key in d.keys():
            if key not in dense_mlp:
                self._plan[key] = (d.dtype(key), d.shape(key), ("copy", key))
        for l in self.moe_layers:
            keys = {p: fam.dense_mlp_key(l, p) for p in PROJS}
            for k in keys.values():
                if k not in d:
                    raise UserError(f"{d.path}: tensor {k} is missing (layer {l} has no dense MLP)")
            hidden = d.shape(keys["gate"])[1]
            dtype = d.dtype(keys["gate"])
            self._plan[fam.router_key(l)] = (dtype, (E, hidden), ("router", l))
            for e in range(E):
                for p in PROJS:
                    self._plan[fam.expert_key(l, e, p)] = (dtype, d.shape(keys[p]), ("expert", l, e, p))
            for ours, tmpl in fam.moe_shared.items():  # Qwen2-MoE: an empty (exactly zero) shared expert
                shape = {"shared_mlp.gate_proj.weight": (0, hidden), "shared_mlp.up_proj.weight": (0, hidden),
                         "shared_mlp.down_proj.weight": (hidden, 0), "shared_mlp_gate.weight": (1, hidden)}[ours]
                self._plan[tmpl.format(layer=l)] = (dtype, shape, ("zeros",))

    # ------------------------------------------------------------------ tensors
    def dense_mlp(self, layer: int) -> dict[str, torch.Tensor]:
        if self._dense_key != layer:
            self._dense_cache = {}  # drop the previous layer's before reading the next
            self._dense_cache = {p: self.dense.get(self.family.dense_mlp_key(layer, p)) for p in PROJS}
            self._dense_key = layer
        return self._dense_cache

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        if self._cache_key != (layer, expert):
            self._cache = make_expert(self.dense_mlp(layer), layer=layer, expert=expert, opts=self.opts)
            self._cache_key = (layer, expert)
        return self._cache

    def get(self, key: str) -> torch.Tensor:
        if key not in self._plan:
            raise UserError(f"tensor {key} is not part of the upcycled model")
        dtype, shape, how = self._plan[key]
        if how[0] == "copy":
            return self.dense.get(how[1])
        if how[0] == "router":
            std = float(self.dense.config.get("initializer_range", 0.02))
            return make_router(hidden=shape[1], num_experts=shape[0], layer=how[1], std=std,
                               seed=self.opts.seed, dtype=dtype)
        if how[0] == "expert":
            return self.expert(how[1], how[2])[how[3]]
        return torch.zeros(shape, dtype=dtype)
