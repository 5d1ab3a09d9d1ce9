"""The package a cluster installs: a wheel built from this checkout, installed into a fresh virtual environment, run
from a directory outside the repository — the README quickstart (demo -> upcycle -> train -> load the HF export)
works (and its logs hold only our own lines), the trainer uses the DeepSpeed configs shipped inside the package (not the repository's files), and
`upcycle-ds scripts` copies out the Slurm / launch scripts shipped with it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_runs_the_quickstart_outside_the_repo(tmp_path):
    wheels, venv, work, src = tmp_path / "wheels", tmp_path / "venv", tmp_path / "work", tmp_path / "src"
    work.mkdir()
    # build from a copy of the package sources (setuptools writes build/ and *.egg-info next to them)
    src.mkdir()
    for rel in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / rel, src / rel)
    shutil.copytree(REPO / "upcycle_ds", src / "upcycle_ds", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = wheels.glob("upcycle_ds-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # the fresh venv sees this environment's dependencies (torch, deepspeed, ...) but not the repository
    purelib = Path(subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                           text=True).strip())
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                            "UPCYCLE_DS_VERBOSE", "HF_HUB_DISABLE_PROGRESS_BARS",
                                                            "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")

    def run(*argv: str) -> str:
        p = subprocess.run(list(argv), cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{argv}:\n{p.stderr[-3000:]}"
        return p.stdout + p.stderr

    where = run(str(venv / "bin" / "python"), "-c", "import upcycle_ds.train.config as c; print(c.DS_CONFIGS)")
    assert str(venv) in where and str(REPO) not in where, where
    cli = str(venv / "bin" / "upcycle-ds")
    from upcycle_ds import __version__

    assert run(cli, "--version").startswith(f"upcycle-ds {__version__} (torch ")  # the wheel's version is the package's
    run(cli, "demo", "--out", "demo", "--rows", "60")
    run(cli, "upcycle", "--model", "demo/dense", "--out", "demo/moe", "--num-experts", "4", "--top-k", "2")
    log = run(cli, "train", "--model", "demo/moe", "--data", "demo/train.jsonl", "--out", "demo/run",
              "--zero-stage", "2", "--max-steps", "2", "--micro-batch-size", "2", "--max-length", "64",
              "--wandb-mode", "disabled")
    assert "ZeRO-2" in log and "step 2/2" in log, log[-2000:]
    run(str(venv / "bin" / "python"), "-c",
        "import transformers; transformers.AutoModelForCausalLM.from_pretrained('demo/run/hf')")
    log += run(cli, "eval", "--model", "upcycled=demo/moe", "trained=demo/run/hf", "--data", "demo/heldout.jsonl")
    assert "| loss | all | 100 |" in log and "trained - upcycled  loss" in log, log[-2000:]
    # into a pipe: our own lines only (no library progress bars, no DeepSpeed / torch notices)
    for noise in ("\r", "Loading weights", "Generating train split", "it/s]", "[INFO]", "[WARNING]", "Warning"):
        assert noise not in log, (noise, log[-3000:])
    run(cli, "scripts", "--out", "scripts")  # the cluster scripts ship in the wheel
    for rel in ("slurm/train.sbatch", "slurm/upit.sbatch", "launchers/train_single_node.sh"):
        assert (work / "scripts" / rel).read_text() == (REPO / rel).read_text()


def test_every_bench_script_imports():
    """The benches are run by hand (and bench/gpu/run.sh on a GPU machine), not by the suite: importing each one (its
    top level: the harness it shares with the others, the library names it uses) catches a refactor that broke one."""
    bench = REPO / "bench"
    code = ("import importlib.util, sys\n"
            f"sys.path[:0] = [{str(REPO)!r}, {str(bench)!r}]\n"
            "for path in sys.argv[1:]:\n"
            "    name = 'bench_' + path.rsplit('/', 1)[-1][:-3]\n"
            "    spec = importlib.util.spec_from_file_location(name, path)\n"
            "    sys.modules[name] = module = importlib.util.module_from_spec(spec)\n"
            "    spec.loader.exec_module(module)\n"
            "    print('ok', path)\n")
    scripts = sorted(str(p) for p in bench.glob("*.py"))
    assert len(scripts) >= 9
    out = subprocess.run([sys.executable, "-c", code, *scripts], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("ok ") == len(scripts)
