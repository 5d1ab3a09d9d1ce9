"""The GPU acceptance run, rehearsed on the CPU: `REHEARSE=cpu bash bench/gpu/run.sh` runs every part (tests, step,
quality, upit) through the same script and code paths at toy sizes, in a fresh venv shaped like the GPU machine
(only its packages, linked from this environment; no deepspeed, datasets, wandb, upcycle_ds or console script until
run.sh installs the carried wheels with --no-index), with a stale DS_ACCELERATOR=cuda in the environment. The wheels
come from bench/gpu/prepare.sh for this Python (PY_VERSION=local): its MANIFEST.txt is exactly what run.sh
installs or finds already there. Everything but torch.cuda itself is exercised here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("install", "tests", "step", "quality", "upit")


@pytest.mark.slow
def test_gpu_run_rehearsed_on_cpu(tmp_path):
    wheels, out = tmp_path / "wheels", tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "UPCYCLE_DS_GPU_TESTS_DEVICE")}
    env.update(PYTHON=sys.executable, WHEELS=str(wheels), OUT=str(out))
    prep = subprocess.run(["bash", str(REPO / "bench" / "gpu" / "prepare.sh")], capture_output=True, text=True,
                          timeout=600, env={**env, "PY_VERSION": "local", "NO_UPIT_DATA": "1"})
    assert prep.returncode == 0, prep.stderr[-3000:]
    manifest = {line.split("==")[0] for line in (wheels / "MANIFEST.txt").read_text().splitlines()
                if line and not line.startswith("#")}
    assert {"deepspeed", "datasets"} <= manifest

    r = subprocess.run(["bash", str(REPO / "bench" / "gpu" / "run.sh")], capture_output=True, text=True,
                       timeout=1200, env={**env, "REHEARSE": "cpu", "DS_ACCELERATOR": "cuda"})
    summary = r.stdout[r.stdout.index("=== bench/gpu/run.sh summary"):] if "summary" in r.stdout else r.stdout
    assert r.returncode == 0, summary + r.stderr[-2000:]

    # the same table as the real run: every part passed, each with its elapsed time
    rows = dict(re.findall(r"^\| (\w+) \| passed \| (\d+) \| \d+ \| \d+ \|$", summary, re.M))
    assert set(rows) == set(PARTS), summary
    for part in PARTS:
        assert re.search(rf"^=== {part}: exit 0 after \d+ s \(limit \d+ s; CPU \d+ s\)$", r.stdout, re.M), part
    budget = int(re.search(r"budget of the real run's default parts: .* = (\d+) s", summary).group(1))
    assert budget <= 420, summary

    # the venv had the GPU machine's packages only; run.sh brought exactly the carried wheels
    installed = re.search(r"installed \d+ carried wheels into \S+: (.*)$", summary, re.M).group(1).split()
    kept = re.search(r"already here \(kept\): (.*)$", summary, re.M)
    kept = [x.split()[0] for x in kept.group(1).split(", ")] if kept else []
    assert {w.split("==")[0] for w in installed} | set(kept) == manifest, summary
    assert {"deepspeed", "datasets"} <= {w.split("==")[0] for w in installed}
    assert "upcycle-ds console script: none" in summary and "absent: wandb" in summary, summary
    assert "upcycle-ds" not in os.listdir(out / "venv" / "bin")

    # each part did its work: the gpu tests on the cpu, the bench tables, the plan-sized parallelism
    assert re.search(r"^5 passed", summary, re.M), summary
    assert re.search(r"^\| grouped \| 1 \|", summary, re.M) and re.search(r"^\| loop \| 1 \|", summary, re.M)
    assert summary.count("bench/gpu/fit.py") == 2 and "held-out loss after the continuation" in summary, summary
    assert "(c) UpIT" in summary, summary
    tests_log = (out / "tests.log").read_text()
    assert "skipped" not in tests_log, tests_log[-2000:]
