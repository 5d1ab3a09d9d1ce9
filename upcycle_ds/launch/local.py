"""Start N ranks of a training command on this node with the `deepspeed` launcher, and own them until they end
(`upcycle-ds train/sft/router-init --nproc N`, after `train.preflight` checked the run).

`launch_local`: take the run directory's lock (`RunLock`: no second job in one --out), re-check OUT under it,
hand the resolved settings to the ranks in the environment (`--config env:UPCYCLE_DS_ARGS`: no shared file a
second launch could overwrite; rank 0 records what runs in OUT/{COMMAND}_args.yaml), then run the `deepspeed`
launcher (`python -m deepspeed.launcher.runner --num_gpus N --master_port P --module upcycle_ds.cli COMMAND --config
env:UPCYCLE_DS_ARGS`: this interpreter, no console script needed) in its own process group. The ranks' accelerator
comes from the hardware (`launch.accelerator.choose`: cuda where torch sees a CUDA device, a contradicting
DS_ACCELERATOR overridden), named in the start line. SIGTERM / SIGINT / SIGHUP to this process stop the launcher and
every rank (the whole group: SIGTERM, then SIGKILL after a grace period); the exit code is then 128 + signal, with
one line on stderr. If this process is killed outright (kill -9, the OOM killer), the job dies with it
(`launch.lifeline`). On CPU it sets OMP_NUM_THREADS = cores / N (the launcher does not) unless set.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..cli_args import dump_settings, settings_of
from ..errors import Terminated, UserError
from ..library_logs import launcher_flags
from . import accelerator
from .dist_env import free_port
from .lifeline import die_with_parent, launcher_env
from .run_lock import RunLock

ARGS_ENV = "UPCYCLE_DS_ARGS"
GRACE_S = 15.0
"""Seconds the ranks get to end after SIGTERM before the launcher SIGKILLs what is left of the job."""

def launched_by_a_launcher() -> bool:
    return "RANK" in os.environ or "LOCAL_RANK" in os.environ or "SLURM_STEP_ID" in os.environ


# ------------------------------------------------------------------------------------------------------- launch
def launch_local(args, command: str = "train", check=None) -> int:
    """Start `args.nproc` ranks of `upcycle-ds COMMAND` with the run's settings, holding OUT's lock until they end.

    `check()` (e.g. `check_run_dir`) runs again under the lock, before anything is written."""
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("deepspeed is not installed in this Python environment (pip install deepspeed)")
    out = Path(args.out)
    lock = RunLock(out)
    lock.acquire()
    try:
        if check is not None:
            check()
        text = dump_settings({**settings_of(args), "nproc": None}, type(args))
    except BaseException:
        lock.release()
        lock.discard_dir()
        raise
    try:
        env = dict(os.environ)
        env[ARGS_ENV] = text
        env.update(lock.child_env())
        env.update(launcher_env())  # the ranks end the job if this process dies (launch.lifeline)
        acc = accelerator.choose(env)
        env[accelerator.ENV] = acc.name
        if acc.name == "cpu":
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
        # the launcher as a module of this interpreter: no `deepspeed` console script needed on PATH
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *launcher_flags(), "--num_gpus", str(args.nproc),
               "--master_port", str(free_port()), "--no_local_rank", "--module", "upcycle_ds.cli", command,
               "--config", f"env:{ARGS_ENV}"]
        print(f"[upcycle-ds {command}] launching {args.nproc} rank{'s' if args.nproc != 1 else ''}, "
              f"{acc.describe()}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        return run_job(cmd, env)
    finally:
        lock.release()


_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_job(cmd: list[str], env: dict, grace_s: float = GRACE_S) -> int:
    """Run `cmd` in a new process group and return its exit code; a SIGTERM / SIGINT / SIGHUP to this process ends
    the whole group (SIGTERM, SIGKILL after `grace_s`), then raises `Terminated(signal)`; a SIGUSR1 is passed on to
    the ranks (they save at the next logging step and exit: `kill -USR1` before a wall-time limit). Whatever the
    outcome, no process of the group outlives this call."""
    got: list[int] = []
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # the job inherits an ignored SIGUSR1: the `deepspeed` launcher survives it, the ranks catch it
        usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)

    def on_signal(signum, frame):
        if not got:
            got.append(signum)
            _kill_group(proc.pid, signal.SIGTERM)

    def pass_on(signum, frame):  # SIGUSR1: the ranks save at their next logging step and exit (a time limit)
        _kill_group(proc.pid, signum)

    old = {s: signal.signal(s, on_signal) for s in _FORWARDED} if main_thread else {}
    if main_thread:
        signal.signal(signal.SIGUSR1, pass_on)
        old[signal.SIGUSR1] = usr1
    try:
        deadline = None
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if got and deadline is None:
                deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                _kill_group(proc.pid, signal.SIGKILL)
        _end_group(proc.pid, grace_s)
    except BaseException:
        _kill_group(proc.pid, signal.SIGKILL)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        raise Terminated(got[0])  # the CLI prints one line and exits 128 + signal
    return rc


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Some process of group `pgid` is still running (zombies, which an init that does not reap leaves, do not
    count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _end_group(pgid: int, grace_s: float) -> None:
    """The group's leader has exited: ranks it left behind get SIGTERM, then SIGKILL after `grace_s`."""
    if not _group_alive(pgid):
        return
    _kill_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _kill_group(pgid, signal.SIGKILL)
