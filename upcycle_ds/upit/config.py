"""The typed configs of the UpIT stages that have a subcommand of their own (`upit-assemble`, `seed-data`): fields,
defaults and the checks that need no model. No torch here, so `--help` and argument errors are instant; each
stage's work is in its module (`assemble`, `seed_data`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..dtypes import OLD_SPELLINGS
from ..errors import UserError
from .. import checks
from ..options import UpcycleOptions, check_shard_size


# ------------------------------------------------------------------------------------------- upit-assemble
@dataclass(kw_only=True)
class AssembleOptions:
    num_experts: int = 8
    """Experts per MoE layer (E >= 2). Experts beyond the number of checkpoints come from genetic expansion. With
    --granularity G: E = C * G, C pool MLPs (checkpoints + expansion) of G slices each."""
    top_k: int = 2
    """Experts each token is routed to (1 <= k <= E; with --granularity G a multiple of G)."""
    layers: str = "all"
    """Which layers become MoE: `all`, `every:N` (layers i with (i+1) % N == 0) or a comma list `i,j,...`."""
    shared_weights: Literal["last", "average"] = "last"
    """Non-expert weights: from the last checkpoint, or the mean over the checkpoints used as experts."""
    dare_p: float = 0.3
    """DARE drop probability of the expansion's mutation step (survivors are rescaled by 1/(1-p))."""
    capacity_factor: float | None = None
    """Expert capacity factor recorded for training (None = dropless)."""
    seed: int = 0
    """Seed for the router init and the expansion draws (each draw seeded from seed, layer, new expert index)."""
    granularity: int = 1
    """Split each checkpoint's MLP into G fine-grained experts (I/G neurons each) with virtual-group routers, as
    `upcycle --granularity` does (docs/granular.md). 1 = one expert per checkpoint MLP."""
    split: Literal["contiguous", "random", "cluster"] = "contiguous"
    """How neurons are grouped for --granularity: contiguous ranges, a seeded permutation, or balanced k-means."""

    def validate(self) -> None:
        self.upcycle_options().validate()
        checks.fraction("--dare-p", self.dare_p)

    def upcycle_options(self) -> UpcycleOptions:
        return UpcycleOptions(num_experts=self.num_experts, top_k=self.top_k, layers=self.layers,
                              capacity_factor=self.capacity_factor, seed=self.seed, granularity=self.granularity,
                              split=self.split)

    @property
    def copies(self) -> int:
        """C = E / G: pool MLPs (checkpoints + expanded) that the experts are slices of."""
        return self.num_experts // self.granularity


@dataclass(kw_only=True)
class AssembleConfig(AssembleOptions):
    checkpoints: list[str]
    """HF dense checkpoint dirs, oldest first (same model at different SFT steps); expert i = checkpoint i."""
    out: str
    """Output dir for the HF MoE checkpoint (must not exist unless --overwrite)."""
    base: str | None = None
    """The dense model before SFT: expansion deltas are taken from it (recommended). Default: the first checkpoint."""
    overwrite: bool = False
    """Replace OUT if it exists (only after the new checkpoint is complete)."""
    max_shard_gb: float = 2.0
    """Largest safetensors shard, in GiB."""

    def __post_init__(self):
        self.validate()
        check_shard_size(self.max_shard_gb)


# ----------------------------------------------------------------------------------------------- seed-data
@dataclass(kw_only=True)
class SeedDataConfig:
    experts: list[str]
    """Dense checkpoint dirs that became the experts, in expert order (for upit-assemble: the last E given)."""
    data: list[str]
    """The training set: one or more sources as for `upcycle-ds train --data` (files, globs, dirs, hub names; weights
    are ignored), read and tokenised exactly as training does."""
    out: str
    """Output dir (created; must not exist unless --overwrite): seed.jsonl (the selected samples, each with its
    expert) and seed_report.json (per-expert counts and mean NLL)."""
    moe: str | None = None
    """Assembled MoE checkpoint, needed when it has more experts than --experts (the expanded ones)."""
    fraction: float = 0.01
    """Fraction of the training set to select (UpIT: 1%)."""
    min_samples: int = 1
    """Select at least this many samples (at most the whole set)."""
    seed: int = 0
    """Seed of the random selection."""
    max_length: int | None = None
    """Truncate samples to this many tokens, as training does (None = no truncation)."""
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    """How prompt/response rows are rendered; keep training's (auto: chat template if the tokenizer has one)."""
    data_cache: str | None = None
    """Data cache root (datasets' copies of the sources); default: as for training."""
    micro_batch_size: int = field(default=8, metadata={"aliases": ["batch_size"]})
    """Samples per forward pass."""
    dtype: Literal["fp32", "bf16", "fp16", "auto"] = field(default="fp32", metadata={"value_aliases": OLD_SPELLINGS})
    """Precision the expert models are scored in (auto: bf16 on a GPU, fp32 on a CPU)."""
    device: str = "auto"
    """torch device for scoring; auto = cuda if available, else cpu."""
    overwrite: bool = False
    """Replace OUT if it exists (only after the new seed data is complete)."""
