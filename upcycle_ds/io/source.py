"""The read interface every weight source shares (HF checkpoint, upcycled / collapsed views, DeepSpeed checkpoint):
`config`, `path`, `keys()`, `key in src`, `shape(key)`, `dtype(key)`, `get(key)` under HF (hub layout) key names."""

from __future__ import annotations

import torch


class PlannedSource:
    """Base of the virtual checkpoints: the read interface over `self._plan = {key: (dtype, shape, how)}`, filled by
    the subclass, which implements `get(key)` (how to produce a tensor is its business)."""

    _plan: dict[str, tuple[torch.dtype, tuple[int, ...], tuple]]

    def keys(self) -> list[str]:
        return list(self._plan)

    def __contains__(self, key: str) -> bool:
        return key in self._plan

    def shape(self, key: str) -> tuple[int, ...]:
        return self._plan[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._plan[key][0]
