"""Model families: one module per family knows its HF weight names and its HF MoE export target."""

from .base import Family, MoESpec
from .registry import FAMILIES, family_for, supported

__all__ = ["Family", "MoESpec", "FAMILIES", "family_for", "supported"]
