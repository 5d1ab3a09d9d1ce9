"""UpIT stage 3a (docs/upit.md): router seed data — a random fraction of the training set, each sample labelled with
the expert whose dense model gives it the lowest perplexity.

Expert models: expert i < len(--experts) is the dense checkpoint that produced it. With --moe (an assembled MoE with
more experts than checkpoints), expert i >= len(--experts) is the dense model of the *last* checkpoint with the MLP of
every MoE layer replaced by expert i's (built in memory from the MoE files through the family's weight names). A
granular --moe (`upit-assemble --granularity G`) is scored per copy: copy c's MLP is its G slices put back together,
and the label is the copy c (router-init trains the G router rows of copy c).

Rows are read, rendered and tokenised by `upcycle_ds.data` — the same reader, row-format table, chat templates and
tokeniser that trained the experts (so a sample is scored on exactly the tokens it was trained on) — with one
option: only the *last* assistant turn carries the score (`TokenizeSpec(turns="last")`); prompt/response rows have
one turn anyway, `text` rows are scored on every token after the first. The perplexity is the mean next-token NLL
over those tokens. Samples longer than --max-length are truncated on the right, as in training; a sample left with
no scored token is skipped (reported).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import IGNORE, TokenizeSpec, encode_dataset, parse_sources, read_source
from ..data.cache import cache_root
from ..dtypes import torch_dtype
from ..errors import UserError
from .. import checks
from ..progress import Progress
from ..io.text import check_utf8
from ..families import family_for
from ..io.hf import HFCheckpoint, read_config
from .expand import PROJS
from .config import SeedDataConfig  # noqa: F401  (re-exported)

SEED_FILE, REPORT_FILE = "seed.jsonl", "seed_report.json"


# ---------------------------------------------------------------------------------------------------- data
class SeedRows:
    """The rows of one or more training sources (specs as for training; weights are ignored), indexed 0..N-1 across
    them in order: row i of the second source is index len(first) + i."""

    def __init__(self, data, cache_dir: str | None = None):
        self.specs = parse_sources(data)
        hf = cache_root(cache_dir) / "hf"
        self.datasets = [read_source(s, hf) for s in self.specs]
        self.starts = np.cumsum([0] + [len(d) for d in self.datasets])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        return s, int(i - self.starts[s])

    def row(self, i: int) -> dict:
        s, j = self.locate(i)
        return self.datasets[s][j]


def pick_indices(n_rows: int, fraction: float, min_samples: int, seed: int) -> list[int]:
    """A random subset of round(fraction·n) rows, at least min_samples, at most all; sorted ascending."""
    n = min(n_rows, max(min_samples, int(round(fraction * n_rows)), 1))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_rows, generator=g)[:n].tolist())


def encode(rows: SeedRows, indices: list[int], tokenizer, *, max_length: int | None = None,
           prompt_format: str = "auto") -> tuple[dict[int, tuple[list[int], list[int]]], list[int]]:
    """({row index: (input_ids, labels)} of the rows that keep a scored token, skipped row indices). Labels are
    IGNORE except on the scored tokens (never on the first token)."""
    spec = TokenizeSpec(max_length=max_length, prompt_format=prompt_format, turns="last")
    by_source: dict[int, list[int]] = {}
    for i in indices:
        s, j = rows.locate(i)
        by_source.setdefault(s, []).append(j)
    out: dict[int, tuple[list[int], list[int]]] = {}
    for s, local in by_source.items():
        samples, _ = encode_dataset(rows.datasets[s], local, tokenizer, spec, f"--data {rows.specs[s].name}")
        for e in samples:
            labels = np.where(e.loss_mask, e.input_ids, IGNORE)
            labels[0] = IGNORE
            out[int(rows.starts[s]) + e.row] = (e.input_ids.tolist(), labels.tolist())
    return out, [i for i in indices if i not in out]


# ---------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def mean_nll(model, encoded: list[tuple[list[int], list[int]]], *, batch_size: int = 8, device="cpu",
             pad_id: int = 0, desc: str = "score") -> torch.Tensor:
    """(N,) float64: per sample, mean next-token NLL over its labelled tokens (the first token is never scored)."""
    model.eval()
    out = torch.empty(len(encoded), dtype=torch.float64)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths -> little padding
    bar = Progress(-(-len(order) // batch_size), f"upcycle-ds seed-data ({desc})", "batches")
    for s in range(0, len(order), batch_size):
        bar.update(1)
        idx = order[s:s + batch_size]
        T = max(len(encoded[i][0]) for i in idx)
        ids_BT = torch.full((len(idx), T), pad_id, dtype=torch.long)
        lab_BT = torch.full((len(idx), T), IGNORE, dtype=torch.long)
        mask_BT = torch.zeros((len(idx), T), dtype=torch.long)
        for b, i in enumerate(idx):
            ids, labels = encoded[i]
            ids_BT[b, :len(ids)] = torch.tensor(ids)
            lab_BT[b, :len(ids)] = torch.tensor(labels)
            mask_BT[b, :len(ids)] = 1
        logits_BTV = model(input_ids=ids_BT.to(device), attention_mask=mask_BT.to(device)).logits.float()
        tgt_BT = lab_BT[:, 1:].to(device)
        nll_BT = torch.nn.functional.cross_entropy(logits_BTV[:, :-1].transpose(1, 2), tgt_BT,
                                                   ignore_index=IGNORE, reduction="none")
        n_B = (tgt_BT != IGNORE).sum(1)
        out[idx] = (nll_BT.double().sum(1) / n_B).cpu()
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------------- experts
def _load_dense(path: str | Path, dtype: torch.dtype, device):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)


class ExpertModels:
    """Builds expert i's dense model on demand (one in memory at a time).

    With a granular --moe (experts c*G+g are the G slices of copy c, config.json's upcycle_ds record) the scored
    units are the C = E/G copies: copy c's dense MLP is its G slices put back together (`merge.MergedView`, exact),
    and a sample's label is its copy (router-init trains that copy's G router rows)."""

    def __init__(self, experts: list[str], moe: str | None = None):
        if not experts:
            raise UserError("--experts: give at least one dense checkpoint")
        self.experts = [str(e) for e in experts]
        cfgs = [read_config(e) for e in self.experts]
        fams = []
        for e, cfg in zip(self.experts, cfgs):
            fam, is_moe = family_for(cfg)
            if is_moe:
                raise UserError(f"--experts {e} is an MoE checkpoint; give the dense checkpoints the experts came "
                                f"from (and the assembled MoE as --moe)")
            fams.append(fam)
        if len({f.name for f in fams}) > 1:
            raise UserError(f"--experts mix model families: {sorted({f.name for f in fams})}")
        self.family = fams[-1]
        self.moe = None
        self.granularity = 1
        self.num_experts = len(self.experts)
        """Scored units: the experts (copies, for a granular MoE)."""
        if moe is not None:
            self.moe = HFCheckpoint(moe)
            mfam, is_moe = family_for(self.moe.config)
            if not is_moe:
                raise UserError(f"--moe {moe} is a dense checkpoint; give the assembled MoE checkpoint")
            if mfam.moe_model_type != self.family.moe_model_type:
                raise UserError(f"--moe {moe} is {mfam.moe_model_type}; the experts ({self.family.name}) upcycle "
                                f"to {self.family.moe_model_type}")
            probe = self.copy_view(0)
            self.granularity, self.num_experts = probe.granularity, probe.copies
            self.moe_layers = mfam.moe_layers(self.moe.config)
            what = "experts" if self.granularity == 1 else f"copies of {self.granularity} slices"
            if self.num_experts < len(self.experts):
                raise UserError(f"--moe {moe} has {self.num_experts} {what} but {len(self.experts)} --experts are "
                                f"given; give the checkpoints that became its experts, in order")
            # copy i < len(experts) must be that checkpoint's MLP (cheap check on one tensor per copy)
            key = self.family.dense_mlp_key(self.moe_layers[0], "gate")
            for i, e in enumerate(self.experts):
                if not torch.equal(self.copy_view(i).get(key), HFCheckpoint(e).get(key)):
                    raise UserError(f"expert {i} of --moe {moe} (layer {self.moe_layers[0]}) is not the MLP of "
                                    f"--experts {e}; give the checkpoints used by upit-assemble (the last "
                                    f"{self.num_experts} given), in the same order")

    def copy_view(self, c: int):
        """Copy c of --moe as a dense checkpoint (its MLPs = copy c's G slices put together)."""
        from ..merge import MergedView

        return MergedView(self.moe, expert=c)

    def source(self, i: int) -> str:
        if i < len(self.experts):
            return self.experts[i]
        unit = f"expert {i}" if self.granularity == 1 else f"copy {i} (experts {i * self.granularity}.." \
                                                               f"{(i + 1) * self.granularity - 1})"
        return f"{self.experts[-1]} with the MLPs of {unit} of {self.moe.path}"

    def load(self, i: int, dtype: torch.dtype = torch.float32, device="cpu"):
        if i < len(self.experts):
            return _load_dense(self.experts[i], dtype, device)
        model = _load_dense(self.experts[-1], dtype, device)
        view = self.copy_view(i)
        keys = [self.family.dense_mlp_key(l, p) for l in self.moe_layers for p in PROJS]
        res = model.load_state_dict({k: view.get(k) for k in keys}, strict=False)
        if res.unexpected_keys:
            raise UserError(f"cannot put expert {i}'s MLP into {self.experts[-1]}: unexpected "
                            f"{res.unexpected_keys[0]}")
        return model


# ---------------------------------------------------------------------------------------------------- selection
@dataclass(kw_only=True)
class SeedSelection:
    indices: list[int]
    """Row index (in the data file) of each selected, scored sample."""
    nll: torch.Tensor
    """(N, E) float64 mean response NLL of each sample under each expert."""
    skipped: list[int]
    """Selected rows with no scored token (empty response), left out."""

    @property
    def expert(self) -> list[int]:
        """Lowest-perplexity expert per sample (ties -> lowest index)."""
        return self.nll.argmin(1).tolist() if len(self.indices) else []

    def counts(self, num_experts: int) -> list[int]:
        return torch.bincount(torch.tensor(self.expert, dtype=torch.long), minlength=num_experts).tolist()


def select(rows: SeedRows, models: ExpertModels, tokenizer, *, fraction: float = 0.01, min_samples: int = 1,
           seed: int = 0, max_length: int | None = None, prompt_format: str = "auto", batch_size: int = 8,
           dtype=torch.float32, device="cpu") -> SeedSelection:
    picked = pick_indices(len(rows), fraction, min_samples, seed)
    by_row, skipped = encode(rows, picked, tokenizer, max_length=max_length, prompt_format=prompt_format)
    kept = [i for i in picked if i in by_row]
    encoded = [by_row[i] for i in kept]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    nll = torch.empty(len(kept), models.num_experts, dtype=torch.float64)
    for e in range(models.num_experts):
        model = models.load(e, dtype, device)
        nll[:, e] = mean_nll(model, encoded, batch_size=batch_size, device=device, pad_id=pad,
                             desc=f"expert {e}/{models.num_experts}")
        del model
    return SeedSelection(indices=kept, nll=nll, skipped=skipped)


def output_rows(rows: SeedRows, sel: SeedSelection):
    """{"index", "expert", "ppl": [per expert]} then the original row's non-null fields (ours win on a name clash;
    a source's columns that a row does not use are null in its Arrow table and left out)."""
    for n, (i, e) in enumerate(zip(sel.indices, sel.expert)):
        ppl = [math.exp(x) if x < 700 else float("inf") for x in sel.nll[n].tolist()]
        yield {"index": i, "expert": e, "ppl": ppl,
               **{k: v for k, v in rows.row(i).items() if k not in ("index", "expert", "ppl") and v is not None}}


# ------------------------------------------------------------------------------------------------------- the stage
@dataclass
class SeedDataResult:
    out: Path
    report_path: Path
    report: dict
    sources: list[str]
    """Where each expert's scoring model came from."""


def run_seed_data(args: SeedDataConfig) -> SeedDataResult:
    """Select and label the seed data; writes the dir OUT (SEED_FILE + REPORT_FILE) atomically. Raises UserError on
    bad input."""
    from ..data.sources import local_paths, parse_sources
    from ..io.atomic import atomic_output_dir, check_output_dir

    out = Path(args.out)
    if out.suffix == ".jsonl":
        raise UserError(f"--out {out}: seed-data writes a directory (with {SEED_FILE} and {REPORT_FILE} inside), like "
                        f"every other command's --out; pass e.g. {out.with_suffix('')}")
    local = [Path(spec.path) for spec in parse_sources(args.data) if Path(spec.path).is_file()]
    inputs = (*(("--data", p) for p in local_paths(args.data)), *(("--experts", e) for e in args.experts),
              ("--moe", args.moe))
    check_output_dir(out, args.overwrite, inputs=inputs)
    if not 0 < args.fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1] (got {args.fraction})")
    if args.min_samples < 0:
        raise UserError(f"--min-samples must be >= 0 (got {args.min_samples})")
    if args.max_length is not None:
        checks.at_least("--max-length", args.max_length, 2)
    checks.at_least("--micro-batch-size", args.micro_batch_size, 1)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    for d in local:
        check_utf8(d, "--data")

    models = ExpertModels(args.experts, args.moe)
    rows = SeedRows(args.data, args.data_cache)
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.experts[0])
    except (OSError, ValueError) as e:
        raise UserError(f"--experts {args.experts[0]}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    sel = select(rows, models, tokenizer, fraction=args.fraction, min_samples=args.min_samples, seed=args.seed,
                 max_length=args.max_length, prompt_format=args.prompt_format, batch_size=args.micro_batch_size,
                 dtype=torch_dtype(args.dtype, device), device=device)
    E = models.num_experts
    counts = sel.counts(E)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in output_rows(rows, sel)]
    report = {
        "data": args.data if isinstance(args.data, str) else list(args.data), "num_rows": len(rows),
        "num_selected": len(sel.indices) + len(sel.skipped),
        "num_scored": len(sel.indices), "skipped_no_response_tokens": sel.skipped,
        "fraction": args.fraction, "min_samples": args.min_samples, "seed": args.seed, "max_length": args.max_length,
        "experts": [{"expert": e, "model": models.source(e), "samples": counts[e],
                     "mean_nll": (float(sel.nll[:, e].mean()) if len(sel.indices) else None)} for e in range(E)],
        "counts": counts,
        "granularity": models.granularity,
        "label": "expert" if models.granularity == 1 else "copy (experts copy*G .. copy*G+G-1)",
    }
    with atomic_output_dir(out, args.overwrite, inputs=inputs) as tmp:
        (tmp / SEED_FILE).write_text("".join(lines), encoding="utf-8")
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return SeedDataResult(out=out / SEED_FILE, report_path=out / REPORT_FILE, report=report,
                          sources=[models.source(e) for e in range(E)])
