"""Moved to `upcycle_ds.launch.distributed` (kept importable for one release)."""

from .launch.distributed import free_port, init_distributed, shutdown  # noqa: F401
