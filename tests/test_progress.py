"""Progress in a batch log: without a TTY one line every ~30 s and one at the end (done/total, rate, ETA)."""

from __future__ import annotations

import io
import re

from upcycle_ds.progress import Progress


def test_lines_without_a_tty():
    out = io.StringIO()
    with Progress(10, "upcycle-ds upcycle", "tensors", every_s=0.0, stream=out, tty=False) as bar:
        for _ in range(10):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # one per update (every_s=0) + the final one
    assert re.fullmatch(r"\[upcycle-ds upcycle\] 10/10 tensors \(100%\) \| \S+ tensors/s \| elapsed \d+m\d\ds \| "
                        r"ETA 0m00s", lines[-1]), lines[-1]
    assert lines[0].startswith("[upcycle-ds upcycle] 1/10 tensors (10%)")


def test_quiet_between_intervals():
    out = io.StringIO()
    with Progress(1000, "upcycle-ds convert", "tensors", every_s=3600, stream=out, tty=False) as bar:
        for _ in range(1000):
            bar.update(1)
    assert out.getvalue().count("\n") == 1  # only the closing line
