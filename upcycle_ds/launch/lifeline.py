"""Every process of a job dies with the `upcycle-ds` launcher that started it, whatever ended the launcher (kill -9,
the OOM killer, `scancel -s KILL`), and the run dir stays locked until the last of them is gone.

The launcher (`upcycle-ds train/sft/router-init --nproc N`, or `upit --nproc N`) owns three kinds of processes:

- the `deepspeed` launcher it starts (`run_job`): started with the parent-death signal (`prctl(PR_SET_PDEATHSIG,
  SIGKILL)`, `die_with_parent`), so the kernel kills it the moment the launcher dies;
- the ranks the `deepspeed` launcher starts, and their helpers (data loader workers, W&B's service in a session
  of its own): the launcher puts its pid and start time in the environment (`launcher_env`); each rank runs a
  watchdog thread (`hold_run`) that waits for that process to end (a pidfd, else polling) and then SIGKILLs the
  job — the process group `run_job` created and every descendant of it — waits until they are gone, and last
  itself. A rank that starts after the launcher is already gone does that at once;
- worker processes forked in the launcher itself (the `datasets` tokenisation pool while it fills the data cache):
  `arm_forked_children` makes every child forked from then on die with its parent (PR_SET_PDEATHSIG), leave SIGTERM
  to its default (a SIGTERM sent to the whole job ends a worker quietly; the launcher unwinds once) and ignore
  SIGINT (Ctrl-C reaches the launcher, which stops its pool), so neither a kill -9 nor a signal leaves a worker or a
  traceback behind.

The lock: the launcher holds OUT/.lock (`run_lock.RunLock`); each rank it started also holds a shared lock on
OUT/.lock.writers for its whole life (`hold_run`; forked children share it). A new job takes OUT/.lock and then
checks that nobody holds OUT/.lock.writers, so while any process of a previous job could still write into OUT — even
after its launcher was killed — OUT counts as in use.

Linux only (prctl, pidfd); elsewhere the watchdog polls and the parent-death signal is skipped.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

ENV = "UPCYCLE_DS_LAUNCHER"
"""`PID:START` of the `upcycle-ds` launcher that started this job (START: its start time in clock ticks since boot,
which tells it from a later process that reuses the pid)."""
_PR_SET_PDEATHSIG = 1


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[19]  # field 22, starttime


def launcher_env() -> dict[str, str]:
    """Environment for the job a launcher starts, naming the launcher (this process)."""
    return {ENV: f"{os.getpid()}:{_start_time(os.getpid()) or ''}"}


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """The kernel sends `sig` to this process when the thread that created it ends (Linux; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------- forked worker children
_armed = False
_forking_parent = 0


def _before_fork() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def _after_fork_in_child() -> None:
    if not _armed:
        return
    die_with_parent()
    if os.getppid() != _forking_parent:  # the parent died before the prctl took effect
        os._exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def arm_forked_children() -> None:
    """From now on, every child this process forks (e.g. `datasets`' worker pool) dies with it, ends quietly on
    SIGTERM and ignores SIGINT (see the module docs). Idempotent."""
    global _armed
    if not _armed and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _armed = True


# ------------------------------------------------------------------------------------------------------ in a rank
class _Hold:
    def __init__(self, fd: int | None, watchdog: threading.Thread | None):
        self.fd, self.watchdog = fd, watchdog


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every live process (zombies left out), from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        f = stat[stat.rfind(")") + 2:].split()  # state ppid pgrp ...
        if f[0] != "Z":
            out[int(d.name)] = (int(f[1]), int(f[2]))
    return out


def _job_processes() -> set[int]:
    """This process's group (the `deepspeed` launcher, every rank) and all their descendants, also those in
    sessions of their own (W&B's service starts one)."""
    procs = _processes()
    pgid = os.getpgrp()
    job = {pid for pid, (_, g) in procs.items() if g == pgid}
    grew = True
    while grew:
        more = {pid for pid, (pp, _) in procs.items() if pp in job and pid not in job}
        job |= more
        grew = bool(more)
    return job


def _end_job() -> None:
    """SIGKILL every process of the job but this one, wait (a few seconds at most) until they are gone, then this
    one: once the last rank has died, nothing of the job is left to write."""
    me = os.getpid()
    try:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            others = _job_processes() - {me}
            if not others:
                break
            for pid in others:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.05)
    except OSError:  # no /proc: the group at least
        pass
    finally:
        try:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        finally:
            os._exit(137)


def _alive(pid: int, start: str) -> bool:
    """Process `pid` exists and is the one that started at `start` (not a later process reusing the pid)."""
    if start:
        return _start_time(pid) == start
    try:  # no /proc: the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _wait_for_exit(pid: int, start: str) -> None:
    """Return when process `pid` (started at `start`) has ended: a pidfd turns readable then; else poll."""
    if not _alive(pid, start):
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (OSError, AttributeError):
        fd = None
    if fd is not None:
        try:
            if _alive(pid, start):  # the pidfd pins the pid: checked again, it is ours
                select.select([fd], [], [])
        finally:
            os.close(fd)
        return
    while _alive(pid, start):
        time.sleep(0.5)


def _watch(spec: str) -> threading.Thread | None:
    try:
        pid_s, start = spec.split(":", 1)
        pid = int(pid_s)
    except ValueError:
        return None

    def run() -> None:
        _wait_for_exit(pid, start)
        print(f"[upcycle-ds] the launcher (pid {pid}) is gone: ending this job", file=sys.stderr, flush=True)
        _end_job()

    t = threading.Thread(target=run, name="upcycle-ds-launcher-watchdog", daemon=True)
    t.start()
    return t


def hold_run(run_dir: str | Path) -> _Hold:
    """In a rank started by an `upcycle-ds` launcher (ENV set): end the job when the launcher ends, and hold the
    run dir's writers lock while this process lives (see the module docs). Elsewhere (srun, torchrun, plain
    `deepspeed`: their own launchers own the processes) nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return _Hold(None, None)
    from .run_lock import hold_writer

    return _Hold(hold_writer(run_dir), _watch(spec))
