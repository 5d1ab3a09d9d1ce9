"""Moved to `upcycle_ds.data` (a package: sources, formats, render, tokenize, cache, split, pack, batches). This
module re-exports its public names so existing imports keep working for now; import from `upcycle_ds.data`."""

from ..data import *  # noqa: F401,F403
from ..data import __all__  # noqa: F401
