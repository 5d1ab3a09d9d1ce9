"""The options of upcycling and of merging back, as typed dataclasses with their checks, and the size arithmetic of
granular upcycling: everything `upcycle`, `convert`, `plan` and `upit-assemble` parse and validate before any tensor
exists. No torch here, so that every subcommand's `--help` and argument errors are instant; the tensor work is in
`upcycle` (UpcycledView), `granular` (neuron splits) and `merge` (MergedView).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .errors import UserError
from . import checks

if TYPE_CHECKING:
    from .families import Family

# ------------------------------------------------------------------------------- granular upcycling: sizes
SPLITS = ("contiguous", "random", "cluster")
ALIGN = 8
"""Expert intermediate sizes that grouped-GEMM kernels take in bf16: torch's grouped_mm (transformers' default MoE
experts, `experts_implementation="grouped_mm"`) needs 16-byte aligned rows, i.e. a multiple of 8 bf16 / 4 fp32
elements."""


def valid_granularities(intermediate: int, limit: int = 64, align: int = 1) -> list[int]:
    """G up to `limit` that split `intermediate` neurons into equal groups of a multiple of `align` neurons."""
    return [g for g in range(1, min(intermediate, limit) + 1) if intermediate % (g * align) == 0]


def split_sizes(intermediate: int, granularity: int, shared_fraction: float) -> tuple[int, int]:
    """(routed expert intermediate size, shared expert intermediate size) for a dense MLP of `intermediate` neurons.

    The shared expert gets round(F * I) neurons, plus the fewest more (< ALIGN * G) that leave every routed expert a
    multiple of ALIGN neurons (or, when fewer than ALIGN * G neurons are left to route, a routed remainder divisible
    by G). Without a shared expert (F = 0) G must divide I."""
    I, G = intermediate, granularity
    if shared_fraction == 0:
        if I % G:
            valid = ", ".join(map(str, valid_granularities(I)))
            raise UserError(f"--granularity {G} does not divide the dense intermediate size {I}; valid: {valid}")
        return I // G, 0
    n_routed = I - int(round(shared_fraction * I))
    n_routed -= n_routed % (ALIGN * G if n_routed >= ALIGN * G else G)
    if n_routed <= 0:
        raise UserError(f"--shared-fraction {shared_fraction} leaves no neuron to route (intermediate size {I}, "
                        f"--granularity {G})")
    return n_routed // G, I - n_routed


# ------------------------------------------------------------------------------------------------- upcycling
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
                checks.finite(f"--{name.replace('_', '-')}", v)
        checks.at_least("--num-experts", self.num_experts, 2)
        if not 1 <= self.top_k <= self.num_experts:
            raise UserError(f"--top-k must be between 1 and --num-experts={self.num_experts} (got {self.top_k})")
        if self.capacity_factor is not None:
            checks.positive("--capacity-factor", self.capacity_factor)
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
        checks.one_of("--split", self.split, SPLITS)
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


def check_shared_target(family: "Family", opts: UpcycleOptions) -> None:
    """--shared-fraction needs an export target that has a shared expert (Qwen2-MoE)."""
    if opts.shared_fraction > 0 and not family.has_shared_expert:
        raise UserError(f"--shared-fraction needs an export target with a shared expert: Qwen2-MoE (upcycle a Qwen2 "
                        f"model); {family.name} -> {family.moe_model_type} has none")


# ---------------------------------------------------------------------------------------------- merging back
MERGES = ("average", "router-weighted")


@dataclass(kw_only=True)
class MergeOptions:
    merge: Literal["average", "router-weighted"] = "average"
    """--to hf-dense: how experts become one MLP: `average` (mean of the experts; for granular upcycling the
    concatenation of the slices: the exact inverse of upcycling) or `router-weighted` (weights = each expert's
    routing frequency on --calib-data)."""
    merge_granularity: int | None = None
    """--to hf-dense: G of a granular MoE (experts c*G+g are slices of one MLP); default: from config.json's
    upcycle_ds record (1 when absent)."""
    calib_data: str | None = None
    """--to hf-dense: calibration data (the formats of `train --data`) for --merge router-weighted; with any merge it
    also reports the calibration loss of the MoE and of the merged dense model."""
    calib_max_rows: int = field(default=256, metadata={"aliases": ["calib_samples"]})
    """Calibration rows used (the first N after a seeded shuffle)."""
    calib_max_length: int = 512
    """Calibration samples are truncated to this many tokens."""
    calib_baseline: str | None = None
    """A dense HF checkpoint (e.g. the model before upcycling) whose calibration loss is reported next to the MoE's
    and the merged model's."""
    calib_device: str | None = None
    """Device for the calibration passes (default: cuda if available, else cpu)."""
    calib_dtype: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """Precision of the calibration passes (auto: bf16 on a GPU, fp32 on a CPU)."""

    def validate_merge(self, *, to: str, expert: int | None) -> None:
        if self.merge not in MERGES:
            raise UserError(f"--merge must be one of {', '.join(MERGES)} (got {self.merge!r})")
        given = [f for f, v in (("--merge-granularity", self.merge_granularity), ("--calib-data", self.calib_data),
                                ("--calib-baseline", self.calib_baseline)) if v is not None]
        if to != "hf-dense" and (given or self.merge != "average"):
            raise UserError(f"{(given or ['--merge'])[0]} applies to --to hf-dense only")
        if self.merge_granularity is not None and self.merge_granularity < 1:
            raise UserError(f"--merge-granularity must be >= 1 (got {self.merge_granularity})")
        if self.merge == "router-weighted" and self.calib_data is None:
            raise UserError("--merge router-weighted needs --calib-data (the routing frequencies are measured on it)")
        if self.merge == "router-weighted" and expert is not None:
            raise UserError("--expert takes one expert as it is; it does not combine with --merge router-weighted")
        if self.calib_baseline is not None and self.calib_data is None:
            raise UserError("--calib-baseline needs --calib-data")
        if self.calib_max_rows < 1 or self.calib_max_length < 2:
            raise UserError(f"--calib-max-rows must be >= 1 and --calib-max-length >= 2 (got {self.calib_max_rows}, "
                            f"{self.calib_max_length})")
        if self.calib_device is not None:
            import torch

            try:
                dev = torch.device(self.calib_device)
            except RuntimeError:
                raise UserError(f"--calib-device {self.calib_device!r} is not a torch device (cpu, cuda, cuda:1, "
                                f"...)") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise UserError(f"--calib-device {self.calib_device}: no CUDA device here")


def granularity_of(config: dict, override: int | None = None) -> int:
    """G of an MoE checkpoint: experts c*G+g are slices g of copy c (`override` if given, else config.json's
    upcycle_ds record as written by upcycle and upit-assemble; 1 when absent)."""
    if override is not None:
        return int(override)
    record = config.get("upcycle_ds")
    g = record.get("granularity", 1) if isinstance(record, dict) else 1
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        raise UserError(f"config.json: upcycle_ds.granularity must be an integer >= 1 (got {g!r})")
    return g


def check_shard_size(gb: float) -> None:
    """--max-shard-gb: a positive, finite number of GiB."""
    checks.positive("--max-shard-gb", gb)
