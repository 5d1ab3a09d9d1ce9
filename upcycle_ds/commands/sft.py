"""`upcycle-ds sft`: arguments and printing; the stage itself is `upcycle_ds.upit.sft`."""

from __future__ import annotations

from ..upit import sft as _stage
from ..upit.sft import SFTConfig, run_sft

__doc__ = _stage.__doc__  # --help shows the stage's description
Args = SFTConfig


def run(args: SFTConfig) -> int:
    return run_sft(args)
