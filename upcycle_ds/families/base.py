"""What a model family knows: its HF dense weight names, its HF MoE export target and the names there.

Templates use `{layer}` and `{expert}`. Non-MLP weights (embeddings, attention, norms, lm_head) have the same names
in the dense model and its MoE export for every family we support, so only the MLP / MoE names live here.

In-memory names of our DeepSpeed model (`upcycle_ds.moe.layer.UpcycledMoE` at `model.layers.{layer}.mlp`): router and
experts as DeepSpeed names them (`upcycle_ds.moe.names`), and
    shared   model.layers.{layer}.mlp.shared_mlp.{gate,up,down}_proj.weight, model.layers.{layer}.mlp.shared_mlp_gate.weight
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UserError
from ..moe import names

PROJS = ("gate", "up", "down")
LM_HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"

# our in-memory (DeepSpeed model) names inside one MoE block, relative to `model.layers.{layer}.mlp.` (moe/names.py)
DS_ROUTER, DS_EXPERT, DS_BLOCK = names.ROUTER, names.EXPERT, names.BLOCK


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
class Attention:
    """How transformers builds one model type's attention weights (its `*Attention.__init__`)."""

    qkv_bias: bool | tuple[str, bool] = False
    """q/k/v projections have a bias: a constant, or (config key, its default)."""
    o_bias: bool | tuple[str, bool] = False
    """o_proj has a bias: a constant, or (config key, its default)."""
    qk_norm: bool = False
    """q_norm / k_norm weights of size head_dim (Qwen3)."""
    default_head_dim: int | None = None
    """head_dim when config.json has none (None: hidden_size // num_attention_heads)."""

    @staticmethod
    def flag(spec, cfg: dict) -> bool:
        return bool(cfg.get(spec[0], spec[1])) if isinstance(spec, tuple) else bool(spec)


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
    dense_attention: Attention = Attention()
    """Attention weights of the dense model type (biases, q/k norms, head_dim default)."""
    moe_attention: Attention = Attention()
    """Attention weights of the MoE export target."""

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

    # ---------------------------------------------------------------- shapes
    def check_config(self, cfg, where: str = "config.json") -> None:
        """The keys every weight shape depends on are present, positive ints, and consistent (UserError otherwise)."""
        if not isinstance(cfg, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
        is_moe = cfg.get("model_type") == self.moe_model_type
        need = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"]
        if is_moe:
            need += ["num_experts_per_tok"]
            if "moe_intermediate_size" not in cfg:
                need.append("intermediate_size")
        else:
            need.append("intermediate_size")
        optional = ["num_key_value_heads", "head_dim", "moe_intermediate_size", "intermediate_size",
                    "shared_expert_intermediate_size", "decoder_sparse_step"]
        for key in need + optional:
            if key not in cfg or (cfg[key] is None and key not in need):
                if key in need:
                    raise UserError(f"{where}: required key {key!r} is missing")
                continue
            v, least = cfg[key], 0 if "intermediate" in key or key == "decoder_sparse_step" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise UserError(f"{where}: {key} must be an integer >= {least} (got {v!r})")
        heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        if cfg.get("head_dim") is None and cfg["hidden_size"] % heads:
            raise UserError(f"{where}: hidden_size {cfg['hidden_size']} is not divisible by num_attention_heads "
                            f"{heads} (and no head_dim is given)")
        if heads % kv:
            raise UserError(f"{where}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv}")
        if is_moe:
            for key in dict.fromkeys((self.num_experts_key, "num_experts", "num_local_experts")):
                v = cfg.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    raise UserError(f"{where}: {key} must be an integer >= 1 (got {v!r})")
            E = self.num_experts(cfg)
            if not 1 <= int(cfg["num_experts_per_tok"]) <= E:
                raise UserError(f"{where}: num_experts_per_tok {cfg['num_experts_per_tok']} is not in 1..{E} "
                                f"(the number of experts)")
            for key in ("mlp_only_layers",):
                v = cfg.get(key) or []
                if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                    raise UserError(f"{where}: {key} must be a list of layer indices (got {v!r})")

    def expected_shapes(self, cfg: dict, where: str = "config.json") -> dict[str, tuple[int, ...]]:
        """HF key -> shape of every weight of a checkpoint with config `cfg` (dense, or MoE in the hub per-expert
        layout), as transformers builds the model (tested against its classes on the meta device).
        `lm_head.weight` is included; a checkpoint with tied embeddings may omit it."""
        self.check_config(cfg, where)
        is_moe = cfg.get("model_type") == self.moe_model_type
        attn = self.moe_attention if is_moe else self.dense_attention
        H, V, n = int(cfg["hidden_size"]), int(cfg["vocab_size"]), int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        hd = int(cfg.get("head_dim") or attn.default_head_dim or H // heads)
        out = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
        moe = set(self.moe_layers(cfg)) if is_moe else set()
        for layer in range(n):
            pre = f"model.layers.{layer}."
            out[pre + "input_layernorm.weight"] = (H,)
            out[pre + "post_attention_layernorm.weight"] = (H,)
            a = pre + "self_attn."
            out.update({a + "q_proj.weight": (heads * hd, H), a + "k_proj.weight": (kv * hd, H),
                        a + "v_proj.weight": (kv * hd, H), a + "o_proj.weight": (H, heads * hd)})
            if attn.flag(attn.qkv_bias, cfg):
                out.update({a + "q_proj.bias": (heads * hd,), a + "k_proj.bias": (kv * hd,),
                            a + "v_proj.bias": (kv * hd,)})
            if attn.flag(attn.o_bias, cfg):
                out[a + "o_proj.bias"] = (H,)
            if attn.qk_norm:
                out.update({a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)})
            if layer not in moe:
                inter = int(cfg["intermediate_size"])
                for p in PROJS:
                    out[self.dense_mlp_key(layer, p)] = (H, inter) if p == "down" else (inter, H)
                continue
            E, inter = self.num_experts(cfg), self.expert_intermediate_size(cfg)
            out[self.router_key(layer)] = (E, H)
            for e in range(E):
                for p in PROJS:
                    out[self.expert_key(layer, e, p)] = (H, inter) if p == "down" else (inter, H)
            if self.moe_shared:
                s = int(cfg.get("shared_expert_intermediate_size") or 0)
                for ours, tmpl in self.moe_shared.items():
                    out[tmpl.format(layer=layer)] = {"shared_mlp.down_proj.weight": (H, s),
                                                     "shared_mlp_gate.weight": (1, H)}.get(ours, (s, H))
        return out

    def fused_shapes(self, cfg: dict, layer: int) -> dict[str, tuple[int, ...]]:
        """The transformers-5 fused expert tensors of MoE layer `layer` (read when a checkpoint holds them)."""
        E, H, inter = self.num_experts(cfg), int(cfg["hidden_size"]), self.expert_intermediate_size(cfg)
        return {self.moe_fused["gate_up"].format(layer=layer): (E, 2 * inter, H),
                self.moe_fused["down"].format(layer=layer): (E, H, inter)}

    def check_shapes(self, cfg: dict, shapes: dict[str, tuple[int, ...]], where: str,
                     config_name: str = "config.json") -> None:
        """Every tensor of a checkpoint (`shapes`: key -> shape) has the shape `cfg` implies, and none is missing
        (experts may be per-expert or fused; lm_head may be absent with tied embeddings). Keys this family does not
        know are allowed unless they name a decoder layer the config does not have. UserError otherwise."""
        want = self.expected_shapes(cfg, f"{where}/{config_name}")
        is_moe = cfg.get("model_type") == self.moe_model_type
        fused = {}
        if is_moe:
            for layer in self.moe_layers(cfg):
                fused.update({k: (layer, v) for k, v in self.fused_shapes(cfg, layer).items()})
        n_layers = int(cfg["num_hidden_layers"])
        fused_layers = set()
        for key, shape in shapes.items():
            shape = tuple(shape)
            if key in want:
                exp = want[key]
            elif key in fused:
                fused_layers.add(fused[key][0])
                exp = fused[key][1]
            else:
                layer = _layer_of(key)
                if layer is not None and layer >= n_layers:
                    raise UserError(f"{where}: tensor {key} is for layer {layer}, but {config_name} says "
                                    f"num_hidden_layers={n_layers}")
                continue
            if shape != tuple(exp):
                raise UserError(f"{where}: tensor {key} has shape {list(shape)}, but {config_name} (hidden_size "
                                f"{cfg['hidden_size']}, {_sizes(self, cfg)}) implies {list(exp)}")
        tied = bool(cfg.get("tie_word_embeddings", False))
        for key in want:
            if key in shapes or (tied and key == "lm_head.weight"):
                continue
            parsed = self.parse_moe_key(key)
            if parsed is not None and parsed[0] == "expert" and parsed[1]["layer"] in fused_layers:
                continue
            raise UserError(f"{where}: tensor {key} is missing ({config_name} implies it)")


_DROP_KEYS = {"transformers_version", "_name_or_path", "architectures", "model_type", "auto_map",
              "torch_dtype", "pretraining_tp", "mlp_bias"}
_MOE_KEYS = {"num_local_experts", "num_experts", "num_experts_per_tok", "output_router_logits", "router_aux_loss_coef",
             "router_jitter_noise", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
             "decoder_sparse_step", "mlp_only_layers", "qkv_bias"}

_ANY_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def _layer_of(key: str) -> int | None:
    m = _ANY_LAYER_RE.match(key)
    return None if m is None else int(m.group(1))


def _sizes(fam: "Family", cfg: dict) -> str:
    if cfg.get("model_type") == fam.moe_model_type:
        return f"expert intermediate size {fam.expert_intermediate_size(cfg)}, {fam.num_experts(cfg)} experts"
    return f"intermediate_size {cfg.get('intermediate_size')}"


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


# ------------------------------------------------------------------------------------------- shared by every family
def is_tied(config) -> bool:
    """Whether the lm_head is the input embedding (`tie_word_embeddings`; a dict or a transformers config)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return bool(get("tie_word_embeddings", False))


def weight_key(config, key: str, present) -> str:
    """The checkpoint key that holds `key`: with tied embeddings an export may omit the lm_head (transformers saves
    only the embedding; e.g. SmolLM2), which then reads the embedding. `present(key)` says whether a key exists."""
    if key == LM_HEAD and is_tied(config) and not present(key):
        return EMBEDDING
    return key


def split_gate_up(gate_up, proj: str):
    """The `gate` or `up` rows of one expert's fused [2I, H] `gate_up_proj` (transformers 5: gate rows, then up)."""
    half = gate_up.shape[0] // 2
    return gate_up[:half] if proj == "gate" else gate_up[half:]
