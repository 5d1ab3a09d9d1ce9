"""How the benches start `upcycle-ds` as a child process: `python -m upcycle_ds.cli` of this interpreter, this
checkout first on PYTHONPATH. It works installed and from a bare checkout (the GPU machine of bench/gpu/run.sh has
no console script), and always runs this checkout's code (tests/cli_proc.py does the same for the tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args) -> list[str]:
    """The command line of `upcycle-ds ARGS...` (strings or paths)."""
    return [sys.executable, "-m", "upcycle_ds.cli", *map(str, args)]


def cli_env(**values: str) -> dict[str, str]:
    """os.environ with this checkout first on PYTHONPATH, then `values` set."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(values)
    return env
