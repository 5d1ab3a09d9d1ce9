"""Count the Python-level calls that read a device tensor back to the host (or, on CUDA, wait for the device to
size an output) while a block runs: `.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `float/int/bool(tensor)`,
`nonzero`, `bincount`, `unique`, boolean-mask indexing, and `repeat_interleave` with tensor repeats but no
`output_size`. Instrumentation for tests only: it patches torch.Tensor / torch attributes inside the `with` block and
restores them after.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch

_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "nonzero", "unique")
_FUNCTIONS = ("nonzero", "bincount", "unique", "masked_select")


@contextlib.contextmanager
def count_host_syncs():
    """Yields a Counter {name: calls}; a call nested in another counted call is not counted again."""
    counts: Counter = Counter()
    depth = [0]
    saved = []

    def wrap(owner, name, label, predicate=None):
        original = getattr(owner, name)
        saved.append((owner, name, owner.__dict__.get(name)))

        def counted(*args, **kwargs):
            if depth[0] == 0 and (predicate is None or predicate(args, kwargs)):
                counts[label] += 1
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        setattr(owner, name, counted)

    for name in _METHODS:
        wrap(torch.Tensor, name, f"Tensor.{name}")
    for name in _FUNCTIONS:
        wrap(torch, name, f"torch.{name}")

    def repeats_without_size(args, kwargs):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None

    wrap(torch.Tensor, "repeat_interleave", "repeat_interleave without output_size", repeats_without_size)
    wrap(torch, "repeat_interleave", "repeat_interleave without output_size", repeats_without_size)

    def bool_mask(args, kwargs):
        index = args[1] if len(args) > 1 else None
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

    wrap(torch.Tensor, "__getitem__", "boolean-mask indexing", bool_mask)
    try:
        yield counts
    finally:
        for owner, name, own in reversed(saved):
            if own is None:
                delattr(owner, name)  # it was inherited
            else:
                setattr(owner, name, own)
