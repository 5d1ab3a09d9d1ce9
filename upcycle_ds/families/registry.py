"""Pick the family of a checkpoint from config.json's `model_type` (dense or MoE)."""

from __future__ import annotations

from ..errors import UserError
from . import llama, mistral, qwen2, qwen3
from .base import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY)}
_DENSE = {f.dense_model_type: f for f in FAMILIES.values()}
# A Mixtral checkpoint does not say whether it came from Llama or Mistral; both have the same MoE names, and
# collapsing back to dense uses `upcycled_from` in config.json when present (see `dense_family`).
_MOE = {"mixtral": mistral.FAMILY, "qwen2_moe": qwen2.FAMILY, "qwen3_moe": qwen3.FAMILY}


def supported() -> str:
    return ", ".join(sorted(_DENSE)) + " (dense); " + ", ".join(sorted(_MOE)) + " (MoE)"


def family_for(config: dict) -> tuple[Family, bool]:
    """(family, is_moe) for a parsed config.json; a clear error for anything else."""
    model_type = config.get("model_type")
    if model_type in _DENSE:
        return _DENSE[model_type], False
    if model_type in _MOE:
        fam = _MOE[model_type]
        src = (config.get("upcycle_ds") or {}).get("upcycled_from")
        if model_type == "mixtral" and src in _DENSE:
            fam = _DENSE[src]
        return fam, True
    if config.get("auto_map"):
        raise UserError(f"model_type {model_type!r} needs remote code (config.json has auto_map), which upcycle_ds "
                        f"does not run; supported model types: {supported()}")
    raise UserError(f"unsupported model_type {model_type!r}; supported: {supported()}")
