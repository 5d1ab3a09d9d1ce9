"""A real two-node Slurm cluster on this machine, for tests (Debian slurm-wlm 22.05 + munge; no mocks).

Use the session fixture `slurm_cluster` (import it into a test module or conftest.py):

    from slurm_cluster import slurm_cluster  # noqa: F401  (pytest fixture)

    def test_x(slurm_cluster, tmp_path):
        job = slurm_cluster.submit("slurm/train.sbatch", "cfg.yaml", str(tmp_path), sbatch_args=["--nodes=2"])
        assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"

What the fixture does: installs `slurm-wlm` + `munge` with apt-get when a daemon is missing (needs root; ~15 s once),
writes slurm.conf / gres.conf in a temp dir -- 2 nodes `node1`, `node2` at NodeAddr 127.0.0.11 / 127.0.0.12 (both
loopback), each slurmd on its own Port, 2 CPUs and 2 fake GPUs each (the gres files are empty regular files, so
`--gpus-per-node=2` schedules but no device exists) -- starts a private munged (own key and socket, as the munge
user), slurmctld and one slurmd per node, exports SLURM_CONF, and waits until both nodes are idle; at the end it
cancels jobs, stops the daemons and removes the dir. Node names do not resolve here: jobs find the master through
`scontrol show node` (NodeAddr), as on clusters where NodeAddr differs from the name. /etc/hosts is not touched.

Skips (with the reason) only where Slurm cannot run at all: not Linux, or the daemons are missing and this process
cannot install them (not root, no apt-get). A failing install or daemon start is an error, not a skip.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NODES = ("node1", "node2")
# Loopback addresses that differ from 127.0.0.1 (the single-process default), so a test sees that the master
# address really came from NodeAddr. All of 127/8 is loopback on Linux.
NODE_ADDRS = ("127.0.0.11", "127.0.0.12")
CRED_EXPIRE_S = 8
BINARIES = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch", "/usr/bin/srun",
            "/usr/bin/scontrol")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}
# Variables that must not leak from the test process into jobs (a test run inside a Slurm job or under torchrun).
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def slurm_unavailable_reason() -> str | None:
    """Why Slurm cannot run here at all, or None when it is installed or installable."""
    if not sys.platform.startswith("linux"):
        return f"Slurm daemons need Linux (this is {sys.platform})"
    if all(os.path.exists(b) for b in BINARIES) and _has_user("munge"):
        return None if os.geteuid() == 0 else "slurmd/munged must run as root to start job steps (not root)"
    if os.geteuid() != 0:
        return "slurm-wlm/munge are not installed and installing them needs root"
    if shutil.which("apt-get") is None:
        return "slurm-wlm/munge are not installed and there is no apt-get to install them"
    return None


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def ensure_slurm_installed() -> float:
    """apt-get install slurm-wlm + munge unless already there; returns the seconds spent (0 when nothing to do)."""
    if all(os.path.exists(b) for b in BINARIES) and _has_user("munge"):
        return 0.0
    t0 = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]
    out = subprocess.run(install, env=env, capture_output=True, text=True)
    if out.returncode != 0:  # stale or missing package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, text=True)
        out = subprocess.run(install, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"apt-get install slurm-wlm munge failed ({out.returncode}):\n{out.stdout[-3000:]}"
                           f"\n{out.stderr[-3000:]}")
    return time.monotonic() - t0


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def parse_kv(line: str) -> dict[str, str]:
    """`scontrol show ... -o` one-line output -> {key: value} (values may contain spaces)."""
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"(?:^|\s)([A-Za-z][\w:/.]*)=(.*?)(?=\s+[A-Za-z][\w:/.]*=|$)", line.strip())}


@dataclass
class SlurmCluster:
    root: Path
    """Temp dir holding slurm.conf, state, spool, daemon logs; removed at stop()."""
    conf: Path
    nodes: tuple[str, ...] = NODES
    install_s: float = 0.0
    """Seconds apt-get took in this session (0 when Slurm was already installed)."""
    start_s: float = 0.0
    """Seconds from launching the daemons until both nodes were idle."""
    _procs: list[subprocess.Popen] = field(default_factory=list)

    # -- clients -----------------------------------------------------------------------------------------------
    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for Slurm clients and jobs: ours, minus foreign Slurm/launcher variables, plus SLURM_CONF."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _LAUNCHER_VARS}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def submit(self, script: str | os.PathLike, *args: str, env: dict[str, str] | None = None,
               sbatch_args: list[str] | tuple[str, ...] = (), cwd: str | os.PathLike | None = None) -> int:
        """`sbatch [sbatch_args] script args...` with `env` added to the job's environment; returns the job id."""
        out = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(script), *map(str, args)], env=self.env(env),
                             capture_output=True, text=True, timeout=30, cwd=cwd)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed ({out.returncode}): {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, NodeList, Restarts, ...)."""
        return parse_kv(self.run("scontrol", "show", "job", "-o", str(job_id)).stdout)

    def state(self, job_id: int) -> str:
        return self.job(job_id)["JobState"]

    def wait(self, job_id: int, timeout: float = 60, poll: float = 0.2) -> str:
        """Poll `scontrol show job` until the job reaches a final state; return it (COMPLETED, FAILED, ...).

        On timeout the job is cancelled and TimeoutError carries its record and the daemon log tails.
        """
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(job_id)
            if state in FINAL_STATES:
                return state
            if time.monotonic() > deadline:
                info = self.job(job_id)
                self.run("scancel", str(job_id), check=False)
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s: {info}\n{self.daemon_logs()}")
            time.sleep(poll)

    def wait_for(self, predicate, timeout: float = 60, poll: float = 0.1, what: str = "condition"):
        """Poll `predicate()` until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not met after {timeout} s\n{self.daemon_logs()}")
            time.sleep(poll)
        return value

    @staticmethod
    def read_log(path: str | os.PathLike) -> str:
        """A job's log file (batch --output or a per-rank srun --output); '' when it was never written."""
        path = Path(path)
        return path.read_text(errors="replace") if path.exists() else ""

    def daemon_logs(self, tail: int = 15) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"== {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- daemons -----------------------------------------------------------------------------------------------
    def _start(self, cmd: list[str], name: str) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
        log.close()
        self._procs.append(proc)
        return proc

    def start(self, timeout: float = 30) -> None:
        t0 = time.monotonic()
        munge_dir = self.root / "munge"
        self._start(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground",
                     f"--socket={munge_dir / 'munge.socket'}", f"--key-file={munge_dir / 'munge.key'}",
                     f"--pid-file={munge_dir / 'munged.pid'}", f"--seed-file={munge_dir / 'munged.seed'}",
                     f"--log-file={munge_dir / 'munged.log'}"], "munged")
        self.wait_for(lambda: (munge_dir / "munge.socket").exists(), timeout, what="munged socket")
        self._start(["/usr/sbin/slurmctld", "-D", "-c", "-i", "-f", str(self.conf)], "slurmctld")
        for node in self.nodes:
            self._start(["/usr/sbin/slurmd", "-D", "-f", str(self.conf), "-N", node], f"slurmd-{node}")

        def idle():
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}\n{self.daemon_logs()}")
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            return dict(zip(out[::2], out[1::2])) == {n: "idle" for n in self.nodes}

        self.wait_for(idle, timeout, what="both nodes idle")
        self.start_s = time.monotonic() - t0

    def stop(self) -> None:
        """Cancel all jobs, wait briefly for their steps to end, stop the daemons, remove the temp dir."""
        try:
            ctld_running = len(self._procs) > 1 and self._procs[1].poll() is None  # [munged, slurmctld, slurmds]
            if ctld_running:
                self.run("scancel", "--full", "--user=root", check=False)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.2)
        finally:
            for proc in reversed(self._procs):  # slurmds, slurmctld, then munged
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in reversed(self._procs):
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            shutil.rmtree(self.root, ignore_errors=True)


def write_config(root: Path, nodes=NODES, cpus: int = 2, gpus: int = 2) -> Path:
    """slurm.conf + gres.conf + a private munge key under `root`; returns the slurm.conf path."""
    import pwd

    for d in ("state", "log", "munge", *(f"spool-{n}" for n in nodes)):
        (root / d).mkdir()
    munge = pwd.getpwnam("munge")
    munge_dir = root / "munge"
    key = munge_dir / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    for p in (munge_dir, key):
        os.chown(p, munge.pw_uid, munge.pw_gid)
    munge_dir.chmod(0o755)  # munged wants its socket dir reachable by all

    ctld_port, *node_ports = _free_ports(1 + len(nodes))
    gres_lines = []
    node_lines = []
    for i, (node, port) in enumerate(zip(nodes, node_ports)):
        files = []
        for g in range(gpus):
            f = root / f"fakegpu-{node}-{g}"
            f.touch()
            files.append(str(f))
        if gpus:
            gres_lines.append(f"NodeName={node} Name=gpu File={','.join(files)}")
        node_lines.append(f"NodeName={node} NodeAddr={NODE_ADDRS[i]} Port={port} CPUs={cpus} RealMemory=2000"
                          + (f" Gres=gpu:{gpus}" if gpus else "") + " State=UNKNOWN")
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        f"ClusterName=upds{os.getpid()}",
        f"SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire: job credential lifetime, also how long a requeued job is held (Reason=BeginTime) before it may
        # start again on the nodes that revoked its credential. Default 120 s; starting it earlier (scontrol update
        # StartTime=now) fails the job with "Job credential revoked".
        f"AuthInfo=socket={munge_dir / 'munge.socket'},cred_expire={CRED_EXPIRE_S}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SlurmdParameters=config_overrides",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        # A job that becomes eligible by time (a requeued job after its hold) waits for the next periodic scheduler
        # pass: main loop every 60 s and backfill every 30 s by default.
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        "KillWait=5",  # seconds between SIGTERM and SIGKILL when a step is torn down (clusters use ~30)
        "MinJobAge=600",  # keep finished jobs visible to `scontrol show job` for the whole session
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool-%n'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        *(["GresTypes=gpu"] if gpus else []),
        *node_lines,
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n")
    (root / "gres.conf").write_text("\n".join(gres_lines) + "\n")
    return conf


def start_cluster() -> SlurmCluster:
    install_s = ensure_slurm_installed()
    root = Path(tempfile.mkdtemp(prefix="upcycle-ds-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root=root, conf=write_config(root), install_s=install_s)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running 2-node Slurm cluster (see module docstring); SLURM_CONF is exported while it runs."""
    reason = slurm_unavailable_reason()
    if reason:
        pytest.skip(f"no Slurm: {reason}")
    cluster = start_cluster()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(cluster.conf))
        try:
            yield cluster
        finally:
            cluster.stop()
