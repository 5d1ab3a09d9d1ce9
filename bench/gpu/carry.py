"""What the GPU machine has, what bench/gpu carries to it as wheels, and the checks between the two.

The GPU machine (no network) has Python 3.12 with `MACHINE`'s packages and whatever they depend on, but not
`NEEDED` (deepspeed, datasets; wandb neither, and the runs use --wandb-mode disabled). The wheels carried are NEEDED
and their dependencies less what the machine surely has (MACHINE and their direct requirements), at the versions
of the environment prepare.sh runs in (the set the tests pass with), all computed here from that environment's
installed metadata:

    carry.py plan                 the distributions to carry, name==version per line (prepare.sh writes them to
                                  WHEELS/MANIFEST.txt and fetches exactly those wheels)
    carry.py install WHEELS SITE  run.sh, on the machine: the folder holds exactly MANIFEST.txt's wheels, for this
                                  Python; every requirement of every carried wheel is met by what the machine has or
                                  by another carried wheel (else one line per mismatch, naming both sides, exit 2);
                                  then `pip install --no-index --no-deps --target SITE` of those the machine lacks
                                  (a folder of its own that run.sh puts on PYTHONPATH: nothing of the machine's
                                  Python changes, and an externally managed Python (PEP 668) takes it too)
    carry.py venv DIR             the CPU rehearsal (run.sh with REHEARSE=cpu): a fresh venv shaped like the GPU
                                  machine, MACHINE's closure linked in from this environment's site-packages, nothing
                                  else (no deepspeed, datasets, wandb, no upcycle_ds, no console script)
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

MACHINE = ("torch", "transformers", "accelerate", "safetensors", "pyyaml", "tqdm", "matplotlib", "numpy", "pytest",
           "psutil", "pyarrow", "triton")
NEEDED = ("deepspeed", "datasets")
NOT_NEEDED = ("wandb", "zstandard")
"""Requirements of upcycle_ds that the GPU runs do not import (--wandb-mode disabled; no .zst data)."""
MANIFEST = "MANIFEST.txt"
ROOT = Path(__file__).resolve().parents[2]
PREFIX = "bench/gpu/run.sh:"


def _requirements(requires: list[str] | None) -> list[Requirement]:
    out = []
    for text in requires or []:
        r = Requirement(text)
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            out.append(r)
    return out


def installed() -> dict[str, md.Distribution]:
    """canonical name -> distribution, of this interpreter's environment (first on sys.path wins)."""
    out: dict[str, md.Distribution] = {}
    for d in md.distributions():
        out.setdefault(canonicalize_name(d.metadata["Name"]), d)
    return out


def closure(names, dists: dict[str, md.Distribution], stop: set[str] = frozenset()) -> dict[str, md.Distribution]:
    """`names` and everything they require (extras off), as installed here, not entering `stop`; names not installed
    are left out."""
    out: dict[str, md.Distribution] = {}
    todo = [canonicalize_name(n) for n in names]
    while todo:
        n = todo.pop()
        if n in out or n in stop or n not in dists:
            continue
        out[n] = dists[n]
        todo += [canonicalize_name(r.name) for r in _requirements(dists[n].requires)]
    return out


def certain_on_machine(dists: dict[str, md.Distribution]) -> set[str]:
    """What the GPU machine surely has: MACHINE and their direct requirements. Deeper ones (transformers -> typer ->
    pydantic) depend on versions we do not know there, so they are carried; run.sh keeps the machine's copy where it
    has one."""
    out = {canonicalize_name(n) for n in MACHINE}
    for n in list(out):
        if n in dists:
            out |= {canonicalize_name(r.name) for r in _requirements(dists[n].requires)}
    return out


def carry_plan() -> dict[str, str]:
    """canonical name -> version of the distributions to carry: NEEDED and what they require, as far as it is not
    something the machine surely has (whose own requirements are the machine's)."""
    dists = installed()
    certain = certain_on_machine(dists)
    return {n: d.version for n, d in sorted(closure(NEEDED, dists, stop=certain).items())}


def project_requirements() -> list[Requirement]:
    """upcycle_ds's own requirements (pyproject.toml [project] dependencies) for this interpreter."""
    import tomllib

    return _requirements(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


# ------------------------------------------------------------------------------------------------------ install
def read_manifest(wheels: Path) -> dict[str, str]:
    lines = (wheels / MANIFEST).read_text().split("\n")
    return dict(line.split("==", 1) for line in lines if line.strip() and not line.startswith("#"))


def wheel_metadata(path: Path) -> tuple[str, str, list[Requirement]]:
    """(canonical name, version, requirements for this interpreter) from a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        msg = Parser().parsestr(z.read(meta).decode("utf-8"))
    return canonicalize_name(msg["Name"]), msg["Version"], _requirements(msg.get_all("Requires-Dist"))


def check(wheels: Path) -> tuple[list[Path], list[str], list[str]]:
    """(wheels to install, what the machine already has, problems: one line each)."""
    problems: list[str] = []
    if not (wheels / MANIFEST).is_file():
        return [], [], [f"{wheels}/{MANIFEST} is missing: run bench/gpu/prepare.sh (on a machine with PyPI access)"]
    want = read_manifest(wheels)
    files = {}
    tags = set(sys_tags())
    for f in sorted(wheels.glob("*.whl")):
        name, version, _, wtags = parse_wheel_filename(f.name)
        files[str(name)] = f
        if want.get(str(name)) != str(version):
            problems.append(f"{f.name} is not in {MANIFEST} (which asks for {name}=={want.get(str(name), 'nothing')})")
        elif not tags & set(wtags):
            problems.append(f"{f.name} does not install on this Python ({sys.version.split()[0]}): run "
                            f"bench/gpu/prepare.sh for it (PY_VERSION={sys.version_info.major}.{sys.version_info.minor})")
    problems += [f"{wheels} lacks the wheel of {n}=={v} listed in {MANIFEST}" for n, v in want.items() if n not in files]
    if problems:
        return [], [], problems
    here = installed()
    have = {n: Version(here[n].version) for n in here}
    carried = {}
    for n, f in files.items():
        name, version, reqs = wheel_metadata(f)
        carried[name] = (Version(version), reqs)
    todo, already = [], []
    for name, (version, _) in carried.items():
        if name in have:
            already.append(f"{name} {have[name]}" + ("" if have[name] == version else f" (carried: {version})"))
        else:
            todo.append(files[name])
    after = {**{n: v for n, (v, _) in carried.items()}, **have}  # the machine's own copy wins (not replaced)
    ours = [r for r in project_requirements() if canonicalize_name(r.name) not in NOT_NEEDED]
    for name, (version, reqs) in [("upcycle_ds", ("(this checkout)", ours)), *carried.items()]:
        for r in reqs:
            dep = canonicalize_name(r.name)
            if dep not in after:
                problems.append(f"{name} {version} needs {r}, which neither this machine nor {wheels} has")
            elif r.specifier and not r.specifier.contains(after[dep], prereleases=True):
                where = "this machine has" if dep in have else "the carried wheel is"
                problems.append(f"{name} {version} needs {r}, but {where} {dep} {after[dep]}")
    return todo, already, problems


def cmd_install(wheels: Path, site: Path) -> int:
    todo, already, problems = check(wheels)
    for line in problems:
        print(f"{PREFIX} {line}", file=sys.stderr)
    if problems:
        return 2
    if already:
        print(f"{PREFIX} already here (kept): {', '.join(already)}")
    if todo:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(site), *map(str, todo)], check=True)
    names = sorted(f"{parse_wheel_filename(f.name)[0]}=={parse_wheel_filename(f.name)[1]}" for f in todo)
    print(f"{PREFIX} installed {len(names)} carried wheels into {site}: {' '.join(names) or 'none'}")
    return 0


# --------------------------------------------------------------------------------------------------------- venv
def cmd_venv(target: Path) -> int:
    """A venv at `target` holding only MACHINE's closure of this environment and pip (linked in)."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(target)], check=True)
    site = Path(subprocess.run([str(target / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path("
                                "'purelib'))"], check=True, capture_output=True, text=True).stdout.strip())
    here = Path(sysconfig.get_path("purelib"))
    dists = closure((*MACHINE, "pip"), installed())
    linked = []
    for name, d in sorted(dists.items()):
        tops = {Path(str(f)).parts[0] for f in d.files or [] if not str(f).startswith("..")}
        for top in sorted(tops):
            src, dst = here / top, site / top
            if src.exists() and not dst.exists() and not top.startswith("__pycache__"):
                dst.symlink_to(src)
        linked.append(f"{name}=={d.version}")
    absent = [n for n in MACHINE if canonicalize_name(n) not in dists]
    print(f"bench/gpu/carry.py venv: {target}: {len(linked)} distributions of the GPU machine's set linked in "
          f"(not in this environment, so not in the venv either: {', '.join(absent) or 'none'})")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["plan"]:
        for name, version in carry_plan().items():
            print(f"{name}=={version}")
        return 0
    if argv[:1] == ["install"] and len(argv) == 3:
        return cmd_install(Path(argv[1]), Path(argv[2]))
    if argv[:1] == ["venv"] and len(argv) == 2:
        return cmd_venv(Path(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
