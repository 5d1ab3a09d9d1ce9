"""`upcycle-ds SUBCOMMAND ...`: a map of subcommands to typed functions (each module: `Args` dataclass + `run`).

Subcommand modules are imported only when chosen, so `upcycle-ds --help` is instant. Any `UserError` becomes
`error: <message>` on stderr with exit code 2 and no traceback.
"""

from __future__ import annotations

import importlib
import sys

from .errors import UserError

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
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: upcycle-ds SUBCOMMAND [flags]   (upcycle-ds SUBCOMMAND --help for its flags)", "",
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


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"upcycle-ds: error: unknown subcommand {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, desc = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        from .cli_args import parse_into

        args = parse_into(module.Args, rest, prog=f"upcycle-ds {name}", description=module.__doc__ or desc,
                          yaml_config=getattr(module, "YAML_CONFIG", False))
        rc = module.run(args)
    except UserError as e:
        print(f"upcycle-ds {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"upcycle-ds {name}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
