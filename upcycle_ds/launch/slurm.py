"""Slurm facts a rank needs: host lists, node addresses, tasks per node, a per-job port.

The parsers are pure (tested with real Slurm-style strings); `hostnames` and `node_addr` ask `scontrol` first, since
only the cluster knows a node's address, and fall back to the pure parser when `scontrol` is not on PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess

# A job's rendezvous port: stable for the job (also across requeues: same job id) and outside Linux's ephemeral
# range (32768-60999), so two jobs sharing a node do not collide unless their ids differ by a multiple of the span.
PORT_BASE, PORT_SPAN = 20000, 12000


def master_port_for_job(job_id: str | int) -> int:
    """The MASTER_PORT of Slurm job `job_id` (the sbatch scripts use the same rule in bash)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def parse_tasks_per_node(spec: str) -> list[int]:
    """`SLURM_TASKS_PER_NODE` / `SLURM_STEP_TASKS_PER_NODE` -> tasks on each node: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot parse Slurm tasks-per-node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside brackets: "a[1,3],b" -> ["a[1,3]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p for p in parts if p]


def expand_hostlist(nodelist: str) -> list[str]:
    """Pure version of `scontrol show hostnames`: "gpu[01-02,7],cpu-a[1-2]x" -> gpu01 gpu02 gpu07 cpu-a1x cpu-a2x.

    Zero padding follows the range's first bound, as Slurm does; several bracket groups in one name multiply out.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, rest = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"cannot parse Slurm host list {nodelist!r}")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts += [prefix + str(n).zfill(len(lo)) + tail for tail in (expand_hostlist(rest) if rest else [""])]
    return hosts


def parse_node_addr(scontrol_show_node: str) -> str | None:
    """The `NodeAddr=` of `scontrol show node NAME` output (one-line or multi-line form)."""
    m = re.search(r"\bNodeAddr=(\S+)", scontrol_show_node)
    return m.group(1) if m else None


def _scontrol(*args: str) -> str | None:
    exe = shutil.which("scontrol")
    if exe is None:
        return None
    out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
    return out.stdout if out.returncode == 0 else None


def hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm node list with `scontrol show hostnames` (pure parser when scontrol is absent)."""
    out = _scontrol("show", "hostnames", nodelist)
    return out.split() if out else expand_hostlist(nodelist)


def node_addr(node: str) -> str:
    """The address other nodes reach `node` at: its NodeAddr (the node name itself when Slurm does not say)."""
    out = _scontrol("show", "node", "-o", node)
    return (parse_node_addr(out) if out else None) or node
