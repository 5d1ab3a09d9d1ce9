"""Per-rank memory plan for training an (upcycled) MoE model with native DeepSpeed-MoE (expert parallel + ZeRO 0/1/2).

Everything here is arithmetic on config.json shapes; no weights are read. The model-state figures follow what
DeepSpeed 0.19 actually allocates (read from `runtime/engine.py`, `runtime/zero/stage_1_and_2.py`,
`runtime/fp16/unfused_optimizer.py`), the activation figures are an *estimate* (see `layer_activation_bytes`).
docs/planning.md explains every term and carries a worked example. `forward_flops` counts matmul FLOPs per token
(attention, dense MLPs / shared experts, the k routed experts, routers, lm_head) for coarse and fine-grained experts.

Symbols: N non-expert parameters (replicated on every rank: embeddings, attention, norms, dense MLPs, routers, shared
experts), X expert parameters of the whole model, W world size, ep expert-parallel size, X_r = X / ep the experts of
one rank, W_e = W / ep the expert-data-parallel group size, p bytes per model element (bf16 2, fp32 4), T tokens per
micro batch per rank.

Model states per rank (`model_states`):
- parameters: p * (N + X_r), never partitioned (no ZeRO-3 with native MoE).
- gradients in model dtype: stage 0 p*(N + X_r); stage 2 only this rank's reduced partition p*(N/W + X_r/W_e),
  reduced in buckets during backward; stage 1 reduces once at the end of backward, so the full gradients and the
  partition copied out of them (`averaged_gradients`) coexist at that moment: p*(N + X_r) + p*(N/W + X_r/W_e).
- optimizer states: fp32 master weights (4 B) + Adam exp_avg, exp_avg_sq (8 B) per element of this rank's partition
  (stage 1/2: N/W + X_r/W_e) or of every local element (stage 0). ZeRO 1/2 clone an fp32 master partition even for
  fp32 models; stage 0 with fp32 has no master copy (the torch optimizer updates the parameters), so 8 B only.
- fp32 gradients at the optimizer step: the partition's gradients flattened and cast to fp32 (stage 1/2: 4 B per
  partition element; stage 0 bf16: 4 B per local element; stage 0 fp32: none). They exist only during `step()`,
  when activations are already freed, so the peak takes max(activations, fp32 step gradients).
- gradient reduce bucket: `reduce_bucket_size` elements (DeepSpeed default 5e8) of model dtype, allocated in full.
For stage 2 + bf16 this is DeepSpeed's own `estimate_zero2_model_states_mem_needs`: 2*P + 18*P/W (tested).

Optimizer offloaded (`--offload-optimizer`, DeepSpeed ZeRO-Offload, stage 1/2; `offload_states`): with q this rank's
partition elements (N/W + X_r/W_e) and L the largest parameter's elements, the GPU keeps the parameters, stage 1's full
gradients (stage 2 reduces them in buckets straight into host memory: no gradient partition on the GPU), the bucket
and a gradient staging buffer p*L (`temp_grad_buffer_for_gpu_offload`); no optimizer state, no fp32 step gradients.
The host holds per rank the fp32 master + Adam moments 12*q, the fp32 gradient partition 4*q, a model-dtype weight
buffer p*q (the updated partition on its way back to the GPU), a staging buffer p*L, and with gradient accumulation
a model-dtype gradient accumulator of about p*q (whole parameters). `offload_cost` estimates the time this adds per
optimizer step on a GPU node.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import UserError
from . import checks
from .families import family_for
from .families.base import Attention, is_tied
from .options import UpcycleOptions, check_shared_target, parse_layers, split_sizes

GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
DEFAULT_REDUCE_BUCKET = 500_000_000  # DeepSpeed zero_optimization.reduce_bucket_size default (elements)
DEFAULT_HOST_MEMORY_GB = 2048.0
"""Host RAM of a typical 8-GPU node, GiB: DGX H100 / H200 and AWS p5.48xlarge have 2 TiB (others less: GCP
a3-highgpu-8g 1872 GB, DGX A100 1 TiB; pass `--host-memory-gb`)."""
CPU_ADAM_NS_PER_PARAM = 0.6
"""torch's fused AdamW on one CPU core, fp32 master + moments, ns per parameter: measured by bench/offload_step.py
(0.57-0.61 ns on a 2-core AMD EPYC with AVX-512; DeepSpeed's DeepSpeedCPUAdam 0.65-0.73 ns). An estimate for a GPU
node's host, where each rank steps its own partition on its own cores."""
HOST_MEMORY_BANDWIDTH_GBS = 300.0
"""Host memory bandwidth of a GPU node assumed by the offload estimate, GB/s (two sockets of 8-channel DDR5-4800
give 614 GB/s in theory; 300 is a conservative sustained figure). The CPU AdamW step of all ranks of a node streams
32 + p bytes per parameter (reads master, gradient, moments; writes them back; casts the master to the weight
buffer), so on a GPU node it is bound by this, not by the cores."""
PCIE_GBS = {True: 50.0, False: 25.0}
"""Host<->device copy bandwidth per GPU assumed by the offload estimate, GB/s, with pinned (True) or pageable (False)
host buffers: PCIe Gen5 x16 peaks at 64 GB/s per direction; pinned copies reach ~50, copies from or into pageable
memory about half (`--pcie-gbps` overrides)."""


# ---------------------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True, kw_only=True)
class MLPShape:
    """One decoder layer's MLP: dense (`intermediate` > 0, no experts) or MoE (`num_experts` > 0)."""

    intermediate: int = 0
    """dense SwiGLU width (a dense layer) or 0 (an MoE layer)."""
    bias: bool = False
    """Llama `mlp_bias` (dense layers only)."""
    num_experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int | None = None
    """Qwen2-MoE shared expert width (with its 1-output sigmoid gate); None = no shared expert."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """Every shape that decides parameter count and activation size, read from config.json."""

    model_type: str
    vocab: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    tied_embeddings: bool
    mlps: tuple[MLPShape, ...]

    @property
    def num_layers(self) -> int:
        return len(self.mlps)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.mlps) if m.is_moe)

    @property
    def num_experts(self) -> int:
        return max((m.num_experts for m in self.mlps), default=0)

    @property
    def top_k(self) -> int:
        return max((m.top_k for m in self.mlps), default=0)


@dataclass(frozen=True)
class ParamCount:
    non_expert: int
    """parameters every rank holds (embeddings, attention, norms, dense MLPs, routers, shared experts)."""
    expert: int
    """parameters of all experts of all MoE layers (each rank holds expert / ep_size)."""

    @property
    def total(self) -> int:
        return self.non_expert + self.expert


def load_config(path: str | Path) -> dict:
    """config.json of an HF checkpoint dir, or a config.json file itself."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UserError(f"{path}: no such config.json or HF checkpoint dir")
    from .io.hf import read_json_object

    return read_json_object(p)


def _resolved(cfg: dict) -> dict:
    """config.json with transformers' defaults filled in for absent keys (e.g. qkv_bias, head_dim)."""
    import transformers

    kw = {k: v for k, v in cfg.items() if k not in ("transformers_version", "architectures", "model_type")}
    try:
        hf = transformers.AutoConfig.for_model(cfg["model_type"], **kw)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"config.json ({cfg.get('model_type')}) is not a valid transformers config: {e}") from None
    out = dict(vars(hf))
    out.update({k: v for k, v in cfg.items() if k not in out})
    return out


def _req(cfg: dict, key: str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or v < 0:
        raise UserError(f"config.json: {key} must be a non-negative integer (got {v!r})")
    return v


def shape_from_config(config: dict) -> ModelShape:
    """The model a config.json describes as is (dense or MoE)."""
    family, is_moe = family_for(config)
    cfg = _resolved(config)
    mt = config["model_type"]
    hidden, heads = _req(cfg, "hidden_size"), _req(cfg, "num_attention_heads")
    head_dim = cfg.get("head_dim") or hidden // heads
    n_layers = _req(cfg, "num_hidden_layers")
    attn = family.moe_attention if is_moe else family.dense_attention  # the family's attention weights
    qkv_bias, o_bias = Attention.flag(attn.qkv_bias, cfg), Attention.flag(attn.o_bias, cfg)
    if is_moe:
        moe = set(family.moe_layers(cfg)) if family.num_experts(cfg) > 0 else set()
        experts, k = family.num_experts(cfg), int(cfg.get("num_experts_per_tok", 0))
        e_inter = family.expert_intermediate_size(cfg)
        shared = int(cfg["shared_expert_intermediate_size"]) if mt == "qwen2_moe" else None
        dense = MLPShape(intermediate=_req(cfg, "intermediate_size"))
        mlps = tuple(MLPShape(num_experts=experts, top_k=k, expert_intermediate=e_inter, shared_intermediate=shared)
                     if i in moe else dense for i in range(n_layers))
    else:
        bias = bool(cfg.get("mlp_bias", False)) if mt == "llama" else False
        mlps = (MLPShape(intermediate=_req(cfg, "intermediate_size"), bias=bias),) * n_layers
    return ModelShape(model_type=mt, vocab=_req(cfg, "vocab_size"), hidden=hidden, heads=heads,
                      kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(head_dim),
                      qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=attn.qk_norm, tied_embeddings=is_tied(cfg), mlps=mlps)


def upcycled_shape(config: dict, *, num_experts: int, top_k: int, layers: str = "all", granularity: int = 1,
                   shared_fraction: float = 0.0) -> ModelShape:
    """The MoE model `upcycle` makes of a dense config.json: chosen layers' MLPs become E experts + a router.

    Experts have the dense intermediate size I (copies) or, with granularity G, I_r / G where I_r = I minus the
    shared expert's neurons (`granular.split_sizes`). Qwen2 gains Qwen2-MoE's shared expert and its gate, empty
    unless `shared_fraction` > 0, as `upcycle` writes it. Llama/Mistral allow any layer subset here (DeepSpeed trains
    it), although the Mixtral export needs `all`.
    """
    family, is_moe = family_for(config)
    if is_moe:
        raise UserError(f"{config['model_type']} is already an MoE config; upcycling needs a dense one")
    family.check_dense_config(_resolved(config))
    opts = UpcycleOptions(num_experts=num_experts, top_k=top_k, layers=layers, granularity=granularity,
                          shared_fraction=shared_fraction)
    opts.validate()
    check_shared_target(family, opts)
    dense = shape_from_config(config)
    moe = set(parse_layers(layers, dense.num_layers))
    mlps = []
    for i, m in enumerate(dense.mlps):
        if i not in moe:
            mlps.append(m)
            continue
        i_e, i_s = split_sizes(m.intermediate, granularity, shared_fraction)
        mlps.append(MLPShape(num_experts=num_experts, top_k=top_k, expert_intermediate=i_e,
                             shared_intermediate=i_s if family.moe_shared else None))
    return replace(dense, mlps=tuple(mlps), model_type=family.moe_model_type)


def count_params(s: ModelShape) -> ParamCount:
    """Exact parameter counts (as `sum(p.numel())` of the transformers / DeepSpeed model; tied weights once)."""
    h, a, g = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    attn = h * (a + 2 * g) + a * h + (a + 2 * g) * s.qkv_bias + h * s.o_bias + 2 * s.head_dim * s.qk_norm
    non_expert = s.vocab * h * (1 if s.tied_embeddings else 2) + h  # embeddings (+ lm_head), final norm
    expert = 0
    for m in s.mlps:
        non_expert += attn + 2 * h  # attention + 2 RMSNorms
        if m.is_moe:
            non_expert += m.num_experts * h  # router
            expert += m.num_experts * 3 * h * m.expert_intermediate
            if m.shared_intermediate is not None:
                non_expert += 3 * h * m.shared_intermediate + h  # shared expert + its gate
        else:
            non_expert += 3 * h * m.intermediate + (2 * m.intermediate + h) * m.bias
    return ParamCount(non_expert, expert)


@dataclass(frozen=True)
class Flops:
    """Forward matmul FLOPs per token (2 per multiply-add), split by where they are spent; training ~ 3x forward."""

    attention: float
    """q/k/v/o projections + QK^T and PV over the causal half of the sequence (2 * S * a per layer)."""
    mlp: float
    """dense MLPs (dense layers) + shared experts and their gates."""
    experts: float
    """the k routed experts each token visits (k * 3 * 2 h I_e per MoE layer)."""
    router: float
    lm_head: float
    active_params: int
    """parameters one token's forward multiplies by: attention, dense MLPs, routers, shared experts, its k routed
    experts and lm_head (not the embedding, a lookup)."""

    @property
    def total(self) -> float:
        return self.attention + self.mlp + self.experts + self.router + self.lm_head


def forward_flops(s: ModelShape, seq_len: int) -> Flops:
    """Forward FLOPs per token of a model shape (matmuls only; norms, softmax, RoPE and dispatch are not counted)."""
    h, a, g = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    attn_params = h * (a + 2 * g) + a * h
    attention = s.num_layers * (2 * attn_params + 2 * seq_len * a)
    mlp = experts = router = 0.0
    active = s.num_layers * attn_params + s.vocab * h
    for m in s.mlps:
        if not m.is_moe:
            mlp += 2 * 3 * h * m.intermediate
            active += 3 * h * m.intermediate
            continue
        router += 2 * h * m.num_experts
        experts += m.top_k * 2 * 3 * h * m.expert_intermediate
        active += h * m.num_experts + m.top_k * 3 * h * m.expert_intermediate
        if m.shared_intermediate:
            mlp += 2 * 3 * h * m.shared_intermediate + 2 * h
            active += 3 * h * m.shared_intermediate + h
    return Flops(attention=float(attention), mlp=float(mlp), experts=float(experts), router=float(router),
                 lm_head=float(2 * h * s.vocab), active_params=int(active))


# ------------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True, kw_only=True)
class Setup:
    """Parallel layout and training settings one plan is made for."""

    nodes: int = 1
    gpus_per_node: int = 8
    ep_size: int = 1
    zero_stage: int = 2
    dtype: str = "bf16"
    micro_batch_size: int = 1
    seq_len: int = 4096
    activation_checkpointing: bool = True
    reduce_bucket_size: int = DEFAULT_REDUCE_BUCKET
    grad_accum: int = 1
    offload_optimizer: bool = False
    """ZeRO-Offload: fp32 masters, Adam moments and the fp32 gradient partition in host memory (stage 1/2)."""
    offload_pin_memory: bool = False
    """Pinned host buffers (same bytes; faster copies in `offload_cost`)."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len


def valid_ep_sizes(num_experts: int, world: int) -> list[int]:
    """ep sizes DeepSpeed-MoE accepts: divide both the number of experts and the world size."""
    return [e for e in range(1, min(num_experts, world) + 1) if num_experts % e == 0 and world % e == 0]


def check_setup(shape: ModelShape, setup: Setup) -> None:
    for name in ("nodes", "gpus_per_node", "ep_size", "micro_batch_size", "seq_len", "grad_accum"):
        if getattr(setup, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(setup, name)})")
    if setup.zero_stage == 3:
        raise UserError("--zero-stage 3: native DeepSpeed-MoE is not supported with ZeRO stage 3; use 0, 1 or 2")
    checks.zero_stage(setup.zero_stage)
    checks.offload_needs_zero(setup.offload_optimizer, setup.zero_stage)
    if setup.dtype not in DTYPE_BYTES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_BYTES)} (got {setup.dtype!r})")
    E = shape.num_experts
    if E == 0:
        raise UserError("the model has no MoE layer (pass --num-experts for a dense model)")
    if E % setup.ep_size or setup.world % setup.ep_size:
        raise UserError(f"--ep-size {setup.ep_size} must divide the number of experts ({E}) and the world size "
                        f"({setup.world} = {setup.nodes} nodes x {setup.gpus_per_node} GPUs); valid: "
                        f"{', '.join(map(str, valid_ep_sizes(E, setup.world)))}")


# ---------------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Row:
    name: str
    non_expert: float
    expert: float
    note: str = ""

    @property
    def total(self) -> float:
        return self.non_expert + self.expert


@dataclass(frozen=True)
class OffloadCost:
    """What ZeRO-Offload adds to one optimizer step on a GPU node: an *estimate* (the copies and the CPU step are
    taken as not overlapping anything; the GPU AdamW step they replace is not subtracted)."""

    d2h_bytes: float
    """device -> host bytes per rank: gradients (fp32 at the accumulation boundary; model dtype per micro-step when
    accumulating)."""
    h2d_bytes: float
    """host -> device bytes per rank: the updated weight partition (and accumulated gradients when accumulating)."""
    pcie_gbs: float
    node_params: float
    """parameters the CPU AdamW steps per node per optimizer step (every rank's partition)."""
    copy_s: float
    adam_cpu_s: float
    """a rank's partition x CPU_ADAM_NS_PER_PARAM (one core per rank)."""
    adam_memory_s: float
    """the node's parameters x (32 + p) bytes / host memory bandwidth."""

    @property
    def adam_s(self) -> float:
        return max(self.adam_cpu_s, self.adam_memory_s)

    @property
    def total_s(self) -> float:
        return self.copy_s + self.adam_s


@dataclass(frozen=True)
class Plan:
    """Bytes per rank, one row per component; `peak` = persistent rows + max(activations, fp32 step gradients).

    With the optimizer offloaded, `host` holds the host-memory rows per rank and `offload` the step-time estimate."""

    setup: Setup
    params: ParamCount
    rows: dict[str, Row] = field(default_factory=dict)
    host: dict[str, Row] = field(default_factory=dict)
    offload: OffloadCost | None = None

    @property
    def persistent(self) -> float:
        return sum(self.rows[k].total for k in PERSISTENT if k in self.rows)

    @property
    def activations(self) -> float:
        return self.rows["act_layers"].total + self.rows["act_logits"].total

    @property
    def peak(self) -> float:
        return self.persistent + max(self.activations, self.rows["step_grads"].total)

    @property
    def host_per_rank(self) -> float:
        return sum(r.total for r in self.host.values())

    @property
    def host_per_node(self) -> float:
        """Offloaded bytes of the node's ranks (gpus_per_node ranks per node)."""
        return self.setup.gpus_per_node * self.host_per_rank

    def fits_gpu(self, gpu_memory_gb: float, margin: float) -> bool:
        return self.peak <= usable_bytes(gpu_memory_gb, margin)

    def fits_host(self, host_memory_gb: float | None, margin: float) -> bool:
        return host_memory_gb is None or self.host_per_node <= usable_bytes(host_memory_gb, margin)

    def fits(self, gpu_memory_gb: float, margin: float, host_memory_gb: float | None = None) -> bool:
        """The GPU's peak fits, and with the optimizer offloaded so does the node's host memory (when given)."""
        return self.fits_gpu(gpu_memory_gb, margin) and self.fits_host(host_memory_gb, margin)


def usable_bytes(gpu_memory_gb: float, margin: float) -> float:
    return gpu_memory_gb * GIB * (1 - margin)


def largest_param(shape: ModelShape) -> int:
    """Elements of the model's largest single parameter (DeepSpeed sizes ZeRO-Offload's gradient staging buffers by
    it): the embedding / lm_head, an attention projection, a dense MLP or shared expert matrix, or one expert's."""
    h, a, g = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    sizes = [shape.vocab * h, h * a, h * g]
    for m in shape.mlps:
        sizes += [h * m.intermediate, h * m.expert_intermediate, h * (m.shared_intermediate or 0)]
    return max(sizes)


def partition(n: int, x: int, setup: Setup) -> tuple[float, float]:
    """(non-expert, expert) elements of this rank's ZeRO partition (stage 1/2), or of everything it holds (stage 0):
    ZeRO partitions the non-expert parameters over all W ranks and the experts over the W_e = W / ep ranks that hold
    the same experts (DeepSpeed's `_configure_moe_settings`: each expert group's `real_dp_process_group` is the
    expert-data-parallel group)."""
    local = (n, x / setup.ep_size)
    if setup.zero_stage == 0:
        return local
    return local[0] / setup.world, local[1] / (setup.world // setup.ep_size)


def model_states(n: int, x: int, setup: Setup, largest: int = 0) -> dict[str, tuple[float, float]]:
    """(non-expert, expert) GPU bytes per rank of parameters, gradients, optimizer states, fp32 step gradients, the
    reduce bucket and, with the optimizer offloaded, the gradient staging buffer.

    n: non-expert parameters; x: expert parameters of the whole model (this rank holds x / ep_size); largest: elements
    of the largest parameter (`largest_param`; only the offload staging buffer needs it).
    """
    p, stage, off = setup.bytes, setup.zero_stage, setup.offload_optimizer
    local = (n, x / setup.ep_size)
    part = partition(n, x, setup)
    rows = {"params": tuple(p * c for c in local)}
    if stage == 0 or (stage == 1 and off):  # offloaded, stage 1 copies its partition to the host, not the GPU
        rows["grads"] = tuple(p * c for c in local)
    elif stage == 1:
        rows["grads"] = tuple(p * (c + q) for c, q in zip(local, part))
    else:
        rows["grads"] = (0.0, 0.0) if off else tuple(p * q for q in part)
    master = 4 if (stage >= 1 or setup.dtype != "fp32") else 0
    rows["optim"] = (0.0, 0.0) if off else tuple((master + 8) * q for q in part)
    has_step_grads = (stage >= 1 or setup.dtype != "fp32") and not off
    rows["step_grads"] = tuple(4 * q for q in part) if has_step_grads else (0.0, 0.0)
    bucket = p * min(setup.reduce_bucket_size, local[0] + local[1])
    rows["bucket"] = (float(bucket), 0.0)
    if off:
        rows["offload_buf"] = (float(p * largest), 0.0)
    return rows


def host_states(n: int, x: int, setup: Setup, largest: int) -> dict[str, tuple[float, float]]:
    """(non-expert, expert) host bytes per rank with the optimizer offloaded (empty otherwise): fp32 master + Adam
    moments, the fp32 gradient partition, the model-dtype weight buffer, the gradient staging buffer and, with
    gradient accumulation, the gradient accumulator (DeepSpeed 0.19 `stage_1_and_2.py`:
    `single_partition_of_fp32_groups` and its `.grad`, `param_buffer_of_bit16_for_cpu_offload_groups`,
    `temp_grad_buffer_for_cpu_offload`, `accumulated_grads_in_cpu`; the moments are the wrapped torch AdamW's
    state)."""
    if not setup.offload_optimizer:
        return {}
    p = setup.bytes
    part = partition(n, x, setup)
    rows = {"host_optim": tuple(12 * q for q in part), "host_grads": tuple(4 * q for q in part),
            "host_weights": tuple(p * q for q in part), "host_staging": (float(p * largest), 0.0)}
    if setup.grad_accum > 1:
        rows["host_accum"] = tuple(p * q for q in part)
    return rows


def offload_cost(n: int, x: int, setup: Setup, *, pcie_gbs: float | None = None,
                 host_memory_bandwidth_gbs: float = HOST_MEMORY_BANDWIDTH_GBS,
                 cpu_adam_ns_per_param: float = CPU_ADAM_NS_PER_PARAM) -> OffloadCost | None:
    """Estimated extra time per optimizer step of ZeRO-Offload on a GPU node (None without offload).

    Copies per rank (DeepSpeed 0.19): at the accumulation boundary the gradient partition goes to the host in fp32
    (4q) and the updated partition comes back in the model dtype (pq). Accumulating gradients (grad_accum G > 1)
    routes them through the host: ZeRO-2 copies each micro-step's partition gradients out (pq) and, from the second
    micro-step on, the accumulated ones back in (pq); ZeRO-1 reduces only at the boundary but still makes one such
    round trip. The CPU AdamW step: every rank of the node steps its own partition at once.
    """
    if not setup.offload_optimizer:
        return None
    p, G = setup.bytes, setup.grad_accum
    q = sum(partition(n, x, setup))
    d2h, h2d = 4 * q, p * q
    if G > 1:
        rounds = G if setup.zero_stage == 2 else 1
        d2h += rounds * p * q
        h2d += (G - 1 if setup.zero_stage == 2 else 1) * p * q
    gbs = pcie_gbs or PCIE_GBS[setup.offload_pin_memory]
    node = setup.gpus_per_node * q
    return OffloadCost(d2h_bytes=d2h, h2d_bytes=h2d, pcie_gbs=gbs, node_params=node,
                       copy_s=(d2h + h2d) / (gbs * 1e9), adam_cpu_s=q * cpu_adam_ns_per_param * 1e-9,
                       adam_memory_s=node * (32 + p) / (host_memory_bandwidth_gbs * 1e9))


def layer_activation_bytes(shape: ModelShape, layer: int, p: int) -> tuple[float, float]:
    """(non-expert, expert) bytes per token saved for backward by one decoder layer, without checkpointing.

    An estimate of what autograd keeps for an HF decoder layer with SDPA/flash attention (no s x s score matrix) and
    index-based expert dispatch, under balanced routing (every rank computes k tokens' worth of experts per token):
    - each RMSNorm keeps its fp32 upcast input and normalised output: (4 + p) * width
    - attention: q/k/v input p*h; SDPA keeps q, k, v (GQA widths) and its output p*(2a + 2g), log-sum-exp 4*heads;
      o_proj input p*a; Qwen3 q/k norms (4 + p)*(a + g)
    - dense SwiGLU: input p*h + gate, up, act(gate), product p*4*I
    - MoE: router input p*h, fp32 logits + probabilities 8*E; per routed copy (k per token): expert input and
      output p*2h and SwiGLU p*4*I_e (the expert column); a shared expert p*4*I_s + its gate input
    """
    h, a, g = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norm = 4 + p
    ne = 2 * norm * h  # input + post-attention RMSNorm
    ne += p * h + p * (2 * a + 2 * g) + 4 * shape.heads + p * a
    if shape.qk_norm:
        ne += norm * (a + g)
    m = shape.mlps[layer]
    if not m.is_moe:
        return ne + p * h + 4 * p * m.intermediate, 0.0
    ne += p * h + 8 * m.num_experts
    if m.shared_intermediate is not None:
        ne += 4 * p * m.shared_intermediate + 4
    ex = m.top_k * p * (2 * h + 4 * m.expert_intermediate)
    return float(ne), float(ex)


def activations(shape: ModelShape, setup: Setup) -> dict[str, tuple[float, float]]:
    """(non-expert, expert) activation bytes per rank: decoder layers and logits + loss (estimates).

    Without checkpointing every layer keeps `layer_activation_bytes`. With HF gradient checkpointing (one checkpoint
    per decoder layer) each layer keeps only its input (p*h per token) and one layer at a time is recomputed in
    backward (the largest one counts). Logits + loss: final norm and lm_head input, the logits in model dtype, their
    fp32 upcast and the fp32 log-softmax cross-entropy keeps ((p + 8) * vocab per token).
    """
    p, T = setup.bytes, setup.tokens
    per_layer = [layer_activation_bytes(shape, i, p) for i in range(shape.num_layers)]
    if setup.activation_checkpointing:
        ne = shape.num_layers * p * shape.hidden
        biggest = max(per_layer, key=lambda t: t[0] + t[1])
        layers = (ne + biggest[0], biggest[1])
    else:
        layers = (sum(t[0] for t in per_layer), sum(t[1] for t in per_layer))
    logits = (4 + p) * shape.hidden + p * shape.hidden + (p + 8) * shape.vocab
    return {"act_layers": (T * layers[0], T * layers[1]), "act_logits": (float(T * logits), 0.0)}


ROW_NAMES = {
    "params": "parameters",
    "grads": "gradients",
    "optim": "optimizer states",
    "step_grads": "fp32 grads at step",
    "bucket": "reduce bucket",
    "offload_buf": "offload staging",
    "act_layers": "activations: layers",
    "act_logits": "activations: logits+loss",
}
PERSISTENT = ("params", "grads", "optim", "bucket", "offload_buf")
"""GPU rows held through the whole step (the others are transient: `Plan.peak`)."""
HOST_ROW_NAMES = {
    "host_optim": "optimizer states",
    "host_grads": "fp32 gradients",
    "host_weights": "weight buffer",
    "host_staging": "gradient staging",
    "host_accum": "gradient accumulator",
}

Layout = tuple[int, int, bool, bool]
"""(ep size, ZeRO stage, activation checkpointing, optimizer offloaded): one cell of the layout search."""


def make_plan(shape: ModelShape, setup: Setup, *, pcie_gbs: float | None = None,
              host_memory_bandwidth_gbs: float = HOST_MEMORY_BANDWIDTH_GBS) -> Plan:
    check_setup(shape, setup)
    counts = count_params(shape)
    n, x, big = counts.non_expert, counts.expert, largest_param(shape)
    parts = {**model_states(n, x, setup, big), **activations(shape, setup)}
    off = setup.offload_optimizer
    master = "fp32 master + Adam m, v" if (setup.zero_stage or setup.dtype != "fp32") else "Adam m, v"
    grads = {0: "full", 1: "full + partition, end of backward", 2: "own partition"}[setup.zero_stage]
    if off:
        grads = {1: "full, end of backward", 2: "reduced in buckets into host memory"}[setup.zero_stage]
    notes = {
        "params": f"{setup.dtype}, not partitioned",
        "grads": grads,
        "optim": "in host memory (offloaded)" if off else master + (", partitioned" if setup.zero_stage else ""),
        "step_grads": "in host memory (offloaded)" if off else "transient, during step()",
        "bucket": "reduce_bucket_size x dtype",
        "offload_buf": "dtype x largest parameter",
        "act_layers": "estimate" + (", checkpointed" if setup.activation_checkpointing else ""),
        "act_logits": "estimate",
    }
    rows = {k: Row(ROW_NAMES[k], *parts[k], notes[k]) for k in ROW_NAMES if k in parts}
    host_notes = {"host_optim": "fp32 master + Adam m, v, partitioned", "host_grads": "partition, fp32",
                  "host_weights": f"partition, {setup.dtype} (updated weights on their way back)",
                  "host_staging": f"{setup.dtype} x largest parameter",
                  "host_accum": f"~partition, {setup.dtype}, --grad-accum > 1"}
    host = {k: Row(HOST_ROW_NAMES[k], *v, host_notes[k]) for k, v in host_states(n, x, setup, big).items()}
    cost = offload_cost(n, x, setup, pcie_gbs=pcie_gbs, host_memory_bandwidth_gbs=host_memory_bandwidth_gbs)
    return Plan(setup, counts, rows, host, cost)


def search_order(activation_checkpointing: bool, offload_optimizer: bool) -> list[tuple[bool, bool]]:
    """(activation checkpointing, offload) settings tried in turn, cheapest first: the requested ones, then
    checkpointing on (~30% more compute), then the optimizer offloaded (host copies and a CPU step, usually seconds
    per step: `offload_cost`), then both. A setting that is asked for stays on."""
    return list(dict.fromkeys((activation_checkpointing or ac, offload_optimizer or off)
                              for ac, off in ((False, False), (True, False), (False, True), (True, True))))


def suggestions(shape: ModelShape, setup: Setup, gpu_memory_gb: float, margin: float, **estimate
                ) -> dict[Layout, Plan]:
    """Plans for every valid ep size x ZeRO stage 0/1/2, with and without activation checkpointing, and for ZeRO 1/2
    also with the optimizer offloaded. `estimate`: `make_plan`'s keyword arguments."""
    out = {}
    for off in (False, True):
        for ac in (False, True):
            for ep in valid_ep_sizes(shape.num_experts, setup.world):
                for stage in ((1, 2) if off else (0, 1, 2)):
                    out[(ep, stage, ac, off)] = make_plan(shape, replace(
                        setup, ep_size=ep, zero_stage=stage, activation_checkpointing=ac, offload_optimizer=off),
                        **estimate)
    return out


def smallest_fit(plans: dict[Layout, Plan], gpu_memory_gb: float, margin: float, activation_checkpointing: bool,
                 offload_optimizer: bool = False, host_memory_gb: float | None = None) -> Layout | None:
    """Smallest ep size, then smallest ZeRO stage, that fits (GPU, and host memory where offloaded), trying the
    (checkpointing, offload) settings in `search_order`."""
    for ac, off in search_order(activation_checkpointing, offload_optimizer):
        fitting = sorted((ep, st) for (ep, st, a, o), pl in plans.items()
                         if (a, o) == (ac, off) and pl.fits(gpu_memory_gb, margin, host_memory_gb))
        if fitting:
            return (*fitting[0], ac, off)
    return None
