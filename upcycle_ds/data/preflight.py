"""The data checks of a launcher's preflight (`upcycle-ds train/sft/router-init --nproc N`), run before any rank."""

from __future__ import annotations

from pathlib import Path

from .build import DataConfig, check_data


def tokenizer_dir(model: str) -> Path:
    """Where a rank loads the tokenizer from (as train/sources.py does): the model dir, or for a DeepSpeed
    checkpoint dir without config.json its parent."""
    from ..train.sources import is_deepspeed_dir

    path = Path(model)
    if path.is_dir() and is_deepspeed_dir(path) and not (path / "config.json").is_file():
        return path.parent
    return path


def preflight_data(args, label_field: str | None = None) -> None:
    """Every source readable, every row in a known format, and every row rendered and tokenised with the model's
    tokenizer — into the data cache (the same entry the ranks open: `DataConfig.from_args`), so the ranks start
    without tokenising. Silent on success (no progress bars); one UserError otherwise."""
    import datasets

    cfg = DataConfig.from_args(args, label_field=label_field)
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # an error here must be one line on stderr, not progress bars + the line
    try:
        check_data(cfg)  # unreadable sources and rows of no known format, before loading a tokenizer
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(args.model)),
                                                      trust_remote_code=getattr(args, "trust_remote_code", False))
        except (OSError, ValueError):
            return  # no usable tokenizer here: the ranks report it
        check_data(cfg, tokenizer)
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
