"""Compute: the local experts on their tokens, sorted by expert, as one grouped GEMM or as a loop over experts.

The experts stay DeepSpeed's: `deepspeed_experts[l]` is a `SwiGLUExpert` whose `gate_proj/up_proj/down_proj` hold
expert l's own weights, so ZeRO's MoE parameter groups and DeepSpeed's one-file-per-expert checkpoints are unchanged.
Both implementations compute, for the rows of local expert l,  down_l(act(gate_l(x)) * up_l(x)):

  "grouped"  stacks the local experts' weights (gate and up fused into one [L, 2I, H] operand, down into
             [L, H, I]; a view of the one buffer that holds them — `pack_experts` at build, DeepSpeed's flat
             optimizer buffers under ZeRO-1/2 — else one copy per forward, see `stacked_weights`) and runs two
             grouped GEMMs over all L experts at once, grouped by device-side int32 cumulative row offsets: no host
             reads, no per-expert kernel launches.
  "loop"     one `SwiGLUExpert` call per expert on its `torch.split` chunk; needs the per-expert row counts on the
             host.

Capability, not version, decides whether "grouped" can run: `grouped_mm_available(device, dtype)` runs a tiny grouped
GEMM, forward and backward, once per (device, dtype) and remembers whether it worked (no values are read back). The
function is `torch.nn.functional.grouped_mm` where torch has it, else `torch._grouped_mm` (same arguments). Seen so
far: torch 2.13 runs it on CPU in fp32, bf16 and fp16 (not fp64); on CUDA torch documents bf16 only, on sm_80+
(so fp32 on a GPU runs the loop).
Grouped GEMM also needs 16-byte aligned rows: H and I multiples of 16 / element size (4 in fp32, 8 in bf16).
Where any of this fails, `resolve_expert_impl` answers "loop".

Shape suffixes: S sorted token-slots (rows), H hidden, I expert intermediate, L local experts, G GEMM groups.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

EXPERT_IMPLS = ("grouped", "loop")

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class SwiGLUExpert(nn.Module):
    """down(act(gate(x)) * up(x)), no biases: the MLP of Llama, Mistral, Qwen2, Qwen3 and their MoE experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@functools.cache
def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    if _grouped_mm is None:
        return False
    try:
        # own saved-tensor hooks: the first forward of a layer may run under activation checkpointing, whose hooks
        # must not count the probe's tensors (its recomputation, with the answer cached, would save fewer)
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            # 3 groups, one of them empty, odd group sizes, 16-byte aligned rows: what the MoE layer passes
            x_SH = torch.ones(8, 16, device=device, dtype=dtype, requires_grad=True)
            w_GNH = torch.ones(3, 32, 16, device=device, dtype=dtype, requires_grad=True)
            ends_G = torch.tensor([3, 3, 8], device=device, dtype=torch.int32)
            out_SN = _grouped_mm(x_SH, w_GNH.transpose(1, 2), offs=ends_G)
            out_SN.backward(torch.ones_like(out_SN))  # a dense gradient, as the layer's graph passes
        return x_SH.grad is not None and w_GNH.grad is not None
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_mm_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether this torch runs grouped GEMM (forward and backward) for tensors of `dtype` on `device`.

    Probed once per (device, dtype) with a tiny problem and cached; the probe reads nothing back to the host.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _probe(device, dtype)


def resolve_expert_impl(requested: str, device: torch.device, dtype: torch.dtype, hidden_size: int,
                        intermediate_size: int) -> str:
    """The implementation that will run: `requested`, or "loop" where grouped GEMM is unavailable or the shapes
    are not 16-byte aligned (warns once per reason)."""
    if requested != "grouped":
        return requested
    align = max(1, 16 // dtype.itemsize)
    if hidden_size % align or intermediate_size % align:
        _warn_once(f"grouped experts need hidden and intermediate sizes that are multiples of {align} in {dtype} "
                   f"(got {hidden_size}, {intermediate_size}): running the expert loop")
        return "loop"
    if not grouped_mm_available(device, dtype):
        _warn_once(f"this torch ({torch.__version__}) has no grouped GEMM for {dtype} on {device.type}: "
                   "running the expert loop")
        return "loop"
    return "grouped"


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def run_experts_loop(x_SH: torch.Tensor, counts_L: list[int], experts: nn.ModuleList) -> torch.Tensor:
    """x_SH is sorted by local expert with counts_L rows each (host ints); returns the outputs in the same order.

    Every expert runs, also on zero rows, so each expert parameter gets a gradient (ZeRO's hooks expect that)."""
    outs = [expert(chunk) for chunk, expert in zip(torch.split(x_SH, counts_L), experts)]
    return torch.cat(outs) if outs else x_SH


def compute_dtype(x: torch.Tensor, experts: nn.ModuleList) -> torch.dtype:
    """The dtype the experts' matmuls run in: autocast's where it is on (as nn.Linear would), else the weights'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return experts[0].gate_proj.weight.dtype


def run_experts_grouped(x_SH: torch.Tensor, ends_L: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """x_SH is sorted by local expert; expert l owns rows [ends_L[l-1], ends_L[l]) (int32 cumulative ends on the
    device; ends_L[-1] must be S: grouped GEMM leaves rows past the last end unwritten, forward and backward).
    Returns the experts' outputs in the same order."""
    first = experts[0]
    dtype = compute_dtype(x_SH, experts)
    w_L2IH, w_LHI = stacked_weights(experts)
    h_S2I = _grouped_mm(x_SH.to(dtype), w_L2IH.to(dtype).transpose(1, 2), offs=ends_L)
    gate_SI, up_SI = h_S2I.chunk(2, dim=-1)
    a_SI = first.act_fn(gate_SI) * up_SI
    return _DenseGrad.apply(_grouped_mm(a_SI, w_LHI.to(dtype).transpose(1, 2), offs=ends_L))


def stacked_weights(experts: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
    """The local experts' weights as grouped-GEMM operands: gate and up as [L, 2I, H] (expert l's gate rows, then
    its up rows), down as [L, H, I]; gradients flow back to each expert's own parameters.

    Zero-copy where the parameters already lie evenly spaced in one buffer in the order gate_0, up_0, down_0,
    gate_1, ...: then the operands are strided views of that buffer. That is the layout `pack_experts` gives them
    when the model is built, and the one DeepSpeed's ZeRO-1/2 optimizers keep when they flatten an optimizer group
    into one buffer (each parameter a view of it), since `train.optim.optimizer_groups` keeps each layer's experts
    in one group, in module order. Elsewhere (separately allocated parameters) one copy per forward (`torch.cat` /
    `torch.stack`). `stacking_is_zero_copy` tells which.
    Either way the backward copies each expert's gradient rows into its own `.grad` once."""
    gates = [e.gate_proj.weight for e in experts]
    ups = [e.up_proj.weight for e in experts]
    downs = [e.down_proj.weight for e in experts]
    gate_up = [p for pair in zip(gates, ups) for p in pair]
    L, (I, H) = len(experts), gates[0].shape
    layout = _shared_buffer_layout(gates, ups, downs)
    if layout is None:
        return torch.cat(gate_up).view(L, 2 * I, H), torch.stack(downs)
    gate_offset, down_offset, step = layout
    return (_ParamsView.apply((L, 2 * I, H), (step, H, 1), gate_offset, 2, *gate_up),
            _ParamsView.apply((L, H, I), (step, I, 1), down_offset, 1, *downs))


def pack_experts(experts: nn.ModuleList) -> None:
    """Make the experts' weights views of one buffer in the order gate_0, up_0, down_0, gate_1, ... (their values
    kept): the layout `stacked_weights` views without a copy. The model builder calls it once per layer, so grouped
    GEMM is zero-copy also where DeepSpeed leaves parameters where they are (ZeRO-0: its bf16 wrapper around a torch
    optimizer does not flatten them; fp32 without ZeRO). Under ZeRO-1/2 DeepSpeed re-flattens each optimizer group
    into its own buffer in the group's order, which `train.optim.optimizer_groups` keeps to whole layers."""
    params = [w for e in experts for w in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)]
    first = params[0]
    if first.device.type == "meta" or any(p.dtype != first.dtype or p.device != first.device for p in params):
        return
    flat = torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
    offset = 0
    with torch.no_grad():
        for p in params:
            view = flat[offset:offset + p.numel()].view_as(p)
            view.copy_(p)
            p.data = view
            offset += p.numel()


def stacking_is_zero_copy(experts: nn.ModuleList) -> bool:
    """Whether `stacked_weights` views the experts' parameters in place (True) or copies them (False)."""
    return _shared_buffer_layout([e.gate_proj.weight for e in experts], [e.up_proj.weight for e in experts],
                                 [e.down_proj.weight for e in experts]) is not None


def _shared_buffer_layout(gates, ups, downs) -> tuple[int, int, int] | None:
    """(storage offset of gate_0, of down_0, step between experts) if gate_l, up_l (right after gate_l) and down_l
    lie in one storage at those offsets + l * step, else None."""
    I, H = gates[0].shape
    gate_at, up_at, down_at = _evenly_spaced(gates), _evenly_spaced(ups), _evenly_spaced(downs)
    if not (gate_at and up_at and down_at) or not gate_at[1] == up_at[1] == down_at[1]:
        return None
    if up_at[0] != gate_at[0] + I * H or gates[0].untyped_storage().data_ptr() != downs[0].untyped_storage().data_ptr():
        return None
    return gate_at[0], down_at[0], gate_at[1]


def _evenly_spaced(params: list[torch.Tensor]) -> tuple[int, int] | None:
    """(storage offset of params[0], step) if the contiguous, equal-shaped params lie in one storage at offsets
    offset + l * step with step >= numel (no overlap), else None. Host-side metadata only."""
    first = params[0]
    storage = first.untyped_storage().data_ptr()
    step = params[1].storage_offset() - first.storage_offset() if len(params) > 1 else first.numel()
    if step < first.numel():
        return None
    for l, p in enumerate(params):
        if (not p.is_contiguous() or p.shape != first.shape or p.dtype != first.dtype or p.device != first.device
                or p.untyped_storage().data_ptr() != storage
                or p.storage_offset() != first.storage_offset() + l * step):
            return None
    return first.storage_offset(), step


class _ParamsView(torch.autograd.Function):
    """A strided view (size, stride, storage offset) of the one buffer that holds `params`, which are
    [parts per expert] x L blocks of rows in expert-major order; backward gives each parameter its own rows of the
    gradient."""

    @staticmethod
    def forward(ctx, size, stride, offset, parts, *params):
        ctx.parts = parts
        return params[0].detach().as_strided(size, stride, offset)

    @staticmethod
    def backward(ctx, grad):
        L, rows = grad.shape[0], grad.shape[1] // ctx.parts
        grads = [grad[l, j * rows:(j + 1) * rows] for l in range(L) for j in range(ctx.parts)]
        return (None, None, None, None, *grads)


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped GEMM's backward rejects gradients
    with zero strides (e.g. from `.sum()`)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()
