"""What the optimizer sees: trainable parameters (freeze / train-only regexes), AdamW groups split into DeepSpeed's
MoE / non-MoE groups, the AdamW itself (`build_optimizer`, also what ZeRO-Offload steps on the host), and the LR
schedule (linear warmup, cosine decay to lr * min_lr_ratio)."""

from __future__ import annotations

import math
import re

import torch

from ..errors import UserError
from ..moe.names import is_router_param


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """LambdaLR factor of optimizer step `step` (0-based): linear warmup, then cosine from 1 to `min_ratio`."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def recompute_lrs(scheduler) -> None:
    """Set every param group's LR from the scheduler's base LRs at its current position (after a resume moved the
    position or changed the base LRs)."""
    lrs = [base * lmbda(scheduler.last_epoch) for base, lmbda in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def trainable(name: str, freeze: list[str], train_only: list[str]) -> bool:
    """The freeze rule: a parameter trains when it matches a --train-only regex (or there are none) and no --freeze
    regex."""
    return (not train_only or any(re.search(p, name) for p in train_only)) and not any(re.search(p, name)
                                                                                       for p in freeze)


def check_some_trainable(n_trainable: int, freeze: list[str], train_only: list[str]) -> None:
    if n_trainable == 0:
        raise UserError(f"--freeze {freeze} / --train-only {train_only} leave no trainable parameter")


def apply_freeze(model: torch.nn.Module, freeze: list[str], train_only: list[str]) -> int:
    """Freeze parameters by regex (`trainable`); returns the number of trainable parameters (error if none)."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name, freeze, train_only))
        n += p.numel() if p.requires_grad else 0
    check_some_trainable(n, freeze, train_only)
    return n


MAX_GROUP_NUMEL = 178_956_971
"""Cap on the elements of one MoE optimizer group: DeepSpeed's default (`split_params_into_different_moe_groups_for_
optimizer`). ZeRO-1/2 upcast and step one group's gradients at a time, so the cap bounds that transient fp32 memory
(DeepSpeed PR #2079). A layer's local experts larger than the cap get a group of their own."""


def optimizer_groups(model: torch.nn.Module, weight_decay: float, max_group_numel: int | None = None) -> list[dict]:
    """AdamW groups (no decay for norms, biases, routers), split into DeepSpeed's MoE / non-MoE groups.

    MoE groups hold whole layers: each layer's local experts lie in one group, in module order (gate_0, up_0,
    down_0, gate_1, ...), so the one flat buffer DeepSpeed's ZeRO-1/2 and bf16 optimizers make of a group holds
    them evenly spaced and the grouped-GEMM experts view them without a copy (`moe.experts.stacked_weights`).
    Layers are packed into groups of at most `max_group_numel` elements (default `MAX_GROUP_NUMEL`); DeepSpeed's own
    split cuts at that many elements wherever it falls, so a layer could straddle two buffers and be copied at
    every forward."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    cap = MAX_GROUP_NUMEL if max_group_numel is None else max_group_numel
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or is_router_param(name) or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    groups = split_params_into_different_moe_groups_for_optimizer(groups, max_group_size=None)
    layer_of = _expert_layer_index(model)
    groups = [part for g in groups if g["params"]
              for part in (_whole_layers(g, layer_of, cap) if g.get("moe") else [g])]
    if not any(g.get("moe") for g in groups):
        # DeepSpeed's ZeRO/bf16 optimizers insist on a non-empty MoE param group of trainable params when the model
        # has MoE layers. With every expert frozen (router-init) one expert weight per rank (the first) is handed to
        # the optimizer in a group with lr 0 and no decay: AdamW then adds exactly 0 to it, so it stays bit-identical.
        from deepspeed.moe.utils import is_moe_param

        frozen = [p for p in model.parameters() if is_moe_param(p)][:1]
        if frozen:
            frozen[0].requires_grad_(True)
            extra = [{"params": frozen, "weight_decay": 0.0, "lr": 0.0, "name": "frozen_experts"}]
            groups += [g for g in split_params_into_different_moe_groups_for_optimizer(extra, max_group_size=None)
                       if g["params"] and g.get("moe")]
    return groups


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """torch's AdamW over `optimizer_groups` (fused by default: `--fused-adam`), handed to `deepspeed.initialize`.

    The same optimizer serves `--offload-optimizer`: DeepSpeed's ZeRO-Offload then replaces each param group's
    parameters by this rank's fp32 master partition in host memory and calls `step()` there, so the update runs in
    torch's fused CPU AdamW kernel. We do not use DeepSpeed's `DeepSpeedCPUAdam`: measured on the same CPU it is no
    faster (bench/offload_step.py), it JIT-compiles a C++ extension on every node, and keeping torch's kernel makes
    an offloaded run take the same AdamW steps as a run without offload and keeps one checkpoint format for both
    (docs/training.md, "Optimizer state in host memory"). `train.config.deepspeed_config` tells DeepSpeed that a
    client torch optimizer is intended (`zero_force_ds_cpu_optimizer: false`)."""
    return torch.optim.AdamW(optimizer_groups(model, args.weight_decay), lr=args.lr, betas=tuple(args.adam_betas),
                             eps=1e-8, fused=args.fused_adam)


def _expert_layer_index(model: torch.nn.Module) -> dict[int, int]:
    """id(parameter) -> index of the MoE layer whose local experts hold it."""
    from ..moe.layer import moe_layers

    return {id(p): i for i, (_, moe) in enumerate(moe_layers(model)) for p in moe.local_experts.parameters()}


def _whole_layers(group: dict, layer_of: dict[int, int], cap: int) -> list[dict]:
    """`group` (an MoE group, parameters in module order) cut into groups of whole layers, at most `cap` elements
    each where a layer fits (a larger layer is a group of its own)."""
    layers: list[list[torch.nn.Parameter]] = []
    for p in group["params"]:
        if layers and layer_of.get(id(p)) == layer_of.get(id(layers[-1][-1])):
            layers[-1].append(p)
        else:
            layers.append([p])
    parts: list[list[torch.nn.Parameter]] = []
    size = 0
    for layer in layers:
        n = sum(p.numel() for p in layer)
        if parts and size + n <= cap:
            parts[-1] += layer
            size += n
        else:
            parts.append(list(layer))
            size = n
    return [{**group, "params": part} for part in parts]
