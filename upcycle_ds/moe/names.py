"""The names DeepSpeed-MoE gives our parameters, written once (torch-free).

`UpcycledMoE` (moe/layer.py) sits at `model.layers.{layer}.mlp` and is a `deepspeed.moe.layer.MoE`, so its router and
experts live where DeepSpeed puts them; checkpoints (per-expert files), the converter, the optimizer's param groups,
elastic resume and `--train-only` all spell these names through this module:

    router   model.layers.{layer}.mlp.deepspeed_moe.gate.weight
    experts  model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.{expert}.{gate,up,down}_proj.weight
             ({expert}: the rank-local id in a live model and in optimizer files, the global id in per-expert files)
"""

from __future__ import annotations

import re

BLOCK = "model.layers.{layer}.mlp"
"""The MoE block of decoder layer {layer} (where the HF MLP was)."""
ROUTER = "deepspeed_moe.gate.weight"
"""The router weight, relative to BLOCK."""
EXPERTS = "deepspeed_moe.experts.deepspeed_experts"
"""DeepSpeed's ModuleList of local experts, relative to BLOCK."""
EXPERT = EXPERTS + ".{expert}.{proj}_proj.weight"
"""One expert projection weight (proj: gate, up, down), relative to BLOCK."""

ROUTER_PARAM_RE = r"deepspeed_moe\.gate\."
"""Regex (re.search) matching every router parameter name: the default of `router-init --train-only`."""
_EXPERT_PARAM = re.compile(r"^(model\.layers\.(\d+)\.mlp\." + re.escape(EXPERTS) + r"\.)(\d+)(\..+)$")


def router_name(layer: int) -> str:
    return f"{BLOCK}.{ROUTER}".format(layer=layer)


def expert_name(layer: int, expert: int, proj: str) -> str:
    return f"{BLOCK}.{EXPERT}".format(layer=layer, expert=expert, proj=proj)


def is_router_param(name: str) -> bool:
    return re.search(ROUTER_PARAM_RE, name) is not None


def is_expert_param(name: str) -> bool:
    return _EXPERT_PARAM.match(name) is not None


def expert_of(name: str) -> tuple[int, int] | None:
    """(decoder layer, expert id) of an expert parameter name; None for every other name."""
    m = _EXPERT_PARAM.match(name)
    return (int(m.group(2)), int(m.group(3))) if m else None


def with_expert(name: str, expert: int) -> str:
    """An expert parameter name with its expert id replaced."""
    m = _EXPERT_PARAM.match(name)
    if m is None:
        raise ValueError(f"not an expert parameter name: {name}")
    return f"{m.group(1)}{expert}{m.group(4)}"


def to_global(name: str, ep_rank: int, n_local: int) -> str:
    """The global name of a parameter of expert-parallel rank `ep_rank` (which holds experts ep_rank * n_local ..)."""
    e = expert_of(name)
    return name if e is None else with_expert(name, ep_rank * n_local + e[1])
