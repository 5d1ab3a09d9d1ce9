"""Checks of user input that several commands share, each message written once (torch-free). Every check raises
`UserError` (one line on stderr, exit 2); the `*_error` functions return one for the caller to raise."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from .errors import UserError


def finite(flag: str, value) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number (got {value})")


def positive(flag: str, value) -> None:
    if not value > 0 or value == float("inf"):
        raise UserError(f"{flag} must be > 0 (got {value})")


def at_least(flag: str, value, low) -> None:
    if value < low:
        raise UserError(f"{flag} must be >= {low} (got {value})")


def fraction(flag: str, value, *, include_one: bool = False) -> None:
    """A number in [0, 1) (or [0, 1])."""
    if not (0 <= value <= 1 if include_one else 0 <= value < 1):
        raise UserError(f"{flag} must be in [0, 1{']' if include_one else ')'} (got {value})")


def one_of(flag: str, value, choices: Iterable) -> None:
    choices = list(choices)
    if value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(map(str, choices))} (got {value!r})")


def zero_stage(stage) -> None:
    if stage not in (0, 1, 2):
        raise UserError(f"--zero-stage must be 0, 1 or 2 (got {stage})")


def offload_needs_zero(offload: bool, stage) -> None:
    if offload and stage == 0:
        raise UserError("--offload-optimizer needs --zero-stage 1 or 2 (ZeRO-Offload moves ZeRO's optimizer partition "
                        "to the host; ZeRO-0 has none)")


def pin_needs_offload(pin: bool, offload: bool) -> None:
    if pin and not offload:
        raise UserError("--offload-pin-memory applies to --offload-optimizer; add that flag or drop this one")


def ep_divides(ep_size: int, num_experts: int) -> None:
    if ep_size < 1 or num_experts % ep_size:
        raise UserError(f"--ep-size {ep_size} does not divide the number of experts {num_experts}")


def existing(path: str | Path) -> Path:
    """`path`, which must exist (a checkpoint directory, usually)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such directory")
    return p


def missing_tensor_error(where, key: str) -> UserError:
    return UserError(f"{where}: tensor {key} is missing")


def unreadable_error(path, err: OSError) -> UserError:
    return UserError(f"{path}: cannot read ({err.strerror})")


def data_file_missing_error(what) -> UserError:
    return UserError(f"data file not found: {what}")


def no_rows_error(what) -> UserError:
    return UserError(f"data has no rows: {what}")
