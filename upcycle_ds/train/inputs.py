"""What a training run (train / sft / router-init) reads and writes, for the check that it never writes over or
inside one of its inputs (`io.paths.check_apart`): `train --model RUN/hf --out RUN` would replace the starting model
with the trained export; a --data-cache inside a data directory would be read back as data."""

from __future__ import annotations

from ..io.paths import check_apart


def run_inputs(args) -> list[tuple[str, object]]:
    """(flag, path) of every local input of a TrainArgs-like object: the model, the data, eval data and seed data
    files, the DeepSpeed config, router prompts."""
    from ..data.sources import local_paths

    pairs: list[tuple[str, object]] = [("--model", getattr(args, "model", None)),
                                       ("--ds-config", getattr(args, "ds_config", None)),
                                       ("--prompts", getattr(args, "prompts", None))]
    for flag, field in (("--data", "data"), ("--eval-data", "eval_data")):
        pairs += [(flag, p) for p in local_paths(getattr(args, field, None))]
    return pairs


def check_run_apart(args) -> None:
    """OUT and the data cache (`--data-cache`, written by the run) are apart from every input (UserError naming
    both). One call in the launcher's checks and one in each rank's."""
    from ..data.cache import cache_root

    inputs = run_inputs(args)
    check_apart(args.out, inputs)
    check_apart(cache_root(getattr(args, "data_cache", None)), inputs, what="the data cache")
