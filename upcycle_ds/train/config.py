"""Training run configuration: every field is a `upcycle-ds train` flag (and a key of its --config YAML file)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..errors import UserError
from .. import checks

if TYPE_CHECKING:
    import torch

DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
"""zero{0,1,2}.json, shipped in the package: GPU defaults (overlapped communication, 5e8-element buckets)."""
CPU_ZERO_OVERRIDES = {"overlap_comm": False, "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
"""Applied on CPU (gloo) ranks unless --ds-config is given: no comm/compute overlap without device streams, and
buckets of 5e7 elements (each bucket is allocated in full, in host memory there)."""
ATTN_IMPLS = ("sdpa", "eager", "flash_attention_2", "flex_attention")


@dataclass(kw_only=True)
class TrainArgs:
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "model": ("model", "num_experts", "top_k", "layers", "capacity_factor", "attn_impl", "expert_impl",
                  "activation_checkpointing", "trust_remote_code"),
        "data": ("data", "eval_data", "eval_fraction", "max_rows", "max_length", "data_cache", "seed"),
        "parallelism": ("nproc", "ep_size", "zero_stage", "ds_config", "dtype", "micro_batch_size", "grad_accum",
                        "global_batch_size", "offload_optimizer", "offload_pin_memory", "host_memory_gb",
                        "dist_timeout_s", "io_timeout_s"),
        "optimizer": ("lr", "min_lr_ratio", "warmup_steps", "max_steps", "epochs", "weight_decay", "adam_betas",
                      "fused_adam", "grad_clip", "aux_loss_coef", "aux_loss_scope", "z_loss_coef", "freeze",
                      "train_only"),
        "checkpointing": ("out", "save_every", "keep_last", "resume", "resume_data_changed", "exit_after_steps",
                          "export_hf", "debug_dump_logits"),
        "logging": ("log_every", "eval_every", "peak_tflops", "wandb_mode", "wandb_project", "wandb_entity",
                    "wandb_name", "wandb_group", "wandb_tags", "wandb_expert_shares_max", "heatmap_every",
                    "collapse_factor", "collapse_steps"),
    }
    """How --print-config, --config files and OUT/{command}_args.yaml group the fields (flags keep their names;
    a --config file may also list fields flat)."""

    model: str
    """Start from: an HF MoE checkpoint (from `upcycle-ds upcycle` or the hub), an HF dense checkpoint (upcycled on
    the fly with --num-experts/--top-k/--layers), or a DeepSpeed checkpoint dir written by `upcycle-ds convert --to ds`."""
    data: list[str]
    """Training data: one or more sources, each a .jsonl/.json (also .gz/.zst), .parquet or .arrow file, a glob, a
    directory, a save_to_disk dir or a hub dataset name (org/name[:split]), with an optional mixing weight
    (`--data a.jsonl:0.7 b.parquet:0.3`). Rows: messages, prompt+response/completion, instruction+output,
    input+ideal, text, or pre-tokenised input_ids (docs/data.md). Loss is on responses only."""
    out: str
    """Run dir: checkpoints/ (DeepSpeed), metrics.jsonl, W&B offline run, load heatmaps, hf/ (final HF MoE export)."""
    nproc: int | None = None
    """Start this many ranks on this node with the `deepspeed` launcher (CPU ranks without GPUs). Leave unset when
    already started by `deepspeed`, `torchrun` or `srun`."""
    ep_size: int = 1
    """Expert-parallel size: experts are split over this many ranks (must divide E and the world size)."""
    zero_stage: int = 1
    """ZeRO stage 0, 1 or 2 (DeepSpeed-MoE does not support 3). Picks the packaged ds_configs/zero{stage}.json."""
    ds_config: str | None = None
    """A DeepSpeed JSON config to start from instead of the packaged zero{stage}.json; the flags here override it."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """Training precision (bf16 mixed precision with fp32 master weights, or plain fp32). fp16 is not offered."""
    micro_batch_size: int = 2
    """Packed rows per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    global_batch_size: int | None = None
    """Optional check: must equal micro_batch_size * grad_accum * world_size."""
    max_length: int = 512
    """Tokens per packed training row."""
    max_steps: int | None = None
    """Optimizer steps to train (default: --epochs over the data). The LR schedule always spans max_steps."""
    epochs: float = 1.0
    """Epochs over the training data when --max-steps is not given."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to norms, biases, routers)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    fused_adam: bool = True
    """torch AdamW(fused=True): one kernel over all parameters (bench/step_time.py: the ZeRO-1 optimizer step 2.6x
    faster on CPU); --no-fused-adam for torch's default (foreach) implementation."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 = off)."""
    aux_loss_coef: float = 0.01
    """Load-balancing loss coefficient (Switch: E * sum f_i P_i, per MoE layer, summed over layers)."""
    z_loss_coef: float = 1e-3
    """Router z-loss coefficient (ST-MoE)."""
    capacity_factor: float | None = None
    """Expert capacity factor during training (None: as recorded by upcycle, default dropless)."""
    freeze: list[str] = field(default_factory=list)
    """Regexes of parameter names to freeze (e.g. 'embed_tokens' 'self_attn')."""
    train_only: list[str] = field(default_factory=list)
    """Regexes: train only matching parameters, freeze all others (UpIT router init: the routers,
    'deepspeed_moe\\.gate\\.')."""
    num_experts: int | None = None
    """Only for a dense --model: upcycle on the fly into this many experts."""
    top_k: int = 2
    """Only for a dense --model: experts per token."""
    layers: str = "all"
    """Only for a dense --model: which layers become MoE (all, every:N, i,j,...)."""
    eval_fraction: float = 0.05
    """Held-out fraction of --data for eval loss (0 = none); ignored with --eval-data."""
    eval_data: list[str] | None = None
    """Separate eval data source(s) (as --data, without weights)."""
    data_cache: str | None = None
    """Tokenised-data cache root (default $UPCYCLE_DS_DATA_CACHE, else ~/.cache/upcycle_ds/data); data is tokenised
    once into it and memory-mapped by every rank, on every run and resume (docs/data.md)."""
    eval_every: int = 0
    """Eval loss + expert-load heatmap every N steps (0 = only at the end)."""
    save_every: int = 0
    """DeepSpeed checkpoint every N steps (0 = only at the end)."""
    exit_after_steps: int | None = None
    """Save a checkpoint and exit 0 after this many steps in this process (wall-time-limited cluster jobs); the LR
    schedule still follows --max-steps. Continue with --resume."""
    resume: bool = False
    """Continue from the latest checkpoint in OUT/checkpoints (bit-exact: weights, optimizer, LR, RNG, data position);
    starts fresh when there is none."""
    resume_data_changed: Literal["refuse", "ok"] = "refuse"
    """With --resume, when the training data is not what the checkpoint was trained on (other rows, or other
    --data / --eval-data / --eval-fraction / --max-rows): refuse (default), or `ok` to continue on the new data
    from its start (the step count and LR schedule continue; logged)."""
    seed: int = 0
    """Seed for data order, eval split and RNGs."""
    max_rows: int | None = field(default=None, metadata={"aliases": ["max_samples"]})
    """Use only N rows of each data source (quick runs; drawn by --seed, docs/data.md)."""
    activation_checkpointing: bool = field(default=False, metadata={"aliases": ["gradient_checkpointing"]})
    """Recompute each decoder layer's activations in backward (HF gradient checkpointing: less memory, ~30% more
    compute); `upcycle-ds plan` uses the same flag and default."""
    attn_impl: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    """Attention kernel (transformers' attn_implementation). Packed rows hand per-sample boundaries to the kernel
    through position_ids: flash_attention_2 and flex_attention use them as variable-length sequences; sdpa and eager
    build a block-diagonal mask (so sdpa cannot use its flash kernel on packed rows). See docs/training.md."""
    expert_impl: Literal["grouped", "loop"] = "grouped"
    """Local experts as one grouped GEMM (torch grouped_mm; the loop is used where the device/dtype lacks it) or a
    Python loop over experts."""
    log_every: int = 1
    """Print one progress line (loss, lr, tokens/s, MFU, memory, ETA) and log metrics every N steps; metrics stay on
    the device in between."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for MFU (default: the data-sheet bf16/TF32 peak of known GPUs; none on CPU)."""
    keep_last: int | None = None
    """Keep only the N newest checkpoints (the one `latest` names is never deleted); default: keep all."""
    dist_timeout_s: float = 1800.0
    """Timeout of the training step's collectives (NCCL/gloo): a rank that stops answering ends the job."""
    io_timeout_s: float = 86400.0
    """How long ranks wait for another rank's disk writes (HF exports, sft checkpoints) in a host-side barrier."""
    wandb_mode: Literal["offline", "online", "disabled"] | None = None
    """W&B tracking: offline run files in OUT, online (opt-in), or disabled (default: $WANDB_MODE, else offline);
    metrics.jsonl always."""
    wandb_project: str | None = None
    """W&B project (default: $WANDB_PROJECT, else upcycle_ds)."""
    wandb_entity: str | None = None
    """W&B entity, a user or team (default: $WANDB_ENTITY, else your W&B default)."""
    wandb_name: str | None = None
    """W&B run name (default: $WANDB_NAME, else W&B's generated one). Every start of the same OUT logs to the same
    W&B run (its id is kept in OUT/wandb/run_id), however often it is resumed or requeued."""
    wandb_group: str | None = None
    """W&B run group (default: $WANDB_RUN_GROUP)."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B tags (default: $WANDB_TAGS, comma-separated)."""
    wandb_expert_shares_max: int = 256
    """Log each expert's share of each MoE layer as a W&B scalar (moe/layerL/expertE_share) while MoE layers x
    experts is at most this (0 = never); above it W&B gets the per-layer max/min share and the heatmaps, and
    metrics.jsonl still has every share."""
    heatmap_every: int = 100
    """Every N steps: an expert-load heatmap (layers x experts, the load since the previous one) in W&B and
    OUT/load_heatmap_train_step{N}.png (0 = only at eval)."""
    collapse_factor: float = 4.0
    """Warn (once per layer) when one expert gets more than this many times its fair share 1/E ..."""
    collapse_steps: int = 10
    """... for this many logged steps in a row."""
    export_hf: bool = True
    """At the end, also write the trained model as an HF MoE checkpoint to OUT/hf."""
    trust_remote_code: bool = False
    """Allow the tokenizer to run code shipped with the checkpoint (off unless you ask)."""
    debug_dump_logits: bool = False
    """Debugging/tests: after the final checkpoint, run the trained engine (eval mode) on each rank's first eval
    micro-batch (train rows if there is no eval split) and save {input_ids, position_ids, logits} (fp32) to
    OUT/debug/final_logits_rank{r}.pt, e.g. to check that OUT/hf computes the same logits in transformers."""
    aux_loss_scope: Literal["micro", "global"] = "micro"
    """Tokens the load-balancing loss counts expert frequencies f_i over: each micro-batch of each rank (micro, the
    Switch / HF loss), or every rank's micro-batches of the optimizer step so far (global: global-batch balancing,
    Megatron-Core's global_aux_loss; one small all_reduce per micro-step). docs/training.md defines it exactly."""
    offload_optimizer: bool = False
    """ZeRO-Offload (ZeRO 1/2): the fp32 master weights, AdamW moments and fp32 gradients of this rank's ZeRO
    partition live in host memory and AdamW steps there (torch's fused AdamW); the GPU keeps the weights, the
    gradients being reduced and the activations. Saves 16 bytes of GPU memory per partition element (and ZeRO-2's
    gradient partition) for host<->device copies and a CPU AdamW step per optimizer step: `upcycle-ds plan
    --offload-optimizer` shows both (docs/training.md)."""
    offload_pin_memory: bool = False
    """With --offload-optimizer: page-locked (pinned) host buffers, for faster host<->device copies; pinned memory
    cannot be swapped out or used by other processes."""
    host_memory_gb: float | None = None
    """With --offload-optimizer: host RAM of one node in GiB (default: this machine's); `--nproc N` checks before
    starting the ranks that the offloaded state of N ranks fits in it (`upcycle-ds plan`'s figure, 10% kept free)."""

    # ------------------------------------------------------------------------------------------------ validation
    def validate(self, world_size: int, num_experts: int) -> None:
        """Checks that need no work: one clear error naming the flag, before anything starts."""
        if self.zero_stage == 3:
            raise UserError("--zero-stage 3 is not supported with DeepSpeed-MoE (native MoE supports ZeRO 0/1/2)")
        checks.zero_stage(self.zero_stage)
        checks.offload_needs_zero(self.offload_optimizer, self.zero_stage)
        if self.dtype == "fp16":
            raise UserError("fp16 is not supported; use --dtype bf16 or fp32")
        if self.dtype not in ("bf16", "fp32"):  # a --config YAML value bypasses argparse's choices
            raise UserError(f"--dtype must be bf16 or fp32 (got {self.dtype!r})")
        if self.ep_size < 1 or num_experts % self.ep_size:
            raise UserError(f"--ep-size {self.ep_size} must divide the number of experts ({num_experts})")
        if world_size % self.ep_size:
            raise UserError(f"--ep-size {self.ep_size} must divide the world size ({world_size} ranks)")
        for name in ("micro_batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        want = self.micro_batch_size * self.grad_accum * world_size
        if self.global_batch_size is not None and self.global_batch_size != want:
            raise UserError(f"--global-batch-size {self.global_batch_size} != --micro-batch-size "
                            f"{self.micro_batch_size} x --grad-accum {self.grad_accum} x {world_size} ranks = {want}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("--max-steps must be >= 1")
        if self.exit_after_steps is not None and self.exit_after_steps < 1:
            raise UserError("--exit-after-steps must be >= 1")
        if self.save_every < 0 or self.eval_every < 0:
            raise UserError("--save-every / --eval-every must be >= 0")
        if self.lr <= 0:
            raise UserError("--lr must be > 0")
        self.validate_values()

    def validate_values(self) -> None:
        """Ranges of single values (no world size or model needed): every float finite, betas in [0, 1), fractions
        in range, regexes that compile. A --config YAML value or a programmatic TrainArgs reach this too."""
        import dataclasses
        import math
        import re
        import typing

        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            vals = v if isinstance(v, (list, tuple)) else [v]
            if "float" in str(hints.get(f.name)) and any(isinstance(x, float) and not math.isfinite(x) for x in vals):
                checks.finite(f"--{_flag(f.name)}", v)
        if not (self.lr > 0):
            raise UserError(f"--lr must be > 0 (got {self.lr})")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise UserError(f"--adam-betas must be two numbers in [0, 1) (got {list(self.adam_betas)})")
        if not 0 <= self.eval_fraction < 1:
            raise UserError(f"--eval-fraction must be in [0, 1) (got {self.eval_fraction})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"--min-lr-ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.capacity_factor is not None:
            checks.positive("--capacity-factor", self.capacity_factor)
        if self.max_steps is None and not self.epochs > 0:
            raise UserError(f"--epochs must be > 0 (got {self.epochs})")
        for name in ("weight_decay", "grad_clip", "aux_loss_coef", "z_loss_coef", "warmup_steps", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must be >= 0 (got {getattr(self, name)})")
        checks.at_least("--max-length", self.max_length, 2)
        if self.max_rows is not None:
            checks.at_least("--max-rows", self.max_rows, 1)
        if self.num_experts is not None:
            checks.at_least("--num-experts", self.num_experts, 2)
        if self.top_k < 1:
            raise UserError(f"--top-k must be >= 1 (got {self.top_k})")
        for flag, pats in (("--freeze", self.freeze), ("--train-only", self.train_only)):
            for pat in pats:
                try:
                    re.compile(pat)
                except re.error as e:
                    raise UserError(f"{flag} {pat!r} is not a valid regular expression ({e})") from None
        if self.wandb_expert_shares_max < 0:
            raise UserError(f"--wandb-expert-shares-max must be >= 0 (got {self.wandb_expert_shares_max})")
        if self.heatmap_every < 0 or self.collapse_steps < 1 or not self.collapse_factor > 1:
            raise UserError("--heatmap-every must be >= 0, --collapse-steps >= 1 and --collapse-factor > 1")
        if self.log_every < 1:
            raise UserError(f"--log-every must be >= 1 (got {self.log_every})")
        if self.keep_last is not None and self.keep_last < 1:
            raise UserError(f"--keep-last must be >= 1 (got {self.keep_last})")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise UserError(f"--peak-tflops must be > 0 (got {self.peak_tflops})")
        if not (self.dist_timeout_s > 0 and self.io_timeout_s > 0):
            raise UserError("--dist-timeout-s and --io-timeout-s must be > 0")
        if self.attn_impl not in ATTN_IMPLS:
            raise UserError(f"--attn-impl must be one of {', '.join(ATTN_IMPLS)} (got {self.attn_impl!r})")
        if self.expert_impl not in ("grouped", "loop"):
            raise UserError(f"--expert-impl must be grouped or loop (got {self.expert_impl!r})")
        if self.aux_loss_scope not in ("micro", "global"):
            raise UserError(f"--aux-loss-scope must be micro or global (got {self.aux_loss_scope!r})")
        checks.pin_needs_offload(self.offload_pin_memory, self.offload_optimizer)
        if self.host_memory_gb is not None:
            checks.positive("--host-memory-gb", self.host_memory_gb)

    def torch_dtype(self) -> "torch.dtype":
        import torch  # not at import: `upcycle-ds train --help` needs no torch

        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    def to_dict(self) -> dict:
        return asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def deepspeed_config(args: TrainArgs, world_size: int, on_gpu: bool) -> dict:
    """The ds_config dict: the stage's packaged JSON file (or --ds-config) with the flags applied on top; on CPU
    ranks the packaged file gets `CPU_ZERO_OVERRIDES`."""
    path = Path(args.ds_config) if args.ds_config else DS_CONFIGS / f"zero{args.zero_stage}.json"
    if not path.is_file():
        raise UserError(f"DeepSpeed config not found: {path}" + ("" if args.ds_config else
                        " (the package is incomplete: reinstall upcycle_ds)"))
    from ..io.hf import read_json_object

    cfg = read_json_object(path)
    if not on_gpu and args.ds_config is None and args.zero_stage:
        cfg.setdefault("zero_optimization", {}).update(CPU_ZERO_OVERRIDES)
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    cfg["gradient_accumulation_steps"] = args.grad_accum
    cfg["train_batch_size"] = args.micro_batch_size * args.grad_accum * world_size
    cfg["gradient_clipping"] = args.grad_clip
    cfg.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    cfg["bf16"] = {"enabled": args.dtype == "bf16"}
    cfg.pop("fp16", None)
    cfg["zero_allow_untested_optimizer"] = True
    if args.offload_optimizer:  # fp32 masters + AdamW state on the host, stepped by our torch AdamW there
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": args.offload_pin_memory}
    cfg["zero_force_ds_cpu_optimizer"] = False  # ZeRO-Offload may step the client's (fused) torch AdamW
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg
