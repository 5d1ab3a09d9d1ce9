"""What a model family knows: its HF dense weight names, its HF MoE export target and the names there.

Templates use `{layer}` and `{expert}`. Non-MLP weights (embeddings, attention, norms, lm_head) have the same names
in the dense model and its MoE export for every family we support, so only the MLP / MoE names live here.

In-memory names of our DeepSpeed model (`upcycle_ds.moe.layer.UpcycledMoE` at `model.layers.{layer}.mlp`):
    router   model.layers.{layer}.mlp.deepspeed_moe.gate.weight
    experts  model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.{local}.{gate,up,down}_proj.weight
    shared   model.layers.{layer}.mlp.shared_mlp.{gate,up,down}_proj.weight, model.layers.{layer}.mlp.shared_mlp_gate.weight
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UserError

PROJS = ("gate", "up", "down")

# our in-memory (DeepSpeed model) names inside one MoE block, relative to `model.layers.{layer}.mlp.`
DS_ROUTER = "deepspeed_moe.gate.weight"
DS_EXPERT = "deepspeed_moe.experts.deepspeed_experts.{expert}.{proj}_proj.weight"
DS_BLOCK = "model.layers.{layer}.mlp"


@dataclass(frozen=True, kw_only=True)
class MoESpec:
    """How to turn a dense config into an MoE config (the shape-level choices, not weight inits)."""

    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    expert_intermediate: int | None = None
    """Intermediate size of one routed expert; None = the dense `intermediate_size` (copy upcycling). Granular
    upcycling (docs/granular.md) makes it dense_intermediate / G."""
    shared_intermediate: int = 0
    """Intermediate size of the shared expert (families that have one: Qwen2-MoE); 0 = an empty shared expert."""


@dataclass(frozen=True, kw_only=True)
class Family:
    """One model family: dense HF names and the HF MoE export target with its names."""

    name: str
    dense_model_type: str
    dense_architecture: str
    moe_model_type: str
    moe_architecture: str
    dense_mlp: dict[str, str]
    """proj -> dense key template, e.g. {"gate": "model.layers.{layer}.mlp.gate_proj.weight", ...}"""
    moe_router: str
    """HF MoE (hub layout) router key template."""
    moe_expert: dict[str, str]
    """proj -> HF MoE hub per-expert key template (with `{expert}`)."""
    moe_fused: dict[str, str] = field(default_factory=lambda: {
        "gate_up": "model.layers.{layer}.mlp.experts.gate_up_proj",
        "down": "model.layers.{layer}.mlp.experts.down_proj",
    })
    """transformers-5 fused in-memory layout; we read it if a checkpoint was saved that way, never write it."""
    moe_shared: dict[str, str] = field(default_factory=dict)
    """our name (relative to the MoE block) -> HF key template, for families with a shared expert (Qwen2-MoE)."""
    partial_layers: bool = False
    """Whether the export format can mix dense and MoE layers (Qwen2/3-MoE `mlp_only_layers`)."""
    unsupported: dict[str, Any] = field(default_factory=dict)
    """dense config fields the MoE export cannot express unless they have this value."""
    moe_config_fields: Callable[[dict, MoESpec], dict] | None = None
    """family-specific MoE config fields (experts count name, intermediate sizes, sparse layers)."""
    dense_config_fields: Callable[[dict], dict] | None = None
    """reverse: family-specific fields to restore when collapsing an MoE back to dense."""
    num_experts_key: str = "num_local_experts"

    # ---------------------------------------------------------------- names
    def dense_mlp_key(self, layer: int, proj: str) -> str:
        return self.dense_mlp[proj].format(layer=layer)

    def expert_key(self, layer: int, expert: int, proj: str) -> str:
        return self.moe_expert[proj].format(layer=layer, expert=expert)

    def router_key(self, layer: int) -> str:
        return self.moe_router.format(layer=layer)

    @property
    def has_shared_expert(self) -> bool:
        """Whether the MoE export target has a shared expert (Qwen2-MoE: one, behind a sigmoid gate)."""
        return bool(self.moe_shared)

    def shared_key(self, layer: int, ours: str) -> str:
        """HF key of a shared-expert tensor; `ours` is e.g. `shared_mlp.down_proj.weight` or `shared_mlp_gate.weight`."""
        return self.moe_shared[ours].format(layer=layer)

    def is_dense_mlp_key(self, key: str) -> bool:
        return _match_any(key, self.dense_mlp.values()) is not None

    def parse_moe_key(self, key: str) -> tuple[str, dict[str, int]] | None:
        """('expert', {layer, expert, proj-index}) / ('router', {layer}) / ('shared', ...) / ('fused', ...) or None."""
        for proj, tmpl in self.moe_expert.items():
            m = _match(tmpl, key)
            if m is not None:
                return "expert", {**m, "proj": proj}
        m = _match(self.moe_router, key)
        if m is not None:
            return "router", m
        for ours, tmpl in self.moe_shared.items():
            m = _match(tmpl, key)
            if m is not None:
                return "shared", {**m, "ours": ours}
        for part, tmpl in self.moe_fused.items():
            m = _match(tmpl, key)
            if m is not None:
                return "fused", {**m, "part": part}
        return None

    # ---------------------------------------------------------------- configs
    def check_dense_config(self, cfg: dict) -> None:
        for key, want in self.unsupported.items():
            if cfg.get(key, want) != want:
                raise UserError(
                    f"{self.name} model with {key}={cfg.get(key)!r} cannot be exported as {self.moe_model_type} "
                    f"(it needs {key}={want!r})")
        if cfg.get("mlp_bias"):
            raise UserError(f"{self.name} model with mlp_bias=True is not supported (MoE experts have no bias)")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UserError(f"hidden_act={act!r} is not supported; the {self.moe_model_type} experts use silu")

    def moe_config(self, dense_cfg: dict, spec: MoESpec) -> dict:
        """HF MoE config.json content for the upcycled model of `dense_cfg`."""
        self.check_dense_config(dense_cfg)
        n_layers = dense_cfg["num_hidden_layers"]
        if not self.partial_layers and tuple(spec.moe_layers) != tuple(range(n_layers)):
            raise UserError(
                f"{self.moe_model_type} needs every layer to be MoE (got layers {list(spec.moe_layers)}); "
                f"use --layers all, or a Qwen2/Qwen3 model whose MoE format allows dense layers")
        cfg = {k: v for k, v in dense_cfg.items() if k not in _DROP_KEYS}
        cfg.update(model_type=self.moe_model_type, architectures=[self.moe_architecture],
                   num_experts_per_tok=spec.top_k, output_router_logits=False)
        cfg[self.num_experts_key] = spec.num_experts
        if self.moe_config_fields is not None:
            cfg.update(self.moe_config_fields(dense_cfg, spec))
        return cfg

    def hf_key_for_ds_param(self, name: str, expert_offset: int = 0) -> str:
        """HF MoE (hub layout) key of a parameter of our DeepSpeed model; `expert_offset` = this rank's first global
        expert id (ep_rank * num_local_experts). Non-MoE parameters keep their HF names."""
        m = _match(DS_BLOCK + "." + DS_ROUTER, name)
        if m is not None:
            return self.router_key(m["layer"])
        for proj in PROJS:
            m = _match(DS_BLOCK + "." + DS_EXPERT.replace("{proj}", proj), name)
            if m is not None:
                return self.expert_key(m["layer"], expert_offset + m["expert"], proj)
        for ours, tmpl in self.moe_shared.items():
            m = _match(DS_BLOCK + "." + ours, name)
            if m is not None:
                return tmpl.format(layer=m["layer"])
        return name

    def dense_config(self, moe_cfg: dict) -> dict:
        """HF dense config.json content for the MoE model collapsed back to one MLP per layer."""
        cfg = {k: v for k, v in moe_cfg.items() if k not in _DROP_KEYS and k not in _MOE_KEYS}
        cfg.update(model_type=self.dense_model_type, architectures=[self.dense_architecture])
        if self.dense_config_fields is not None:
            cfg.update(self.dense_config_fields(moe_cfg))
        return cfg

    def moe_layers(self, moe_cfg: dict) -> list[int]:
        n = moe_cfg["num_hidden_layers"]
        if not self.partial_layers:
            return list(range(n))
        skip = set(moe_cfg.get("mlp_only_layers") or [])
        step = moe_cfg.get("decoder_sparse_step", 1) or 1
        return [i for i in range(n) if i not in skip and (i + 1) % step == 0]

    def num_experts(self, moe_cfg: dict) -> int:
        for key in (self.num_experts_key, "num_experts", "num_local_experts"):
            if moe_cfg.get(key):
                return int(moe_cfg[key])
        raise UserError(f"{self.moe_model_type} config has no number of experts ({self.num_experts_key})")

    def normalize_topk(self, moe_cfg: dict) -> bool:
        return bool(moe_cfg.get("norm_topk_prob", True))

    def expert_intermediate_size(self, moe_cfg: dict) -> int:
        return int(moe_cfg.get("moe_intermediate_size", moe_cfg["intermediate_size"]))


_DROP_KEYS = {"transformers_version", "_name_or_path", "architectures", "model_type", "auto_map",
              "torch_dtype", "pretraining_tp", "mlp_bias"}
_MOE_KEYS = {"num_local_experts", "num_experts", "num_experts_per_tok", "output_router_logits", "router_aux_loss_coef",
             "router_jitter_noise", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
             "decoder_sparse_step", "mlp_only_layers", "qkv_bias"}

_TEMPLATE_CACHE: dict[str, re.Pattern] = {}


def _match(template: str, key: str) -> dict[str, int] | None:
    pat = _TEMPLATE_CACHE.get(template)
    if pat is None:
        pat = re.compile("^" + re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)")
                         .replace(r"\{expert\}", r"(?P<expert>\d+)") + "$")
        _TEMPLATE_CACHE[template] = pat
    m = pat.match(key)
    return None if m is None else {k: int(v) for k, v in m.groupdict().items()}


def _match_any(key: str, templates) -> dict[str, int] | None:
    for t in templates:
        m = _match(t, key)
        if m is not None:
            return m
    return None
