"""Progress a person can read in a terminal and in a batch log.

On a terminal: a tqdm bar. Without one (a Slurm log, a pipe), tqdm switches itself off, so a job that streams a
100 GB checkpoint would print nothing for many minutes; there `Progress` prints one line every `every_s` seconds
(default 30) and one at the end, in the format of the training log:

    [upcycle-ds upcycle] 412/1156 tensors (36%) | 3.1 tensors/s | elapsed 2m13s | ETA 4m00s
"""

from __future__ import annotations

import sys
import time


def format_duration(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


class Progress:
    """`with Progress(total, "upcycle-ds upcycle", "tensors") as bar: ... bar.update(1)`."""

    def __init__(self, total: int, prog: str, unit: str, *, every_s: float = 30.0, stream=None, tty: bool | None = None):
        self.total, self.prog, self.unit, self.every_s = total, prog, unit, every_s
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.done, self.t0 = 0, time.monotonic()
        self._last = self.t0
        self._bar = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=prog, unit=unit.rstrip("s") or unit, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = (self.total - self.done) / rate if rate > 0 and self.total else 0.0
        return (f"[{self.prog}] {self.done}/{self.total} {self.unit}{pct} | {rate:.3g} {self.unit}/s | "
                f"elapsed {format_duration(elapsed)} | ETA {format_duration(eta)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.done and self._last != -1:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last = -1

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
