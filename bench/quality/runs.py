"""Run `upcycle-ds` subcommands as child processes (what a user runs), logged and timed; skip finished stages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from bench.cli_cmd import ROOT, cli, cli_env


def child_env() -> dict:
    env = cli_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["WANDB_MODE"] = "disabled"
    return env


class Runner:
    """`cli(name, [subcommand, flags...], done=PATH)`: runs `python -m upcycle_ds.cli ...` unless PATH exists
    (the stage finished earlier); its output goes to LOGS/name.log; its wall and CPU time are kept in `self.times`,
    `self.cpu` and LOGS/times.json."""

    def __init__(self, logs: Path, echo=print):
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.record = self.logs / "times.json"  # kept across invocations: a rerun that skips a stage keeps its times
        old = json.loads(self.record.read_text()) if self.record.exists() else {}
        self.times: dict[str, float] = old.get("wall_s", {})
        self.cpu: dict[str, float] = old.get("cpu_s", {})  # user + sys seconds of the child (and its children)
        self.lock = threading.Lock()
        self.echo = echo
        self.t0 = time.time()

    def cli(self, name: str, argv: list[str], *, done: Path, clean: Path | None = None) -> None:
        if done.exists():
            self.echo(f"[{self.elapsed()}] {name}: done earlier ({done})")
            return
        if clean is not None and clean.exists():
            shutil.rmtree(clean)  # an unfinished run of an earlier invocation
        cmd = cli(*argv)
        log = self.logs / f"{name}.log"
        self.echo(f"[{self.elapsed()}] {name}: upcycle-ds {' '.join(map(str, argv))}")
        t = time.time()
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time, also when chains run in parallel
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
        with self.lock:
            self.times[name] = round(time.time() - t, 1)
            self.cpu[name] = round(usage.ru_utime + usage.ru_stime, 1)
            self.record.write_text(json.dumps({"wall_s": self.times, "cpu_s": self.cpu}, indent=1))
        if rc != 0 or not done.exists():
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
            raise SystemExit(f"{name} failed (exit {rc}); last lines of {log}:\n{tail}")
        self.echo(f"[{self.elapsed()}] {name}: {self.times[name]} s wall, {self.cpu[name]} s CPU")

    def chains(self, chains: list, parallel: int) -> None:
        """Run callables (each a chain of `cli` calls) with at most `parallel` at a time (1: one after another)."""
        if parallel <= 1:
            for c in chains:
                c()
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            for f in [pool.submit(c) for c in chains]:
                f.result()

    def elapsed(self) -> str:
        s = int(time.time() - self.t0)
        return f"{s // 60:02d}:{s % 60:02d}"


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, held-out loss) from a training run's metrics.jsonl (`eval/loss` records)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "eval/loss" in r:
            out[int(r["step"])] = float(r["eval/loss"])
    return sorted(out.items())


def train_seconds(run_dir: Path) -> float:
    """Sum of the logged optimizer-step times of a run (no start-up, eval or export)."""
    return sum(float(json.loads(l).get("train/step_time_s", 0.0)) for l in (run_dir / "metrics.jsonl").read_text()
               .splitlines())
