"""How every test starts `upcycle-ds` as a child process: `python -m upcycle_ds.cli` of this interpreter with this
checkout first on PYTHONPATH. That works where the package is installed (CI's editable install) and from a bare
checkout (the GPU machine of bench/gpu/run.sh has no console script), and it always runs the code under test.
The `--nproc` launcher starts its ranks the same way (`python -m deepspeed.launcher.runner`).

    run_cli("train", "--nproc", "2", ...)              # subprocess.run, output captured, text
    subprocess.Popen(cli("upcycle", ...), env=cli_env(...))

`cli_env()` is the child's environment: no variables of an enclosing launcher (the child is a job of its own),
OMP_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false, and DS_ACCELERATOR=cpu only where torch sees no CUDA device: on a
GPU machine a child never inherits the CPU session's value (the launcher picks the accelerator from the hardware;
a rank started without it refuses a contradicting DS_ACCELERATOR).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "SLURM_STEP_ID")


def cli(*args) -> list[str]:
    """The command line of `upcycle-ds ARGS...` (strings or paths)."""
    return [sys.executable, "-m", "upcycle_ds.cli", *map(str, args)]


def cli_env(*, drop: tuple[str, ...] = (), cuda_devices: int | None = None, **values: str) -> dict[str, str]:
    """os.environ for a CLI child (see the module docstring), then `drop` removed and `values` set.
    `cuda_devices`: the CUDA devices to assume (default: what torch sees here)."""
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = dict(os.environ)
    for var in (*LAUNCHER_VARS, *drop):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cuda_devices:
        env.pop("DS_ACCELERATOR", None)
    else:
        env["DS_ACCELERATOR"] = "cpu"
    env.update(values)
    return env


def run_cli(*args, env: dict[str, str] | None = None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """`upcycle-ds ARGS...` to the end, stdout and stderr captured as text (`env` default: `cli_env()`)."""
    return subprocess.run(cli(*args), env=cli_env() if env is None else env, capture_output=True, text=True,
                          timeout=timeout, **kw)


CONSOLE_SCRIPT = Path(sys.executable).parent / "upcycle-ds"
"""The installed `upcycle-ds` executable: only for the tests whose subject is that script (test_upcycle.py::
test_console_script, test_bad_input.py::test_console_script_gives_the_same_line); every other test uses `cli()`."""
