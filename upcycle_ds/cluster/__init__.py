"""Cluster scripts shipped with the package: `slurm/*.sbatch` (multi-node Slurm jobs) and `launchers/*.sh`
(single-node launches). `upcycle-ds scripts --out DIR` copies them out for editing (docs/slurm.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..io.atomic import atomic_output_dir

HERE = Path(__file__).resolve().parent
KINDS = ("slurm", "launchers")


def script_files() -> list[Path]:
    """Every shipped script, relative to this package dir (slurm/train.sbatch, launchers/..., ...)."""
    return sorted(p.relative_to(HERE) for kind in KINDS for p in (HERE / kind).iterdir() if p.is_file())


def copy_scripts(out: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy the shipped scripts to OUT/slurm and OUT/launchers (atomically: OUT appears complete or not at all)."""
    files = script_files()
    with atomic_output_dir(out, overwrite) as tmp:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(HERE / rel, tmp / rel)
    return [Path(out) / rel for rel in files]
