"""Build our DeepSpeed-MoE model: the HF MoE model class with each MoE block swapped for `UpcycledMoE`.

Everything but the MoE blocks stays the transformers module of the export target (Mixtral, Qwen2-MoE, Qwen3-MoE), so
attention, norms and embeddings compute exactly what the exported checkpoint computes in transformers. The model is
created on the meta device and materialised only with the weights this rank needs: non-expert weights plus the
experts of its expert-parallel slice (global ids ep_rank * E/ep ... ), read tensor by tensor from the source.

A source is anything with `config`, `keys()`, `get(key)`: an HF MoE checkpoint (`io.hf.HFCheckpoint`) or an HF dense
checkpoint seen through `upcycle.UpcycledView` (so training can start straight from a dense model).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import transformers
from torch import nn

from .errors import UserError
from . import checks
from .library_logs import library_prints
from .families import family_for
from .families.base import is_tied, split_gate_up, weight_key
from .moe.experts import pack_experts
from .moe.layer import UpcycledMoE, moe_layers


def hf_config(config: dict) -> transformers.PretrainedConfig:
    cfg = {k: v for k, v in config.items() if k not in ("transformers_version", "architectures")}
    return transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def build_moe_model(source, *, ep_size: int = 1, capacity_factor: float | None = None,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    attn_impl: str | None = None, expert_impl: str | None = None) -> nn.Module:
    """Our DeepSpeed-MoE model for `source`, built directly in `dtype` on `device` with this rank's weights only.

    The model is created on the meta device (no memory), materialised empty on `device` in `dtype`, and each
    parameter is then read from `source` (one tensor at a time on the host) and copied in: non-expert weights and the
    experts of this rank's expert-parallel slice. Peak host memory is one tensor (plus one dense MLP for an
    `UpcycledView`), peak device memory this rank's share of the model. torch.distributed must be initialised when
    ep_size > 1. `capacity_factor` overrides the one recorded by `upcycle` (None in both = dropless).
    """
    config = dict(source.config)
    family, is_moe = family_for(config)
    if not is_moe:
        raise UserError(f"{source.path} is a dense checkpoint; upcycle it first (or pass it through UpcycledView)")
    num_experts = family.num_experts(config)
    if num_experts % ep_size:
        checks.ep_divides(ep_size, num_experts)
    model = build_meta_model(config, ep_size=ep_size, capacity_factor=capacity_factor, dtype=dtype,
                             attn_impl=attn_impl, expert_impl=expert_impl)
    _materialize(model, hf_config(config), device)
    for _, moe in moe_layers(model):
        # to_empty() from meta creates new Parameter objects, dropping the expert tags DeepSpeed's `Experts` set
        # (allreduce=False, group_name): without them ZeRO sees no MoE param group and all-reduces expert grads.
        for p in moe.local_experts.parameters():
            p.allreduce, p.group_name = False, moe.expert_group_name
        pack_experts(moe.local_experts)  # one buffer per layer: grouped GEMM views it (moe/experts.py)
        if ep_size > 1 or dist.is_initialized():  # (ep 1: what deepspeed.initialize would do, without its print)
            with library_prints():
                moe.set_deepspeed_parallelism()
    load_weights(model, source, family)
    return model


def build_dense_model(source, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      attn_impl: str | None = None) -> nn.Module:
    """The transformers dense model of an HF dense checkpoint (`upcycle-ds sft`), built the same way: meta ->
    empty in `dtype` on `device` -> weights copied in tensor by tensor."""
    config = dict(source.config)
    family, is_moe = family_for(config)
    if is_moe:
        raise UserError(f"{source.path} is an MoE checkpoint; expected a dense one")
    kw = {"attn_implementation": attn_impl} if attn_impl else {}
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(config), dtype=dtype, **kw)
    model.to(dtype)
    _materialize(model, hf_config(config), device)
    load_weights(model, source, family)
    return model


def _materialize(model: nn.Module, hcfg, device) -> None:
    """Meta -> uninitialised storage on `device` (parameters keep their dtype), computed buffers recomputed."""
    model.to_empty(device=device)
    rebuild_non_persistent_buffers(model, hcfg)


def build_meta_model(config: dict, *, ep_size: int = 1, capacity_factor: float | None = None,
                     dtype: torch.dtype = torch.float32, attn_impl: str | None = None,
                     expert_impl: str | None = None) -> nn.Module:
    """Our DeepSpeed-MoE model for an HF MoE config on the meta device (no weights, no process group needed).
    Every parameter has `dtype`; `attn_impl` is transformers' attn_implementation (None = its default)."""
    family, _ = family_for(config)
    num_experts = family.num_experts(config)
    if capacity_factor is None:
        capacity_factor = (config.get("upcycle_ds") or {}).get("capacity_factor")
    kw = {"attn_implementation": attn_impl} if attn_impl else {}
    moe_kw = {"expert_impl": expert_impl} if expert_impl else {}
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(config), dtype=dtype, **kw)
        for layer in family.moe_layers(config):
            old = model.model.layers[layer].mlp
            shared = config.get("shared_expert_intermediate_size") if hasattr(old, "shared_expert") else None
            model.model.layers[layer].mlp = UpcycledMoE(
                hidden_size=config["hidden_size"], intermediate_size=family.expert_intermediate_size(config),
                num_experts=num_experts, top_k=int(config["num_experts_per_tok"]), ep_size=ep_size,
                normalize_topk=family.normalize_topk(config), capacity_factor=capacity_factor,
                hidden_act=config.get("hidden_act", "silu"), shared_intermediate_size=shared, **moe_kw)
    return model.to(dtype)  # the MoE blocks were made in the default dtype; casting meta tensors costs nothing


def load_weights(model: nn.Module, source, family) -> None:
    """Copy every parameter of `model` from `source` (HF MoE hub names), this rank's experts only."""
    offsets = {}
    for layer, moe in moe_layers(model):
        offsets[layer] = moe.global_expert_ids()[0]
    with torch.no_grad():
        for name, param in model.named_parameters():
            layer = _layer_of(name)
            key = weight_key(model.config, family.hf_key_for_ds_param(name, offsets.get(layer, 0)),
                             lambda k: k in source)
            tensor = _read(source, family, key)
            if tuple(tensor.shape) != tuple(param.shape):
                raise UserError(f"{source.path}: {key} has shape {tuple(tensor.shape)}, model expects "
                                f"{tuple(param.shape)}")
            param.copy_(tensor)  # casts to the parameter dtype and moves to its device
        if is_tied(model.config):
            model.tie_weights()


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None


def _read(source, family, key: str) -> torch.Tensor:
    if key in source:
        return source.get(key)
    parsed = family.parse_moe_key(key)
    if parsed and parsed[0] == "expert":  # transformers-5 fused layout on disk
        layer, expert, proj = parsed[1]["layer"], parsed[1]["expert"], parsed[1]["proj"]
        if proj == "down":
            return source.get(family.moe_fused["down"].format(layer=layer))[expert]
        return split_gate_up(source.get(family.moe_fused["gate_up"].format(layer=layer))[expert], proj)
    raise checks.missing_tensor_error(source.path, key)


read_moe_tensor = _read  # public name: one HF MoE tensor from a source, hub or fused layout


def rebuild_non_persistent_buffers(model: nn.Module, hcfg) -> None:
    """Recompute computed buffers (rotary inv_freq, in fp32 as transformers makes them) from the config: to_empty()
    leaves them uninitialised, and DeepSpeed's bf16 engine casts every buffer to bf16 (a rotary table in bf16 would
    differ from the exported model's in transformers). Kept on each buffer's current device."""
    for module in model.modules():
        if not module._non_persistent_buffers_set:
            continue
        try:
            fresh = type(module)(config=hcfg)
        except TypeError as e:
            raise RuntimeError(f"cannot rebuild buffers of {type(module).__name__}: {e}") from None
        for name in module._non_persistent_buffers_set:
            if module._buffers.get(name) is not None:
                module._buffers[name] = fresh._buffers[name].to(module._buffers[name].device)
        for attr, value in vars(fresh).items():  # e.g. attention_scaling, original_inv_freq
            if not attr.startswith("_") and not isinstance(value, nn.Module) and attr not in module._buffers:
                setattr(module, attr, value)
