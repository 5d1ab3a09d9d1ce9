"""Everything the launcher process checks before any rank of a training command starts (`upcycle-ds
train/sft/router-init --nproc N`), so that bad input is one line on stderr (exit 2): the flags (`TrainArgs.validate`),
the model (config, weight headers and shapes), the regexes of --freeze / --train-only against the parameter names of
the model built on the meta device (no weights), the tokenizer, the data (readable, UTF-8, every row of a known
format, tokenised into the cache the ranks open: enough samples with response tokens for one step), the DeepSpeed
config, and with --resume that OUT/checkpoints is a checkpoint of this model, layout and recorded settings.
`launch_checked` = these checks, then `launch.local.launch_local`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from ..errors import UserError
from ..families import family_for
from ..launch.local import _resolved, launch_local
from ..launch.run_lock import check_free
from .inputs import check_run_apart

RESUME_MUST_MATCH = ("max_length", "seed", "data", "eval_data", "eval_fraction", "max_samples", "freeze",
                     "train_only", "num_experts", "top_k", "layers", "label_field", "mode")
"""Recorded settings a --resume must keep: they fix the model, its parameter groups or the data order a resume
replays. The layout (ranks, ep size, ZeRO stage, dtype, micro batch) may change: the optimizer state is re-partitioned
(`train.elastic`), and the global batch — which must stay — is checked by the ranks. Others (max_steps, save/eval
cadence, W&B, ...) may change too."""


def _num_experts(args) -> int:
    from ..io.hf import read_config

    path = Path(args.model)
    cfg_dir = path
    if (path / "latest").is_file() or not (path / "config.json").is_file():
        cfg_dir = path if (path / "config.json").is_file() else path.parent
    config = read_config(cfg_dir if (cfg_dir / "config.json").is_file() else path)
    family, is_moe = family_for(config)
    if is_moe:
        return family.num_experts(config)
    if args.num_experts is None:
        raise UserError(f"{path} is a dense {config.get('model_type')} checkpoint: pass --num-experts (and --top-k, "
                        f"--layers) to upcycle it on the fly, or run `upcycle-ds upcycle` first")
    return args.num_experts


# ------------------------------------------------------------------------------------------------------ preflight
def preflight(args, world_size: int, *, dense: bool = False, command: str = "train") -> dict:
    """Every check that needs no weights and no ranks (raises UserError); returns the config of the model the ranks
    will build. `dense`: the model is trained as the HF dense model it is (`upcycle-ds sft`)."""
    if world_size < 1:
        raise UserError("--nproc must be >= 1")
    check_run_apart(args)  # OUT and the data cache never over or inside an input (train --model RUN/hf --out RUN)
    if dense:
        from ..train.sources import open_dense_source

        args.validate(world_size)
        source = open_dense_source(args)
        from ..io.hf import HFCheckpoint

        HFCheckpoint(source.path)  # headers, shard names and shapes against config.json
    else:
        from ..train.sources import open_source

        args.validate(world_size, _num_experts(args))
        source = open_source(args)
        family, _ = family_for(source.config)
        args.validate(world_size, family.num_experts(source.config))
        from .offload import check_host_memory

        check_host_memory(args, source.config, world_size)  # --offload-optimizer: the node's RAM holds it
    check_trainable(args, source.config, dense=dense)
    from ..train.config import deepspeed_config

    import torch

    deepspeed_config(args, world_size, torch.cuda.is_available())  # --ds-config: exists, valid JSON
    check_data(args, source, world_size)
    check_run_dir(args, source.config, world_size, command)
    return source.config


def launch_checked(args, command: str = "train", *, dense: bool = False) -> int:
    """`preflight`, then `launch_local` (which repeats the run-dir checks under OUT's lock)."""
    check_free(args.out)
    config = preflight(args, world_size=args.nproc, dense=dense, command=command)
    return launch_local(args, command, check=lambda: check_run_dir(args, config, args.nproc, command))


def meta_param_names(config: dict, *, dense: bool, ep_size: int = 1) -> list[tuple[str, int]]:
    """(name, numel) of every parameter of the model a rank trains, built on the meta device (no weights)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dense:
            import transformers

            from ..surgery import hf_config

            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(hf_config(config))
        else:
            from ..surgery import build_meta_model

            model = build_meta_model(config, ep_size=ep_size)
    return [(n, p.numel()) for n, p in model.named_parameters()]


def check_trainable(args, config: dict, *, dense: bool) -> None:
    """--freeze / --train-only: each regex compiles (TrainArgs.validate) and matches a parameter of the model, and
    together they leave something to train (the rule of `train.optim.apply_freeze`)."""
    if not args.freeze and not args.train_only:
        return
    try:
        params = meta_param_names(config, dense=dense, ep_size=args.ep_size)
    except UserError:
        raise
    except Exception:  # e.g. an ep_size that needs process groups to build: names are the same at ep 1 but for ids
        params = meta_param_names(config, dense=dense)
    names = [n for n, _ in params]
    examples = ", ".join(_example_names(names))
    for flag, pats in (("--freeze", args.freeze), ("--train-only", args.train_only)):
        for pat in pats:
            if not any(re.search(pat, n) for n in names):
                raise UserError(f"{flag} {pat!r} matches no parameter of the model (names look like {examples})")
    only = [re.compile(p) for p in args.train_only]
    fz = [re.compile(p) for p in args.freeze]
    n = sum(k for name, k in params
            if (not only or any(r.search(name) for r in only)) and not any(r.search(name) for r in fz))
    if n == 0:
        raise UserError(f"--freeze {args.freeze} / --train-only {args.train_only} leave no trainable parameter")


def _example_names(names: list[str]) -> list[str]:
    picks = [n for n in names if ".layers.0." in n and ("q_proj" in n or "gate" in n or "experts.0." in n)]
    return (picks[:3] or names[:3]) + ["..."]


def check_data(args, source, world_size: int) -> None:
    """The data sources read, local text files decode as UTF-8, every row has a known format, and the data tokenizes
    (with the model's tokenizer, as the ranks will: into the cache entry they open, `DataConfig.from_args`) into
    enough samples with response tokens for one optimizer step."""
    import logging

    import datasets

    from ..data import DataConfig, num_batches, open_cache, prepare_cache
    from ..data.build import check_data as check_rows
    from ..data.sources import parse_sources
    from ..io.text import check_utf8

    for flag, given in (("--data", args.data), ("--eval-data", args.eval_data)):
        for spec in parse_sources(given) if given else []:
            check_utf8(spec.path, flag)
    label_field = getattr(args, "label_field", None) if getattr(args, "mode", None) == "bce" else None
    cfg = DataConfig.from_args(args, label_field=label_field)
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # an error here must be one line on stderr, not progress bars + the line
    log = logging.getLogger("upcycle_ds.data")
    level = log.level
    log.setLevel(logging.ERROR)  # the ranks warn about truncation; here it would be a second stderr line
    try:
        check_rows(cfg)  # unreadable sources and rows of no known format, before loading a tokenizer
        tokenizer = load_tokenizer(source.tokenizer_dir, args.trust_remote_code)
        train_ds, _ = open_cache(prepare_cache(cfg, tokenizer), tokenizer)  # the ranks then start without tokenising
    finally:
        log.setLevel(level)
        if not bars_were_off:
            datasets.enable_progress_bars()
    per_epoch = num_batches(len(train_ds), micro_batch_size=args.micro_batch_size, world_size=world_size,
                            grad_accum=args.grad_accum)
    if per_epoch < args.grad_accum:
        data = " ".join(args.data)
        raise UserError(f"{data}: {len(train_ds)} packed rows of {args.max_length} tokens are too few for one "
                        f"step of {args.micro_batch_size} x {args.grad_accum} micro-batches on {world_size} ranks")


def load_tokenizer(path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # missing / broken tokenizer files: OSError, ValueError, JSON errors, ...
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"{path}: cannot load its tokenizer ({msg})") from None


# ------------------------------------------------------------------------------------------------- the run dir
def check_run_dir(args, model_config: dict, world_size: int, command: str) -> None:
    """OUT/checkpoints: no checkpoint without --resume; with --resume a complete checkpoint (`latest`) of this model
    (config.json) and these settings (OUT/{COMMAND}_args.yaml, `RESUME_MUST_MATCH`)."""
    out = Path(args.out)
    ckpt = out / "checkpoints"
    latest = ckpt / "latest"
    if not latest.is_file():
        return
    if not args.resume:
        raise UserError(f"{ckpt} already holds a checkpoint; pass --resume to continue it or use a new --out")
    from .checkpoint import latest_tag

    latest_tag(ckpt)  # the tag, checked: inside OUT/checkpoints and complete (else the newest complete is named)
    saved_cfg = ckpt / "config.json"
    if saved_cfg.is_file():
        from ..io.hf import read_json_object

        compare_configs(read_json_object(saved_cfg), model_config, saved_cfg, args.model)
    record = out / f"{command}_args.yaml"
    if record.is_file():
        try:
            old = yaml.safe_load(record.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            old = {}
        if isinstance(old, dict):
            new = _resolved(args)
            for key in RESUME_MUST_MATCH:
                if key in old and key in new and not _same_setting(key, old[key], new[key]):
                    raise UserError(f"--resume: the checkpoint in {ckpt} was trained with {_flag(key)} "
                                    f"{_show(old[key])}, this run has {_show(new[key])} ({record}); resume with "
                                    f"the same value or use a new --out")


_CONFIG_IGNORED = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache"}


def compare_configs(old: dict, new: dict, old_path: Path, model: str) -> None:
    """Keys both configs have must agree (a key only one side has, e.g. one a newer transformers adds on save, is
    not a different model), and the keys that define the model's shapes must be on both sides."""
    keys = (set(old) & set(new)) | set(_KEY_ORDER)
    for k in sorted(keys - _CONFIG_IGNORED, key=lambda k: (k not in _KEY_ORDER, _KEY_ORDER.get(k, 0), k)):
        if old.get(k) != new.get(k):
            raise UserError(f"--resume: the checkpoint's model differs from --model {model}: {k} is "
                            f"{_show(old.get(k))} in {old_path}, {_show(new.get(k))} now")


_KEY_ORDER = {k: i for i, k in enumerate(("model_type", "num_local_experts", "num_experts", "num_experts_per_tok",
                                          "hidden_size", "num_hidden_layers", "intermediate_size",
                                          "moe_intermediate_size", "vocab_size"))}


def _same_setting(key: str, a, b) -> bool:
    if a == b:
        return True
    if key in ("data", "eval_data") and a and b:
        try:
            return os.path.samefile(a, b)
        except OSError:
            return not Path(a).exists()  # recorded relative to another working directory: cannot tell
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return False


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


