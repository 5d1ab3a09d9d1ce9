"""What `--resume` continues from, decided before any rank builds an engine (`plan_resume`, part of
`setup.resolve`): the checkpoint tag, the layout it was saved with, whether DeepSpeed's own load restores it
bit-exactly or `elastic.load` re-partitions it, the data position in this layout, and which settings of this run
differ from the recorded ones — each either refused (`RESUME_MUST_MATCH`: they fix the model, its parameter groups or
the data order) or applied (`RESUME_APPLIED`, said in one log line). Every field of the run's settings is in exactly
one of the two sets (a test keeps it so).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import UserError
from . import checkpoint, elastic

RESUME_MUST_MATCH = ("max_length", "seed", "data", "eval_data", "eval_fraction", "max_rows", "freeze",
                     "train_only", "num_experts", "top_k", "layers", "label_field", "mode", "model")
"""Recorded settings a --resume must keep: they fix the model, its parameter groups or the data order a resume
replays (`model` is compared by its config.json, the data by its content: `--resume-data-changed ok` lets the data
settings change and restarts the data position)."""
DATA_SETTINGS = frozenset({"data", "eval_data", "eval_fraction", "max_rows"})
"""Of RESUME_MUST_MATCH, the ones that only choose the data (allowed to change with --resume-data-changed ok)."""
RESUME_APPLIED = frozenset({
    # layout: re-partitioned (`elastic`), the global batch is kept (`elastic.adapt_grad_accum`)
    "nproc", "ep_size", "zero_stage", "ds_config", "dtype", "micro_batch_size", "grad_accum", "global_batch_size",
    "offload_optimizer", "offload_pin_memory", "host_memory_gb",
    # optimizer and schedule: this run's values win over the checkpoint's (`checkpoint.apply_run_settings`)
    "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "adam_betas", "fused_adam", "grad_clip", "max_steps",
    "epochs", "aux_loss_coef", "aux_loss_scope", "z_loss_coef", "capacity_factor",
    # what the run does from here on
    "eval_every", "save_every", "exit_after_steps", "resume", "resume_data_changed", "activation_checkpointing",
    "attn_impl", "expert_impl", "log_every", "peak_tflops", "keep_last", "dist_timeout_s", "io_timeout_s",
    "wandb_mode", "wandb_project", "wandb_entity", "wandb_name", "wandb_group", "wandb_tags",
    "wandb_expert_shares_max", "heatmap_every", "collapse_factor",
    "collapse_steps", "export_hf", "trust_remote_code", "debug_dump_logits", "data_cache", "out",
    # UpIT stages (sft, router-init)
    "save_every_epochs", "save_until_epochs", "hf_weights", "alpha", "bce_tokens", "prompts",
    "overwrite"})
"""Settings a --resume may change: the new value is what runs (and what OUT/{command}_args.yaml records)."""


@dataclass
class TrainState:
    """What a checkpoint must remember besides weights/optimizer/LR/RNG to continue bit-exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    """micro-batches this rank has consumed in `epoch` (the same on every rank)."""
    tokens: int = 0
    """Real (non-padding) tokens trained on so far, all ranks (0 in checkpoints older than this count)."""


@dataclass(frozen=True, kw_only=True)
class ResumePlan:
    tag: str
    tag_dir: Path
    saved_layout: dict
    """The layout the checkpoint was saved with (`elastic.read_layout`)."""
    changes: tuple[str, ...]
    """Layout settings that differ (`elastic.differences`): `key saved -> now`."""
    elastic: bool
    """Load with `elastic.load` (another layout, or a converted checkpoint) instead of DeepSpeed's own load."""
    position: TrainState
    """The checkpoint's data position in this run's layout."""
    data_identity: str | None
    """The tokenised data the checkpoint was trained on (the data cache's split key; None in older checkpoints)."""
    data_changed_ok: bool
    """--resume-data-changed ok: if the data differs, continue on it from its start instead of refusing."""

    def start_state(self, data_identity: str) -> TrainState:
        """Where training continues on data `data_identity`: the saved position, or — the data changed, which
        `check_data` allowed — the start of the new data at the saved step (the LR schedule continues)."""
        if self.data_identity in (None, data_identity):
            return dataclasses.replace(self.position)
        return TrainState(step=self.position.step, tokens=self.position.tokens)

    def check_data(self, data_identity: str, data: list[str]) -> str | None:
        """Refuse a checkpoint trained on other data (unless --resume-data-changed ok); returns a log line when the
        data position restarts on changed data."""
        if self.data_identity is None or self.data_identity == data_identity:
            return None
        if not self.data_changed_ok:
            raise UserError(f"--resume: the training data changed since {self.tag_dir} was saved (--data "
                            f"{' '.join(data)} now tokenises to other rows); pass --resume-data-changed ok to "
                            f"continue on the new data from its start, or use a new --out")
        return (f"--resume-data-changed ok: the data changed since {self.tag}; training continues at step "
                f"{self.position.step} from the start of the new data (epoch 0)")


def layout_of(args, world: int, num_experts: int) -> dict:
    """The layout this run trains with, as checkpoints record it."""
    return {"world_size": world, "ep_size": args.ep_size, "zero_stage": args.zero_stage, "dtype": args.dtype,
            "num_experts": num_experts, "micro_batch_size": args.micro_batch_size, "grad_accum": args.grad_accum}


def plan_resume(args, world: int, command: str, model_config: dict, num_experts: int, *,
                deep: bool) -> tuple[object, ResumePlan | None, list[str]]:
    """(args — with --grad-accum set to keep the checkpoint's global batch —, the plan or None, log lines).

    No checkpoint in OUT/checkpoints: no plan (a fresh run). One without --resume: refused. With --resume: the tag
    `latest` names, checked against this model (config.json), the recorded settings (OUT/{command}_args.yaml) and
    this layout. `deep` (the launcher, rank 0): also open every file of the tag safely and check it is complete,
    so that no rank fails — and leaves the others waiting — inside a collective load."""
    ckpt = Path(args.out) / "checkpoints"
    tag = checkpoint.latest_tag(ckpt)
    if tag is None:
        return args, None, []
    if not args.resume:
        raise UserError(f"{ckpt} already holds a checkpoint; pass --resume to continue it or use a new --out")
    tag_dir = ckpt / tag
    saved_cfg = ckpt / "config.json"
    if saved_cfg.is_file():
        from ..io.hf import read_json_object

        compare_configs(read_json_object(saved_cfg), model_config, saved_cfg, args.model)
    record = Path(args.out) / f"{command}_args.yaml"
    changed = changed_settings(record, args, ckpt)  # refuses a changed RESUME_MUST_MATCH setting
    if deep:
        checkpoint.precheck(tag_dir)
    saved, run = elastic.read_layout(tag_dir), elastic.read_run(tag_dir)
    if saved.get("num_experts") not in (None, num_experts):
        raise UserError(f"--resume: {tag_dir} holds a model with {saved['num_experts']} experts, --model "
                        f"{args.model} has {num_experts}; use a new --out")
    notes = []
    adapted = dataclasses.replace(args)
    line = elastic.adapt_grad_accum(adapted, world, saved)
    if line:
        notes.append(line)
    changed = [c for c in changed if not c.startswith("--grad-accum ")] + changed_settings(
        record, adapted, ckpt, only=("grad_accum",))
    if changed:
        notes.append(f"--resume with changed settings (applied): {', '.join(changed)}")
    now = layout_of(adapted, world, num_experts)
    changes = tuple(elastic.differences(saved, now))
    is_elastic = bool(changes) or not elastic.is_native(tag_dir)
    if deep:
        checkpoint.check_complete(tag_dir, model_config, saved)
        if is_elastic:
            elastic.open_saved_optimizer(tag_dir)  # readable in full, before any rank loads it
    position = elastic.position(run.get("train_state") or {"batch_in_epoch": 0}, saved, now)
    ident = run.get("data_identity")
    plan = ResumePlan(tag=tag, tag_dir=tag_dir, saved_layout=saved, changes=changes, elastic=is_elastic,
                      position=TrainState(**position), data_identity=ident if isinstance(ident, str) else None,
                      data_changed_ok=getattr(args, "resume_data_changed", "refuse") == "ok")
    return adapted, plan, notes


# ------------------------------------------------------------------------------------------ the recorded settings
def read_record(path: Path, cls) -> dict:
    """The settings a run recorded (OUT/{command}_args.yaml, grouped in `cls.SECTIONS` or flat), as one flat dict
    ({} if there is none or it is unreadable: a record only)."""
    from ..cli_args import canonical_settings, flatten_sections

    try:
        data = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return {}
    # (a record written before a flag was renamed uses its old spelling)
    return canonical_settings(flatten_sections(data, cls), cls) if isinstance(data, dict) else {}


def changed_settings(record: Path, args, ckpt: Path, only: tuple[str, ...] | None = None) -> list[str]:
    """`--flag old -> new` for each recorded setting (OUT/{command}_args.yaml) this run changes (of `only`, if
    given); a changed `RESUME_MUST_MATCH` setting is refused with one line naming it."""
    old = read_record(record, type(args))
    if not old:
        return []
    new = resolved_settings(args)
    allow_data = getattr(args, "resume_data_changed", "refuse") == "ok"
    out = []
    keys = set(old) & set(new) & set(only or new)
    for key in [k for k in RESUME_MUST_MATCH if k in keys] + sorted(keys - set(RESUME_MUST_MATCH)):
        if _same_setting(key, old[key], new[key]):
            continue
        if key in RESUME_MUST_MATCH and not (allow_data and key in DATA_SETTINGS) and key != "model":
            raise UserError(f"--resume: the checkpoint in {ckpt} was trained with {_flag(key)} {_show(old[key])}, "
                            f"this run has {_show(new[key])} ({record}); resume with the same value or use a new "
                            f"--out")
        if key not in ("resume", "nproc", "model", "out"):
            out.append(f"{_flag(key)} {_show(old[key])} -> {_show(new[key])}")
    return out


def resolved_settings(args) -> dict:
    """The run's settings as plain data, flat (`nproc` cleared: a record is of the run, not of its launcher)."""
    from ..cli_args import settings_of

    return {**settings_of(args), "nproc": None}


_CONFIG_IGNORED = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache"}
_KEY_ORDER = {k: i for i, k in enumerate(("model_type", "num_local_experts", "num_experts", "num_experts_per_tok",
                                          "hidden_size", "num_hidden_layers", "intermediate_size",
                                          "moe_intermediate_size", "vocab_size"))}


def compare_configs(old: dict, new: dict, old_path: Path, model: str) -> None:
    """Keys both configs have must agree (a key only one side has, e.g. one a newer transformers adds on save, is
    not a different model), and the keys that define the model's shapes must be on both sides."""
    keys = (set(old) & set(new)) | set(_KEY_ORDER)
    for k in sorted(keys - _CONFIG_IGNORED, key=lambda k: (k not in _KEY_ORDER, _KEY_ORDER.get(k, 0), k)):
        if old.get(k) != new.get(k):
            raise UserError(f"--resume: the checkpoint's model differs from --model {model}: {k} is "
                            f"{_show(old.get(k))} in {old_path}, {_show(new.get(k))} now")


def _same_setting(key: str, a, b) -> bool:
    if a == b:
        return True
    if key in ("data", "eval_data", "model", "out") and a and b:
        a, b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
        return len(a) == len(b) and all(_same_path(x, y) for x, y in zip(a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return False


def _same_path(a, b) -> bool:
    a, b = str(a), str(b)
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return not Path(a).exists()  # recorded relative to another working directory: cannot tell (the data's
        # content is compared anyway: `ResumePlan.check_data`)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."
