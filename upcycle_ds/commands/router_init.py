"""`upcycle-ds router-init`: arguments and printing; the stage itself is `upcycle_ds.upit.router_init`."""

from __future__ import annotations

from ..upit import router_init as _stage
from ..upit.router_init import RouterInitConfig, run_router_init

__doc__ = _stage.__doc__  # --help shows the stage's description
Args = RouterInitConfig


def run(args: RouterInitConfig) -> int:
    return run_router_init(args)
