"""The one spelling of a precision across subcommands: `bf16 | fp32 | fp16 | auto` (auto: bf16 on a GPU, fp32 on
a CPU), and the torch dtype each names. Training offers bf16 | fp32 (`train --dtype`); scoring and calibration
passes (eval, seed-data, convert's calibration) take all four. Torch-free at import (`--help` stays instant)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

OLD_SPELLINGS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""torch's names, still accepted (flags and --config files) where a dtype flag once took them."""


def torch_dtype(name: str, device: "torch.device | str | None" = None) -> "torch.dtype":
    """The torch dtype of `name` (one of bf16, fp32, fp16, auto; `auto` looks at `device`)."""
    import torch

    name = OLD_SPELLINGS.get(name, name)
    if name == "auto":
        return torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]
