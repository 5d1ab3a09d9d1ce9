"""Where a training run's weights come from: an HF MoE dir, an HF dense dir (upcycled on the fly), or a DeepSpeed
checkpoint dir (`upcycle-ds convert --to ds`, or another run's checkpoints/). All present the HF MoE read interface
(config, keys, get, ...) that `surgery.build_moe_model` loads from, plus `tokenizer_dir`."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..families import family_for
from ..io.hf import HFCheckpoint, read_config
from ..upcycle import UpcycledView, UpcycleOptions


def is_deepspeed_dir(path: Path) -> bool:
    from ..io.ds import MODEL_STATES

    return (path / "latest").is_file() or (path / MODEL_STATES).is_file()


def open_source(args):
    path = Path(args.model)
    if path.is_dir() and is_deepspeed_dir(path):
        from ..io.ds import DSCheckpoint

        src = DSCheckpoint(path)
        src.tokenizer_dir = path if (path / "config.json").is_file() else path.parent
        return src
    config = read_config(path)
    _, is_moe = family_for(config)
    ckpt = HFCheckpoint(path)
    if is_moe:
        ckpt.tokenizer_dir = path
        return ckpt
    if args.num_experts is None:
        raise UserError(f"{path} is a dense {config.get('model_type')} checkpoint: pass --num-experts (and --top-k, "
                        f"--layers) to upcycle it on the fly, or run `upcycle-ds upcycle` first")
    view = UpcycledView(ckpt, UpcycleOptions(num_experts=args.num_experts, top_k=args.top_k, layers=args.layers,
                                             capacity_factor=args.capacity_factor, seed=args.seed))
    view.tokenizer_dir = path
    return view


def open_dense_source(args) -> HFCheckpoint:
    """The HF dense checkpoint `upcycle-ds sft` trains as it is (with `tokenizer_dir`)."""
    path = Path(args.model)
    config = read_config(path)
    _, is_moe = family_for(config)
    if is_moe:
        raise UserError(f"{path} is an MoE checkpoint ({config.get('model_type')}); sft trains a dense model "
                        f"(Llama, Mistral, Qwen2, Qwen3) — use `upcycle-ds train` for MoE models")
    if is_deepspeed_dir(path):
        raise UserError(f"{path} is a DeepSpeed checkpoint dir; sft starts from an HF dense checkpoint")
    ckpt = HFCheckpoint(path)
    ckpt.tokenizer_dir = path
    return ckpt
