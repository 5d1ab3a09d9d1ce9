"""What other libraries may write into a user's log: by default only what helps. Our own progress lines
(`progress.py`, the trainer's step lines) are written for batch logs; the libraries' own chatter is not:

- without a TTY (a batch log, a redirect), no `\\r` progress bars of transformers ("Loading weights") and datasets
  ("Generating train split", map/tokenize bars): `HF_HUB_DISABLE_PROGRESS_BARS` / `HF_DATASETS_DISABLE_PROGRESS_BARS`
  (a value the user set wins);
- the `deepspeed` launcher runs with `--quiet` (no INFO lines, no "Unable to find hostfile" warning: `--nproc N` on
  one node never has a hostfile);
- DeepSpeed's `print` "No existing process group found, creating a new group named: ep_size_N" (an expected step
  of building an expert-parallel model) and its "Setting accelerator to CPU" warning (expected on a CPU machine);
- torch's FutureWarning that `all_gather_into_tensor` is deprecated (DeepSpeed's ZeRO calls it, not our code).

`--verbose` (every subcommand) or UPCYCLE_DS_VERBOSE=1 shows all of them; the setting reaches the ranks a launcher
starts through the environment.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator

VERBOSE_ENV = "UPCYCLE_DS_VERBOSE"
DEEPSPEED_NOTICES = ("Setting accelerator to CPU",)
"""Starts of DeepSpeed logger messages that are expected on our paths and hidden unless verbose."""


def set_verbose() -> None:
    """This process and every process it starts show the libraries' own messages."""
    os.environ[VERBOSE_ENV] = "1"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DEEPSPEED_NOTICES)


def quiet_libraries() -> None:
    """Once per process, before the libraries are imported (`cli.main`): see the module docstring. Nothing when
    verbose."""
    if verbose():
        return
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow huggingface_hub's
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        # (both libraries read these on import; where one was imported already, switch its bars off directly)
        if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
            sys.modules["datasets"].disable_progress_bars()
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    deepspeed_logger = logging.getLogger("DeepSpeed")  # the logger DeepSpeed creates (and configures) on import
    if not any(isinstance(f, _DropNotices) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_DropNotices())


def launcher_flags() -> list[str]:
    """Flags of the `deepspeed` launcher command: `--quiet` unless verbose."""
    return [] if verbose() else ["--quiet"]


@contextlib.contextmanager
def library_prints() -> Iterator[None]:
    """Within: what a library `print`s to stdout is dropped, unless verbose (our own output never runs here)."""
    if verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
