"""The GPU acceptance harness (bench/gpu/) checked without running it: its time budget, the parallelism of its
quality parts against `upcycle-ds plan`, the one-line verdict on carried wheels that do not fit the machine, and that
no test or bench needs the `upcycle-ds` console script (the GPU machine has none). The whole harness runs on the CPU
in tests/test_gpu_rehearsal.py."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "bench" / "gpu" / "run.sh"
GIB = 2**30
H200_GIB, H100_GIB = 139.8, 79.2  # what torch reports as total_memory on each


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _limits() -> dict[str, int]:
    line = next(l for l in RUN_SH.read_text().splitlines() if l.startswith("declare -A LIMIT="))
    return {k: int(v) for k, v in re.findall(r"\[(\w+)\]=(\d+)", line)}


def test_the_default_run_fits_seven_minutes_by_construction():
    """Every part runs under `timeout` at its limit (+ 5 s until SIGKILL): the install and the default parts
    (tests, step, quality) end within 7 minutes even if each one hangs; each part prints its own elapsed time."""
    limits, text = _limits(), RUN_SH.read_text()
    assert sum(limits[p] for p in ("install", "tests", "step", "quality")) + 4 * 5 <= 420, limits
    assert 'timeout -k 5 "${LIMIT[$name]}"' in text and 'PARTS=${1:-tests,step,quality}' in text
    assert 'echo "=== $name: exit ${RC[$name]} after ${SECS[$name]} s' in text


def _quality_set() -> list[str]:
    m = re.search(r'^QUALITY_SET="([^"]*)"', RUN_SH.read_text(), re.M)
    return m.group(1).split()


@pytest.mark.parametrize("gib", [H200_GIB, H100_GIB], ids=["H200", "H100"])
def test_quality_parallelism_leaves_30_percent_headroom_over_the_plan(gib):
    """What run.sh passes as `parallel` (bench/gpu/fit.py) times the plan's per-rank peak of the quality bench's MoE
    run (plus a CUDA context each) stays under the GPU's memory with >= 30 % to spare, and is the most that does.
    The gpu size's own parallel=6 (~22 GiB each by the plan) did not leave it on an H200."""
    from upcycle_ds.plan import Setup, make_plan, upcycled_shape

    sys.path.insert(0, str(REPO))
    from bench.quality.presets import SIZES
    from bench.upcycle_quality import apply_overrides

    size = apply_overrides(SIZES["gpu"], _quality_set())
    config = {"model_type": "llama", "hidden_size": size.hidden, "intermediate_size": size.intermediate,
              "num_hidden_layers": size.layers, "num_attention_heads": size.heads,
              "num_key_value_heads": size.kv_heads, "vocab_size": size.vocab, "tie_word_embeddings": False}
    plan = make_plan(upcycled_shape(config, num_experts=size.experts, top_k=size.top_k),
                     Setup(gpus_per_node=1, zero_stage=size.zero_stage, dtype=size.dtype, micro_batch_size=size.mbs,
                           seq_len=size.seq, activation_checkpointing=False)).peak
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu" / "fit.py"), "quality", "--size", "gpu", "--set",
                        *_quality_set(), "--memory-gib", str(gib)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    n = int(r.stdout.split()[-1])
    per_run = plan + 1.0 * GIB
    assert n >= 1 and n * per_run * 1.3 <= gib * GIB < (n + 1) * per_run * 1.3, (n, plan / GIB)
    assert 6 * per_run * 1.3 > H200_GIB * GIB  # the old setting: no headroom


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                      *[f"Requires-Dist: {r}" for r in requires]]) + "\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_carried_wheels_that_do_not_fit_the_machine_are_named_one_line_each(tmp_path):
    """run.sh's check before it installs anything: a carried wheel whose requirement the machine does not meet, or
    that nothing provides, or a folder that does not hold what MANIFEST.txt lists, each get one line naming both
    sides."""
    carry = _module("carry", REPO / "bench" / "gpu" / "carry.py")
    import torch

    _wheel(tmp_path, "gpuprobe_a", "1.0", ["torch<2.0", "gpuprobe-b>=2"])
    _wheel(tmp_path, "gpuprobe_b", "1.5", ["no-such-dist-anywhere"])
    (tmp_path / "MANIFEST.txt").write_text("# test\ngpuprobe-a==1.0\ngpuprobe-b==1.5\n")
    todo, already, problems = carry.check(tmp_path)
    torch_version = torch.__version__
    assert problems == [
        f"gpuprobe-a 1.0 needs torch<2.0, but this machine has torch {torch_version}",
        "gpuprobe-a 1.0 needs gpuprobe-b>=2, but the carried wheel is gpuprobe-b 1.5",
        f"gpuprobe-b 1.5 needs no-such-dist-anywhere, which neither this machine nor {tmp_path} has",
    ], problems
    (tmp_path / "MANIFEST.txt").write_text("gpuprobe-a==1.0\ngpuprobe-b==1.5\ngpuprobe-c==3.0\n")
    assert carry.check(tmp_path)[2] == [f"{tmp_path} lacks the wheel of gpuprobe-c==3.0 listed in MANIFEST.txt"]


def test_what_is_carried_is_what_the_machine_lacks():
    """deepspeed and datasets and what they need beyond the GPU machine's packages (and their direct
    requirements): the packages the machine has are never carried, deepspeed's and datasets' own requirements are."""
    carry = _module("carry", REPO / "bench" / "gpu" / "carry.py")
    plan = carry.carry_plan()
    assert {"deepspeed", "datasets", "hjson", "ninja", "py-cpuinfo", "msgpack", "einops", "pandas", "xxhash",
            "dill", "multiprocess"} <= set(plan)
    assert not {"torch", "transformers", "numpy", "pyyaml", "safetensors", "tqdm", "psutil", "pyarrow",
                "huggingface-hub", "packaging", "wandb"} & set(plan)


CONSOLE_SCRIPT = re.compile(r'/ "upcycle-ds"|which\("upcycle-ds"\)')


def test_no_test_or_bench_needs_the_console_script():
    """Tests start the CLI through tests/cli_proc.py, benches through bench/cli_cmd.py (`python -m upcycle_ds.cli`);
    the installed script is used only by the tests whose subject it is (via cli_proc.CONSOLE_SCRIPT) and by
    test_package.py (the wheel's own venv)."""
    offenders = []
    for path in sorted([*(REPO / "tests").glob("*.py"), *(REPO / "bench").rglob("*.py")]):
        if path.name in ("test_gpu_harness.py", "test_package.py", "cli_proc.py"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if CONSOLE_SCRIPT.search(line) or re.search(r"\bBIN\b", line):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert offenders == []
