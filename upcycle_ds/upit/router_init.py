"""UpIT stage 3b (Hui et al. 2024, router initialisation; docs/upit.md): initialise the routers of an HF MoE checkpoint; writes OUT/hf (HF MoE).

--mode bce (default, UpIT): train only the routers (`train_only` = the router parameters; every other weight stays
bit-identical) on the seed data of `upcycle-ds seed-data` (rows with an `expert` field) with DeepSpeed, loss
    alpha * L_lm + (1 - alpha) * BCE(sigmoid(logits_TE), one_hot(expert of the token's sample))
where logits_TE = h W_router^T are each MoE layer's own router logits on its own input h. The BCE is averaged over
tokens, experts and MoE layers (a mean, so alpha keeps its meaning whatever E and the layer count). Tokens: every
token of the sample (`--bce-tokens all`, default: the router sees prompt tokens too) or only the response tokens.
Logged per step: `bce` and `top1_match` (fraction of labelled tokens whose top-1 expert is their sample's expert).
A granular MoE (`--granularity G` at upcycle / upit-assemble, recorded in config.json): a label is a copy c, the
target is 1 on its G experts c*G..c*G+G-1 (which start with one shared router row) and a top-1 match is any of them.
Same launchers as `train` (--nproc N, deepspeed, torchrun, srun), same checkpoints and --resume.

--mode hidden (mergekit-style, no training): for each expert, the mean over its positive prompts (and their tokens)
of every MoE layer's router input h, minus the same mean over its negative prompts if any, L2-normalised, becomes
that expert's router row. Prompts file (YAML): `experts: [{positive_prompts: [...], negative_prompts: [...]}, ...]`,
one entry per expert, in expert order (or a plain list of such entries); for a granular MoE one entry per copy, whose
row all G experts of the copy get. Runs in this process (no launcher).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import UserError
from ..moe.names import ROUTER_PARAM_RE
from ..train.config import TrainArgs

ROUTER_PARAM = ROUTER_PARAM_RE


@dataclass(kw_only=True)
class RouterInitConfig(TrainArgs):
    SECTIONS = {**TrainArgs.SECTIONS,
                "router_init": ("mode", "alpha", "bce_tokens", "label_field", "prompts", "overwrite")}

    model: str
    """HF MoE checkpoint whose routers to initialise (e.g. from `upcycle-ds upit-assemble`)."""
    out: str
    """Run dir: hf/ (the HF MoE checkpoint with initialised routers), checkpoints/, metrics.jsonl."""
    data: list[str] | None = field(default=None, metadata={"aliases": ["seed_data"]})
    """Mode bce: the seed data, rows with an `expert` field (OUT/seed.jsonl of `upcycle-ds seed-data`); one or more
    sources, as `train --data`."""
    mode: Literal["bce", "hidden"] = "bce"
    """bce: train the routers on the seed data (UpIT); hidden: router rows from per-expert prompt hidden states."""
    alpha: float = 0.5
    """Loss = alpha * LM loss + (1 - alpha) * router BCE (UpIT [our choice]: 0.5)."""
    bce_tokens: Literal["all", "response"] = "all"
    """Tokens that carry the BCE term: all tokens of the sample, or only its response (loss) tokens."""
    label_field: str = "expert"
    """Seed-data field holding the sample's expert id."""
    prompts: str | None = None
    """Mode hidden: YAML with one {positive_prompts, negative_prompts} entry per expert."""
    epochs: float = 4.0
    """Epochs over the seed data (UpIT: 4)."""
    lr: float = 1e-3
    """Router learning rate ([our choice]: the routers start random, so higher than post-training's)."""
    eval_fraction: float = 0.0
    """Held-out fraction of the seed data (default none: it is small)."""
    aux_loss_coef: float = 0.0
    """Load-balancing loss coefficient (off: the BCE targets define the routing)."""
    z_loss_coef: float = 0.0
    """Router z-loss coefficient (off by default here)."""
    train_only: list[str] = field(default_factory=lambda: [ROUTER_PARAM])
    """Regexes of the parameters to train (default: the routers only)."""
    overwrite: bool = False
    """Mode hidden: replace OUT/hf if it exists."""

    def validate(self, world_size: int, num_experts: int) -> None:
        if self.mode == "bce" and self.data is None:
            raise UserError("--data (the seed data of `upcycle-ds seed-data`) is required with --mode bce")
        if not 0 <= self.alpha <= 1:
            raise UserError(f"--alpha must be in [0, 1] (got {self.alpha})")
        super().validate(world_size, num_experts)


# ------------------------------------------------------------------------------------------------------ mode bce
def router_bce(layers, sample_labels, labels, num_experts: int, response_only: bool, granularity: int = 1):
    """(BCE averaged over labelled tokens x experts x MoE layers, fraction of labelled (token, layer) pairs whose
    top-1 router expert is the label). `sample_labels` [B, L] (-1 = padding) in the order the layers flatten tokens.

    With `granularity` G > 1 (a granular MoE: experts c*G+g are the G slices of copy c) a label is a copy c: the
    target is 1 on its G experts, and a top-1 expert matches when it is one of them."""
    import torch
    import torch.nn.functional as F

    from ..data import IGNORE

    lab_T = sample_labels.reshape(-1)
    ok_T = lab_T >= 0
    if response_only:
        ok_T = ok_T & (labels.reshape(-1) != IGNORE)
    G = granularity
    target_TE = lab_T.new_zeros((lab_T.shape[0], num_experts), dtype=torch.float32)
    slots_TG = lab_T.clamp(min=0)[:, None] * G + torch.arange(G, device=lab_T.device)  # copy c -> experts c*G+g
    target_TE.scatter_(1, slots_TG, 1.0)  # multi-hot without F.one_hot's range check (a sync)
    w_T = ok_T.float()
    n = w_T.sum().clamp_min(1)  # no host sync: masked means instead of boolean indexing
    bces, hits = [], []
    for _, moe in layers:
        logits_TE = moe.router.logits_TE
        if logits_TE is None or logits_TE.shape[0] != lab_T.shape[0]:
            raise RuntimeError("router logits missing or not one per token (record_logits not set?)")
        per_TE = F.binary_cross_entropy_with_logits(logits_TE, target_TE, reduction="none")
        bces.append((per_TE * w_T[:, None]).sum() / (n * num_experts))
        hits.append(((logits_TE.argmax(-1) // G == lab_T).float() * w_T).sum().detach() / n)
    bce = torch.stack(bces).mean()
    return bce, torch.stack(hits).mean()


def stage_for(args: RouterInitConfig):
    """The router-init (--mode bce) stage of the Trainer: per-sample expert labels, LM + router BCE loss."""
    from ..train.stage import Stage

    state: dict = {}

    def setup(*, model, layers, config, data) -> None:
        from ..options import granularity_of

        if not layers:
            raise UserError(f"{args.model} has no MoE layers")
        E = layers[0][1].num_experts
        G = granularity_of(config)
        if E % G:
            raise UserError(f"{args.model}: {E} experts cannot be {G}-way granular (config.json upcycle_ds record)")
        top = data.max_sample_label()
        if top >= E // G:
            what = f"{E} experts" if G == 1 else f"{E // G} copies of {G} slices"
            raise UserError(f"--data {' '.join(args.data)}: {args.label_field!r} {top} is out of range: {args.model} "
                            f"has {what} (labels 0..{E // G - 1})")
        for _, moe in layers:
            moe.router.record_logits = True
        state["E"], state["G"] = E, G

    def loss(*, lm, moe, batch, layers):
        bce, top1 = router_bce(layers, batch["sample_labels"], batch["labels"], state["E"],
                               args.bce_tokens == "response", state["G"])
        return args.alpha * lm + (1 - args.alpha) * bce + moe, {"bce": bce.detach(), "top1_match": top1}

    return Stage(command="router-init", label_field=args.label_field, setup=setup, loss=loss)


# --------------------------------------------------------------------------------------------------- mode hidden
def load_prompts(path: str, num_experts: int, what: str = "experts") -> list[tuple[list[str], list[str]]]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts {path}: no such file")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"--prompts {path}: not a UTF-8 text file (expected YAML)") from None
    except yaml.YAMLError as e:
        raise UserError(f"--prompts {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    entries = data.get("experts") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise UserError(f"--prompts {path}: expected `experts:` with one entry per expert")
    if len(entries) != num_experts:
        raise UserError(f"--prompts {path}: {len(entries)} expert entries, the model has {num_experts} {what}")
    out = []
    for i, e in enumerate(entries):
        pos = e.get("positive_prompts") if isinstance(e, dict) else None
        neg = (e.get("negative_prompts") or []) if isinstance(e, dict) else []
        if not pos or not all(isinstance(s, str) and s for s in pos) or not all(isinstance(s, str) for s in neg):
            raise UserError(f"--prompts {path}: expert {i} needs a non-empty list of positive_prompts (strings)")
        out.append((list(pos), list(neg)))
    return out


def hidden_router_rows(model, tokenizer, prompts: list[tuple[list[str], list[str]]]) -> dict:
    """{MoE layer: [E, H] router rows}: per expert, mean router input over its positive prompts' tokens (each prompt
    averaged over its tokens, then prompts averaged) minus the same for its negative prompts, L2-normalised."""
    import torch

    from ..moe.layer import moe_layers

    layers = moe_layers(model)
    captured: dict[int, torch.Tensor] = {}
    handles = [moe.router.register_forward_hook(
        lambda mod, inp, out, l=l: captured.__setitem__(l, inp[0].detach().double().mean(0)))
        for l, moe in layers]

    def mean_hidden(texts: list[str]) -> dict[int, torch.Tensor]:
        acc = {l: 0 for l, _ in layers}
        for t in texts:
            ids = tokenizer(t, return_tensors="pt")["input_ids"]
            model(input_ids=ids, use_cache=False)
            for l, _ in layers:
                acc[l] = acc[l] + captured[l]
        return {l: v / len(texts) for l, v in acc.items()}

    rows = {l: [] for l, _ in layers}
    model.eval()
    try:
        with torch.no_grad():
            for pos, neg in prompts:
                h = mean_hidden(pos)
                if neg:
                    hn = mean_hidden(neg)
                    h = {l: h[l] - hn[l] for l in h}
                for l in rows:
                    rows[l].append(h[l] / h[l].norm().clamp_min(1e-8))
    finally:
        for hd in handles:
            hd.remove()
    return {l: torch.stack(r) for l, r in rows.items()}


def run_hidden(args: RouterInitConfig) -> int:
    from transformers import AutoTokenizer

    from ..families import family_for
    from ..io.hf import HFCheckpoint, check_output_dir, write_hf_checkpoint
    from ..io.paths import check_apart
    from ..surgery import build_moe_model

    if args.prompts is None:
        raise UserError("--mode hidden needs --prompts prompts.yaml")
    run_dir = Path(args.out)
    out = run_dir / "hf"
    check_apart(run_dir, (("--model", args.model), ("--prompts", args.prompts)))
    if out.exists():
        check_output_dir(out, args.overwrite)
    if not run_dir.is_dir():
        check_output_dir(run_dir, False)  # its parent must exist
    args.validate_values()
    src = HFCheckpoint(args.model)
    family, is_moe = family_for(src.config)
    if not is_moe:
        raise UserError(f"{args.model} is a dense checkpoint; router-init needs an HF MoE checkpoint")
    from ..options import granularity_of

    E, G = family.num_experts(src.config), granularity_of(src.config)
    if E % G:
        raise UserError(f"{args.model}: {E} experts cannot be {G}-way granular (config.json upcycle_ds record)")
    prompts = load_prompts(args.prompts, E // G, "experts" if G == 1 else f"copies of {G} slices (one entry each)")
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model = build_moe_model(src, ep_size=1)
    rows = hidden_router_rows(model, tokenizer, prompts)
    new = {family.router_key(l): r.repeat_interleave(G, dim=0) for l, r in rows.items()}  # a copy's G experts
    missing = [k for k in new if k not in src]
    if missing:
        raise UserError(f"{args.model}: no router tensor {missing[0]} (expected the hub per-expert layout)")
    created = not run_dir.exists()
    run_dir.mkdir(exist_ok=True)
    try:
        write_hf_checkpoint(src, out, overwrite=args.overwrite, side_dir=args.model, desc="router-init",
                            inputs=(("--model", args.model),), get=lambda k: new[k].to(src.dtype(k)) if k in new else src.get(k))
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    print(f"router-init (hidden): router rows of layers {sorted(rows)} from {args.prompts} -> {out}",
          file=sys.stderr)
    return 0


def run_router_init(args: RouterInitConfig) -> int:
    if args.mode == "hidden":
        return run_hidden(args)
    from ..launch.local import launched_by_a_launcher

    if args.nproc is not None and not launched_by_a_launcher():
        from ..train.preflight import launch_checked

        return launch_checked(args, stage_for(args))
    from ..train.trainer import run_rank

    return run_rank(args, stage_for(args))
