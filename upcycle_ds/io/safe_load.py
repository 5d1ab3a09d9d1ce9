"""Loading torch files that are untrusted input (every checkpoint file we read): `torch.load(weights_only=True)`
with exactly the DeepSpeed data classes its checkpoint files pickle allow-listed, so a file cannot run code; any
other global, a truncated or a foreign file is one line naming the file (`UserError`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError


def deepspeed_data_classes() -> list:
    """The classes DeepSpeed's checkpoint files pickle besides tensors and builtins (ZeRO optimizer files: loss
    scalers, the ZeRO stage enum, fragment addresses): data holders, unpickling them runs no code of the file's
    choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location=None, *, mmap: bool = False, what: str = "loadable as a checkpoint file"):
    """torch.load with weights_only=True and DeepSpeed's allow-listed classes (memory-mapped with `mmap`: only the
    pickled structure is read until a tensor is used). Errors read `{path}: not {what} ({reason})`."""
    try:
        with torch.serialization.safe_globals(deepspeed_data_classes()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # UnpicklingError for disallowed globals; RuntimeError for bad zips; OSError
        msg = " ".join(str(e).split()) or type(e).__name__
        if "weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
            msg = "it holds objects other than tensors and DeepSpeed's data classes, refusing to unpickle them"
        raise UserError(f"{path}: not {what} ({msg[:300]})") from None


def load_dict(path: Path, what: str = "a readable DeepSpeed checkpoint file") -> dict:
    """`safe_load` of a file that must exist and hold a dict (memory-mapped, on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing")
    obj = safe_load(path, "cpu", mmap=True, what=what)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a DeepSpeed checkpoint file (holds {type(obj).__name__}, not a dict)")
    return obj
