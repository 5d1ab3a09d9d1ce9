"""One job per run directory: `RunLock(out_dir)` holds an exclusive lock on OUT/.lock for the life of the job.

    with RunLock(out_dir):          # UserError (one line naming the holder) if another live job holds it
        ... train ...

The lock is `fcntl.flock` on OUT/.lock, so the kernel drops it when the holder dies (kill -9, node reboot on a
local disk): a dead job's lock is stale by construction and the next job takes it. The file names the holder
(host, pid, start time, command) for the error message. Works on local disks and on NFS (Linux maps flock to NFS
byte-range locks); on a file system without locks (flock fails with ENOLCK / EOPNOTSUPP) the holder recorded in the
file decides instead: free if empty, or if it is a process of this host that no longer exists.

Who takes it: `upcycle-ds train/sft/router-init --nproc N` (the launcher, before it starts ranks) and, for jobs
started without it (`deepspeed ...`, `torchrun`, `srun` in slurm/*.sbatch), rank 0 of the job. The launcher hands
its ranks the lock's token in the environment (`child_env()`, variable UPCYCLE_DS_RUN_LOCK), and a rank 0 holding
that token sees the lock as its own (`RunLock.inherited`) instead of as another job's.

The ranks an `upcycle-ds` launcher starts also hold OUT/.lock.writers shared (`hold_writer`, from
`launch.lifeline.hold_run`) for as long as they live; a new job that got OUT/.lock still refuses OUT while anyone
holds that, so a job whose launcher was killed (kill -9) keeps OUT until its last rank is gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from ..errors import UserError

LOCK_NAME = ".lock"
WRITERS_NAME = ".lock.writers"
ENV = "UPCYCLE_DS_RUN_LOCK"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """Exclusive lock of a run directory for one job (context manager; `acquire()` / `release()` also work).

    `out_dir` is created if missing. Raises UserError when another live job holds the lock or the directory cannot
    be written. `inherited` is True when the lock is held by the launcher that started this process."""

    def __init__(self, out_dir: str | Path, flag: str = "--out"):
        self.dir = Path(out_dir)
        self.path = self.dir / LOCK_NAME
        self.flag = flag
        self.token: str | None = None
        self.inherited = False
        self.created_dir = False
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "RunLock":
        try:
            if not self.dir.is_dir():
                self.dir.mkdir(parents=True)
                self.created_dir = True
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"{self.flag} {self.dir}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            if holder.get("token") and holder.get("token") == os.environ.get(ENV):
                self.inherited, self.token = True, holder["token"]
                return self
            raise UserError(f"{self.flag} {self.dir} is in use by another job ({_describe(holder)}); wait for it to "
                            f"end or use another {self.flag}") from None
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                os.close(fd)
                raise UserError(f"{self.flag} {self.dir}: cannot lock {self.path} ({e.strerror})") from None
            holder = _read(fd)  # no locks on this file system: the recorded holder decides
            if holder and not _stale(holder) and holder.get("token") != os.environ.get(ENV):
                os.close(fd)
                raise UserError(f"{self.flag} {self.dir} is in use by another job ({_describe(holder)}); if that "
                                f"job is gone, delete {self.path}") from None
        if _writers_busy(self.dir):
            os.close(fd)
            raise UserError(f"{self.flag} {self.dir} is still being written by processes of an earlier job (its "
                            f"launcher is gone; they end within seconds); wait for them or use another "
                            f"{self.flag}") from None
        self.token = uuid.uuid4().hex
        _write(fd, {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]})
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the file stays: deleting a lock file races with a job about to lock it)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def child_env(self) -> dict[str, str]:
        """Environment for processes this job starts, so that they see the lock as theirs."""
        return {ENV: self.token} if self.token else {}

    def discard_dir(self) -> None:
        """After `release()`: remove the run dir if `acquire()` created it and nothing but the lock file is in it."""
        if self.created_dir and self._fd is None:
            try:
                if {p.name for p in self.dir.iterdir()} <= {LOCK_NAME, WRITERS_NAME}:
                    self.path.unlink(missing_ok=True)
                    (self.dir / WRITERS_NAME).unlink(missing_ok=True)
                    self.dir.rmdir()
            except OSError:
                pass


def check_free(out_dir: str | Path, flag: str = "--out") -> None:
    """Fail fast, creating nothing, if a live job holds `out_dir`'s lock (the lock itself is taken later, with
    `RunLock`, which decides; this only spares a second launch the checks it would do before finding out)."""
    path = Path(out_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        if _writers_busy(Path(out_dir)) and os.environ.get(ENV) is None:
            raise UserError(f"{flag} {out_dir} is still being written by processes of an earlier job (its launcher "
                            f"is gone; they end within seconds); wait for them or use another {flag}")
    except BlockingIOError:
        holder = _read(fd)
        if not (holder.get("token") and holder.get("token") == os.environ.get(ENV)):
            raise UserError(f"{flag} {out_dir} is in use by another job ({_describe(holder)}); wait for it to end "
                            f"or use another {flag}") from None
    except OSError:
        pass
    finally:
        os.close(fd)


def hold_writer(out_dir: str | Path) -> int | None:
    """Hold OUT/.lock.writers shared until this process (and every child it forked) has ended: OUT counts as in use
    meanwhile (see the module docs). Returns the descriptor (None where the file system has no locks)."""
    try:
        fd = os.open(Path(out_dir) / WRITERS_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return None
    return fd


def _writers_busy(out_dir: Path) -> bool:
    """Some process holds OUT/.lock.writers (a rank of a job, perhaps one whose launcher was killed)."""
    try:
        fd = os.open(out_dir / WRITERS_NAME, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        data = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(fd: int, holder: dict) -> None:
    data = (json.dumps(holder) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('started', '?')}"


def _stale(holder: dict) -> bool:
    """A holder recorded on this host whose process no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
