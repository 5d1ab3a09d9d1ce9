"""A rank killed (SIGKILL) while a checkpoint is being saved: the job fails fast, `latest` still points at the
previous complete checkpoint, and --resume from it reproduces the losses the killed run had logged.

The kill comes from tests/inject/sitecustomize.py (test-only fault injection on PYTHONPATH); the product has no hook."""

import json
import os
import shutil
import subprocess
import time

import pytest

from pathlib import Path

from cli_proc import cli, cli_env
from tiny import make_jsonl, make_moe, make_tokenizer

INJECT = str(Path(__file__).parent / "inject")


def _losses(path):
    return {r["step"]: r["train/loss"] for r in map(json.loads, path.read_text().splitlines()) if "train/loss" in r}


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    moe = make_moe("mixtral", tmp_path / "moe", num_experts=4, top_k=2)
    make_tokenizer(moe)
    data = make_jsonl(tmp_path / "train.jsonl", 200)
    run = tmp_path / "run"
    cmd = [*cli("train"), "--nproc", "2", "--model", str(moe), "--data", str(data),
           "--out", str(run), "--ep-size", "2", "--zero-stage", "2", "--max-steps", "6", "--save-every", "2",
           "--micro-batch-size", "2", "--seed", "0", "--dtype", "fp32", "--lr", "1e-3", "--max-length", "128",
           "--wandb-mode", "disabled", "--no-export-hf"]
    t0 = time.time()
    env = cli_env(UPCYCLE_DS_TEST_KILL_IN_SAVE="4")
    env["PYTHONPATH"] = os.pathsep.join([INJECT, env["PYTHONPATH"]])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0, "the job must fail when a rank is killed"
    assert time.time() - t0 < 200
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "global_step2"
    assert (ckpts / "global_step4").is_dir()  # written, never committed
    killed = _losses(run / "metrics.jsonl")
    assert sorted(killed) == [1, 2, 3, 4]
    shutil.copy(run / "metrics.jsonl", tmp_path / "killed_metrics.jsonl")

    r = subprocess.run(cmd + ["--resume"], env=cli_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "global_step2" in r.stderr
    resumed = _losses(run / "metrics.jsonl")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps after the checkpoint were dropped and logged again
    assert resumed[3] == killed[3] and resumed[4] == killed[4]
    assert (ckpts / "latest").read_text().strip() == "global_step6"
