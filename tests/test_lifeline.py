"""No orphans (issue 22, item 3): whatever kills the `upcycle-ds` launcher — kill -9, the OOM killer — its job dies
with it (the `deepspeed` launcher, every rank, their helpers, tokenisation workers), the run dir stays locked until
the last of them is gone, and the temp dir a killed tokenisation leaves in the data cache is removed by the next run.
SIGTERM while the launcher tokenises ends it like SIGTERM elsewhere: one line, exit 143, nothing left.

One real 2-rank launch (the kill -9 during training); the rest are real processes without DeepSpeed ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cli_proc import cli, cli_env
from test_bad_input import w  # noqa: F401  (w: fixture)

from upcycle_ds.errors import UserError
from upcycle_ds.launch.run_lock import RunLock, check_free


def _gone(procs: list, timeout: float) -> list:
    return psutil.wait_procs(procs, timeout=timeout)[1]


def _tree(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _env() -> dict:
    return cli_env()


# ------------------------------------------------------------------------------------------- the writers lock
def test_out_stays_locked_while_a_writer_of_an_earlier_job_lives(tmp_path):
    """A process holding OUT/.lock.writers (a rank whose launcher was killed) keeps OUT in use for a new job, at the
    fast check and at the lock itself; once it is gone, OUT is free."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from upcycle_ds.launch.run_lock import hold_writer\n"
        f"assert hold_writer({str(out)!r}) is not None; print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / ".lock").write_text("")  # a launcher that was killed left its (free) lock file
        with pytest.raises(UserError, match=r"is still being written by processes of an earlier job"):
            check_free(out)
        with pytest.raises(UserError, match=r"is still being written by processes of an earlier job"):
            RunLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    check_free(out)
    with RunLock(out):
        pass


# ------------------------------------------------------------------------------------ a rank's launcher watchdog
_JOB = """
import os, subprocess, sys, time
from upcycle_ds.launch.lifeline import hold_run
hold_run(sys.argv[1])
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(os.getpid(), helper.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("when", ["killed-later", "gone-before-the-rank-starts"])
def test_a_rank_ends_its_job_when_the_launcher_dies(tmp_path, when):
    """A stand-in rank (in its own process group, as the `deepspeed` launcher's children are) with a helper child:
    when the launcher it names is killed with SIGKILL — or was dead before the rank started — the rank kills its
    whole group, helper included, and the writers lock it held is free again."""
    from upcycle_ds.launch import lifeline

    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    spec = f"{launcher.pid}:{lifeline._start_time(launcher.pid)}"
    if when == "gone-before-the-rank-starts":
        launcher.kill()
        launcher.wait()
    out = tmp_path / "run"
    out.mkdir()
    job = subprocess.Popen([sys.executable, "-c", _JOB, str(out)], env={**os.environ, lifeline.ENV: spec},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if when == "killed-later":
            rank, helper = (psutil.Process(int(p)) for p in job.stdout.readline().split())
            assert launcher.poll() is None and rank.is_running() and helper.is_running()
            launcher.kill()
            launcher.wait()
            assert _gone([rank, helper], timeout=20) == []  # (psutil reaps them: it has the exit code)
            assert rank.returncode == -signal.SIGKILL
        else:
            assert job.wait(timeout=60) == -signal.SIGKILL
        assert "the launcher (pid" in job.stderr.read()
        with RunLock(out):
            pass
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        launcher.kill()


# ---------------------------------------------------------------------------- signals while the launcher tokenises
def _big_data(path: Path, rows: int = 44_000) -> Path:
    """Enough rows for two tokenisation worker processes (one per 20k rows)."""
    path.write_text("".join(json.dumps({"prompt": f"{i % 97}+{i % 89}=", "response": str(i % 97 + i % 89)}) + "\n"
                            for i in range(rows)))
    return path


def _tokenising(cache: Path, launcher: subprocess.Popen, timeout: float = 300) -> list:
    """Wait until the launcher's tokenisation pool runs (a temp entry in the cache, worker children): the workers."""
    deadline = time.monotonic() + timeout
    while True:
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "tokenisation did not start in time"
        temps = list((cache / "tokens").glob(".*.tmp-*")) if (cache / "tokens").is_dir() else []
        kids = _tree(launcher.pid)
        if temps and len(kids) >= 2:
            return kids
        time.sleep(0.1)


@pytest.mark.slow
def test_signals_while_the_launcher_tokenises(w, tmp_path):
    """SIGTERM: one line, exit 143, no worker left, no temp dir in the cache. kill -9: no worker left (they die with
    their parent); the temp dir it leaves is removed by the next run that opens the cache."""
    from upcycle_ds.data import DataConfig, prepare_cache
    from upcycle_ds.data.cache import cache_root

    data = _big_data(tmp_path / "big.jsonl")
    cache = tmp_path / "cache"
    cmd = [*cli("train"), "--nproc", "2", "--model", str(w["moe"]), "--data", str(data),
           "--out", str(tmp_path / "run"), "--data-cache", str(cache), "--max-length", "64", "--wandb-mode",
           "disabled"]

    term = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers = _tokenising(cache, term)
    term.send_signal(signal.SIGTERM)
    assert term.wait(timeout=120) == 128 + signal.SIGTERM
    err = term.stderr.read()
    assert "Traceback" not in err and err.strip().splitlines() == ["upcycle-ds train: terminated (SIGTERM)"], err
    assert _gone(workers, timeout=10) == []
    assert list((cache / "tokens").iterdir()) == []

    kill = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers = _tokenising(cache, kill)
    kill.kill()
    kill.wait()
    assert _gone(workers, timeout=10) == []
    stale = list((cache / "tokens").glob(".*.tmp-*"))
    assert stale
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(w["moe"])
    prepare_cache(DataConfig(data=str(w["data"]), max_length=64, cache_dir=str(cache)), tok)  # another run
    assert not any(p.exists() for p in stale) and cache_root(str(cache)) == cache


# ------------------------------------------------------------------------------- kill -9 of a training launcher
@pytest.mark.slow
def test_kill_9_of_the_launcher_ends_every_rank_and_helper(w, tmp_path):
    """A real `upcycle-ds train --nproc 2` (W&B offline: its service is one of the helpers) killed with SIGKILL while
    it trains: the `deepspeed` launcher, both ranks and every helper end within seconds, no export appears, and a
    new job can take OUT only once none of them is left."""
    out = tmp_path / "run"
    wandb = {f"WANDB_{k}": str(tmp_path / "wandb") for k in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR")}
    cmd = [*cli("train"), "--nproc", "2", "--model", str(w["moe"]), "--data", str(w["data"]),
           "--out", str(out), "--ep-size", "2", "--zero-stage", "1", "--dtype", "fp32", "--max-steps", "100000",
           "--micro-batch-size", "1", "--max-length", "64", "--wandb-mode", "offline", "--eval-fraction", "0",
           "--save-every", "1000"]
    launcher = subprocess.Popen(cmd, env={**_env(), **wandb}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file():  # both ranks up and training
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the job did not start training in time"
            time.sleep(0.2)
        job = _tree(launcher.pid)
        ranks = [p for p in job if "upcycle_ds.cli" in p.cmdline() and "RANK" in p.environ()]
        assert len(ranks) == 2 and len(job) >= 4, [p.cmdline() for p in job]  # deepspeed, launch.py, 2 ranks, ...
        job += [c for r in ranks for c in r.children(recursive=True) if c not in job]

        launcher.kill()
        t0 = time.monotonic()
        while True:  # OUT is taken by a new job only once no process of the old one is left
            try:
                with RunLock(out):
                    assert [p for p in job if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
                break
            except UserError:
                assert time.monotonic() - t0 < 60, [p.cmdline() for p in job if p.is_running()]
                time.sleep(0.05)
        assert _gone(job, timeout=30) == []
        print(f"kill -9: job gone after {time.monotonic() - t0:.1f} s")
        assert not (out / "hf").exists()
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launcher.wait()
