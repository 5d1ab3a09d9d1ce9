"""Which accelerator a job runs on: chosen from the hardware torch sees, never from a stale environment variable.

DeepSpeed reads DS_ACCELERATOR once, at `import deepspeed`, and trusts it. DS_ACCELERATOR=cpu left over in a shell
(or set by a CPU test session) on a CUDA machine gives DeepSpeed its CPU accelerator: the engine keeps the model on
the CPU while the Trainer sends batches to the GPU. So:

- `choose(environ, cuda_devices)`: "cuda" where torch sees a CUDA device, else "cpu". A DS_ACCELERATOR that says
  the opposite is overridden, and the choice carries a note saying so. Other values (xpu, npu, ...) are kept: we do
  not know that hardware.
- The launcher (`launch.local`) writes the choice into its ranks' environment and names it in its start line.
- Every rank (`launch.distributed.init_distributed`) checks, with `check_deepspeed`, that DeepSpeed picked the
  hardware's accelerator; a rank started without our launcher (srun, torchrun) under a stale DS_ACCELERATOR stops with
  one line instead of training on the wrong device. To run on the CPU of a GPU machine, hide the GPUs
  (`CUDA_VISIBLE_DEVICES=`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import UserError

ENV = "DS_ACCELERATOR"
_OURS = ("cpu", "cuda")


@dataclass(frozen=True)
class Accelerator:
    name: str
    """The DS_ACCELERATOR value the ranks get: "cuda", "cpu" (or another value DeepSpeed knows, kept as given)."""
    cuda_devices: int
    """CUDA devices torch sees in this process."""
    note: str = ""
    """Why the environment's DS_ACCELERATOR was overridden ("" when it was not)."""

    def describe(self) -> str:
        """For a start line: `accelerator cuda (8 CUDA devices)`, `accelerator cpu (no CUDA device) [note]`."""
        devices = f"{self.cuda_devices} CUDA device{'s' if self.cuda_devices != 1 else ''}" if self.cuda_devices \
            else "no CUDA device"
        return f"accelerator {self.name} ({devices})" + (f"; {self.note}" if self.note else "")


def cuda_devices() -> int:
    """CUDA devices torch sees here (0 without CUDA; CUDA_VISIBLE_DEVICES applies)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose(environ: Mapping[str, str] | None = None, devices: int | None = None) -> Accelerator:
    """The accelerator for ranks started from this environment: from the hardware (`devices` CUDA devices, default:
    what torch sees), overriding a DS_ACCELERATOR of "cpu" or "cuda" that contradicts it."""
    env = os.environ if environ is None else environ
    devices = cuda_devices() if devices is None else devices
    hardware = "cuda" if devices else "cpu"
    given = env.get(ENV, "").strip()
    if given and given not in _OURS:
        return Accelerator(given, devices)
    note = ""
    if given and given != hardware:
        note = (f"{ENV}={given} in the environment overridden: "
                + (f"torch sees {devices} CUDA devices (hide them with CUDA_VISIBLE_DEVICES= for a CPU run)"
                   if devices else "torch sees no CUDA device"))
    return Accelerator(hardware, devices, note)


def check_deepspeed(devices: int | None = None) -> None:
    """In a rank, after `import deepspeed`: DeepSpeed's accelerator must be the hardware's (UserError otherwise)."""
    from deepspeed.accelerator import get_accelerator

    devices = cuda_devices() if devices is None else devices
    picked = get_accelerator().device_name()
    hardware = "cuda" if devices else "cpu"
    if picked in _OURS and picked != hardware:
        given = os.environ.get(ENV)
        why = f"{ENV}={given}" if given else "its auto-detection"
        raise UserError(
            f"DeepSpeed chose its {picked} accelerator ({why}) but torch sees "
            + (f"{devices} CUDA devices: the model would stay on the CPU; unset {ENV} (or hide the GPUs with "
               "CUDA_VISIBLE_DEVICES= for a CPU run)" if devices else f"no CUDA device; unset {ENV}"))
