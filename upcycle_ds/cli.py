"""`upcycle-ds SUBCOMMAND ...`: a map of subcommands to typed functions (each module: `Args` dataclass + `run`).

Subcommand modules are imported only when chosen, so `upcycle-ds --help` is instant. Any `UserError` (and an
OSError such as a full disk or a read-only location) becomes `error: <message>` on stderr, one line, with exit code 2
and no traceback (UPCYCLE_DS_DEBUG=1 shows the traceback of an OSError). SIGTERM (what Slurm and `kill` send) is
handled like Ctrl-C: the running command unwinds, its temp output dir is removed, exit code 128 + signal (also when
a library's clean-up raises something else on the way out). Processes the command forks (worker pools) die with it
and leave the signal to it (`launch.lifeline`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading

from .errors import ReportedByAnotherRank, Terminated, UserError
from .launch.lifeline import arm_forked_children

# name -> (module with `Args` + `run(args)`, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("upcycle_ds.commands.demo", "write a tiny dense model + tokenizer + data to try every command"),
    "upcycle": ("upcycle_ds.commands.upcycle", "HF dense checkpoint -> HF MoE checkpoint (sparse upcycling)"),
    "train": ("upcycle_ds.commands.train", "train an MoE model with DeepSpeed (EP + ZeRO), resume, W&B load tracking"),
    "convert": ("upcycle_ds.commands.convert",
                "convert checkpoints: DeepSpeed MoE <-> HF MoE <-> HF dense, any ep size, streaming"),
    "plan": ("upcycle_ds.commands.plan", "per-rank GPU memory plan for DeepSpeed-MoE training (ep_size, ZeRO)"),
    "upit-assemble": ("upcycle_ds.commands.upit_assemble",
                      "UpIT: dense SFT checkpoints -> HF MoE (one expert each; genetic expansion to E)"),
    "seed-data": ("upcycle_ds.commands.seed_data",
                  "UpIT: pick router seed data (each sample -> its lowest-perplexity expert)"),
    "sft": ("upcycle_ds.commands.sft",
            "UpIT: dense instruction tuning with DeepSpeed, HF checkpoints every fraction of an epoch (the experts)"),
    "router-init": ("upcycle_ds.commands.router_init",
                    "UpIT: pre-train the routers on seed data (LM + BCE to each sample's expert), or init from prompts"),
    "upit": ("upcycle_ds.commands.upit", "UpIT recipe: sft -> assemble -> seed-data -> router-init -> train, resumable"),
    "eval": ("upcycle_ds.commands.eval",
             "score HF dense/MoE checkpoints: multiple choice, exact match, held-out loss; std errors, paired tests"),
    "scripts": ("upcycle_ds.commands.scripts", "copy the shipped Slurm and launch scripts out for editing"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: upcycle-ds SUBCOMMAND [flags]   (upcycle-ds SUBCOMMAND --help for its flags; --version)", "",
             "Turn dense HuggingFace LLMs into DeepSpeed Mixture-of-Experts models.", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher passes `--local_rank=N` (before the subcommand); we read LOCAL_RANK instead."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            continue
        if a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
            continue
        out.append(a)
    return out


@contextlib.contextmanager
def _sigterm_raises():
    """Within: SIGTERM raises `Terminated` in the main thread (so `finally` / temp-dir clean-up runs, as for Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def version_line() -> str:
    """`upcycle-ds X.Y.Z (torch ..., deepspeed ..., transformers ..., python ...)`: what a bug report needs, read from
    the installed packages' metadata (nothing imported: instant)."""
    from importlib import metadata

    from . import __version__

    def installed(pkg: str) -> str:
        try:
            return f"{pkg} {metadata.version(pkg)}"
        except metadata.PackageNotFoundError:
            return f"{pkg} not installed"

    deps = [installed(p) for p in ("torch", "deepspeed", "transformers")]
    return f"upcycle-ds {__version__} ({', '.join(deps)}, python {sys.version.split()[0]})"


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version_line())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"upcycle-ds: error: unknown subcommand {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, desc = COMMANDS[name]
    arm_forked_children()  # worker processes (tokenisation pools, ...) die with this one, quietly on SIGTERM
    try:
        with _sigterm_raises():
            module = importlib.import_module(module_name)
            from .cli_args import parse_into

            try:
                args = parse_into(module.Args, rest, prog=f"upcycle-ds {name}", description=module.__doc__ or desc)
            except SystemExit as e:  # argparse: --help (0) or a bad flag (2, its one line already printed)
                return e.code if isinstance(e.code, int) else 2
            from .library_logs import quiet_libraries

            quiet_libraries()
            try:
                rc = module.run(args)
            except Exception as e:  # a library's clean-up raised while a signal unwound the command
                signum = _signal_behind(e)
                if signum is None:
                    raise
                raise (KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)) from None
    except UserError as e:
        if not isinstance(e, ReportedByAnotherRank):
            print(f"upcycle-ds {name}: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if os.environ.get("UPCYCLE_DS_DEBUG"):
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"upcycle-ds {name}: error: {where}{_one_line(e.strerror or str(e))}", file=sys.stderr)
        return 2
    except Terminated as e:
        what = "interrupted" if e.signum == signal.SIGINT else "terminated"
        print(f"upcycle-ds {name}: {what} ({signal.Signals(e.signum).name})", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"upcycle-ds {name}: interrupted (SIGINT)", file=sys.stderr)
        return 130
    return int(rc or 0)


def _signal_behind(e: BaseException) -> int | None:
    """The signal (Terminated / KeyboardInterrupt) an exception was raised while handling, if any: e.g. `datasets`'
    worker pool raises TimeoutError from its `finally` when SIGTERM interrupts a tokenising map."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, Terminated):
            return e.signum
        if isinstance(e, KeyboardInterrupt):
            return int(signal.SIGINT)
        e = e.__cause__ or e.__context__
    return None


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


if __name__ == "__main__":
    sys.exit(main())
