"""UpIT end to end (Hui et al. 2024; docs/upit.md): sft -> assemble -> seed-data -> router-init -> train, from one recipe YAML.

    upcycle-ds upit --config recipe.yaml [--nproc N]          one node: N ranks per training stage
    deepspeed --num_gpus N --module upcycle_ds.cli upit --config recipe.yaml
    sbatch slurm/upit.sbatch recipe.yaml                       every rank runs the recipe (srun)

Each stage writes OUT/STAGE/DONE (its resolved config) and is skipped next time; an interrupted training stage
resumes from its checkpoints. Stage sections of the recipe take the fields of the stage's own command (`sft`:
`upcycle-ds sft --help`, `assemble`: upit-assemble, `seed_data`: seed-data, `router_init`: router-init, `train`:
train); `common` holds `upcycle-ds train` fields applied to every training stage (dtype, zero_stage,
micro_batch_size, max_length, ...). See docs/upit.md for the defaults and which of them are [our choice].
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError

@dataclass(kw_only=True)
class Args:
    model: str
    """The dense HF model (Llama, Mistral, Qwen2, Qwen3) to instruction-tune and upcycle; also the expansion base."""
    data: list[str]
    """Instruction data for sft, seed data and post-training: one or more sources, as `upcycle-ds train --data`
    (files, globs, dirs, hub names, optional mixing weights; rows: messages, prompt+response, text, ...)."""
    out: str
    """Recipe dir: sft/, assemble/, seed_data/, router_init/, train/ (train/hf = the final HF MoE model)."""
    eval_data: list[str] | None = None
    """Held-out data for the eval loss of the training stages, as `train --eval-data` (default: their
    eval_fraction split of --data)."""
    num_experts: int = 4
    """Experts per MoE layer (UpIT FFN setting: 4); more than the sft checkpoints -> genetic expansion."""
    top_k: int = 2
    """Experts per token (UpIT: 2)."""
    layers: str = "all"
    """MoE layers: all, every:N, or i,j,..."""
    seed: int = 0
    """Seed of every stage."""
    nproc: int | None = None
    """Ranks per training stage on this node (deepspeed launcher). Leave unset under deepspeed/torchrun/srun."""
    stages: list[str] = field(default_factory=list)
    """Run only these stages (default all, in order: sft assemble seed_data router_init train)."""
    common: dict = field(default_factory=dict)
    """`upcycle-ds train` fields for every training stage (YAML mapping), e.g. {dtype: bf16, zero_stage: 2}."""
    sft: dict = field(default_factory=dict)
    """`upcycle-ds sft` fields (defaults: epochs 4, lr 2e-5, save_every_epochs 0.25, save_until_epochs 2)."""
    assemble: dict = field(default_factory=dict)
    """`upcycle-ds upit-assemble` fields (shared_weights last|average, dare_p 0.3)."""
    seed_data: dict = field(default_factory=dict)
    """`upcycle-ds seed-data` fields (fraction 0.01, min_samples, max_length, dtype, ...)."""
    router_init: dict = field(default_factory=dict)
    """`upcycle-ds router-init` fields (mode bce|hidden, alpha 0.5, epochs 4, lr 1e-3, prompts)."""
    train: dict = field(default_factory=dict)
    """`upcycle-ds train` fields for post-training (defaults here: lr 2e-5, epochs 2, aux_loss_coef 0.01)."""

    def __post_init__(self):
        import yaml

        for name in ("common", "sft", "assemble", "seed_data", "router_init", "train"):
            v = getattr(self, name)
            if isinstance(v, str):  # given as a flag: a YAML/JSON mapping
                try:
                    v = yaml.safe_load(v)
                except yaml.YAMLError:
                    raise UserError(f"--{name.replace('_', '-')}: not a YAML mapping") from None
            if v is None:
                v = {}
            if not isinstance(v, dict):
                raise UserError(f"--{name.replace('_', '-')} / recipe `{name}`: expected a mapping of field: value")
            setattr(self, name, v)


def run(args: Args) -> int:
    from ..upit.recipe import run_recipe

    return run_recipe(args)
