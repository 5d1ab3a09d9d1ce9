"""Model FLOPs of training and MFU (model FLOPs utilisation), from config.json shapes (`plan.ModelShape`).

Per token, one forward pass costs 2 FLOPs per weight it multiplies with — counting only the experts a token is
routed to (top-k), the router, shared experts and the lm_head (not the embedding lookup) — plus the attention
scores and weighted sum, 2 * 2 * seq_len * (heads * head_dim) per layer (the full seq_len x seq_len product, as
PaLM / Megatron count it). Training = 3 x forward (backward costs twice the forward). Activation checkpointing
recomputes a forward, which MFU deliberately does not count: it is *model* FLOPs utilisation.

MFU = model FLOPs per second / (ranks x peak FLOP/s of one device). Peak: `--peak-tflops`, or the dense bf16
tensor-core figure of known GPUs below (TF32 for fp32 training) from their data sheets.
"""

from __future__ import annotations

from .plan import ModelShape

# name fragment of torch.cuda.get_device_name() -> (dense bf16 TFLOP/s, dense TF32 TFLOP/s), data-sheet peaks
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.4, 494.7),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.4, 494.7),  # SXM / NVL / HBM3
    "H800": (989.4, 494.7),
    "GH200": (989.4, 494.7),
    "B200": (2250.0, 1100.0),
    "A100": (312.0, 156.0),
    "A800": (312.0, 156.0),
    "L40S": (362.1, 183.0),
    "A10G": (70.0, 35.0),
}


def active_matmul_params(shape: ModelShape) -> int:
    """Weights one token multiplies with in a forward pass (top-k experts only; no embedding lookup)."""
    h, a, g = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    n = shape.vocab * h  # lm_head
    for m in shape.mlps:
        n += h * (a + 2 * g) + a * h
        if m.is_moe:
            n += m.num_experts * h + m.top_k * 3 * h * m.expert_intermediate
            if m.shared_intermediate is not None:
                n += 3 * h * m.shared_intermediate + h
        else:
            n += 3 * h * m.intermediate
    return n


def train_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Model FLOPs of forward + backward per token (see the module docstring)."""
    attn = 4 * seq_len * shape.heads * shape.head_dim * shape.num_layers
    return 3.0 * (2 * active_matmul_params(shape) + attn)


def peak_tflops(device_name: str | None, dtype: str) -> float | None:
    """Data-sheet peak of a GPU by name (bf16, or TF32 for fp32), None when unknown (CPU included)."""
    if not device_name:
        return None
    for frag, (bf16, tf32) in PEAK_TFLOPS.items():  # more specific names first (dict order)
        if frag in device_name:
            return bf16 if dtype == "bf16" else tf32
    return None


def mfu(flops_per_token: float, tokens_per_s: float, num_devices: int, peak: float | None) -> float | None:
    """Fraction of the devices' peak spent on model FLOPs (None without a peak)."""
    if not peak:
        return None
    return flops_per_token * tokens_per_s / (num_devices * peak * 1e12)
