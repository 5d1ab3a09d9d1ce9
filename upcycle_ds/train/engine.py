"""The DeepSpeed engine of one rank, built from a resolved run (`setup.RunSetup`): the model directly in the training
dtype on this rank's device with only this rank's weights (`surgery`), the stage's setup hook, activation
checkpointing, frozen parameters, AdamW over DeepSpeed's MoE / non-MoE param groups (`optim.build_optimizer`, on
the host with --offload-optimizer) with the warmup + cosine schedule, then `deepspeed.initialize` with the run's ds_config, and checkpoint loads made safe."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from ..moe.layer import moe_layers
from . import checkpoint
from .optim import apply_freeze, build_optimizer, lr_lambda


def build_model(setup, device: torch.device) -> torch.nn.Module:
    """This rank's share of the model, in the training dtype on `device`."""
    from ..surgery import build_dense_model, build_moe_model

    args = setup.args
    if setup.stage.dense:
        return build_dense_model(setup.source, dtype=args.torch_dtype(), device=device, attn_impl=args.attn_impl)
    return build_moe_model(setup.source, ep_size=args.ep_size, capacity_factor=args.capacity_factor,
                           dtype=args.torch_dtype(), device=device, attn_impl=args.attn_impl,
                           expert_impl=args.expert_impl)


def build_engine(setup, train_data, max_steps: int, device: torch.device):
    """(engine, scheduler): collective (`deepspeed.initialize` creates the expert-parallel groups)."""
    import deepspeed

    from ..launch.distributed import local_device_index
    from ..surgery import hf_config, rebuild_non_persistent_buffers

    args, stage = setup.args, setup.stage
    model = build_model(setup, device)
    if stage.setup is not None:
        stage.setup(model=model, layers=moe_layers(model), config=dict(setup.config), data=train_data)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_freeze(model, args.freeze, args.train_only)
    optimizer = build_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, max_steps,
                                                                       args.min_lr_ratio))
    engine, _, _, scheduler = deepspeed.initialize(
        args=SimpleNamespace(device_rank=local_device_index()), model=model, optimizer=optimizer,
        lr_scheduler=scheduler, config=copy.deepcopy(setup.ds_config))
    checkpoint.install_safe_engine(engine)
    rebuild_non_persistent_buffers(engine.module, hf_config(setup.config))  # fp32 rotary again
    return engine, scheduler
