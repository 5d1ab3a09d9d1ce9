"""Sparse Upcycling (Komatsuzaki et al., ICLR 2023), reproduced in shape with upcycle_ds's own commands: from one
dense checkpoint, does an upcycled MoE reach a lower held-out loss than continuing the dense model — for the same
steps (`--suite equal-steps`, the default), and for the same training FLOPs (`--suite equal-flops`)?

Corpus: the running interpreter's standard library source (`Lib/**/*.py`, PSF licence; bench/quality/corpus.py),
split by file into train (halved: pretraining / continuation text) and held-out; a byte-level BPE tokenizer trained
on the pretraining text (bench/quality/tokenizer.py). Steps, every one a subprocess `python -m upcycle_ds.cli ...`:

  pretrain     a random Llama (size preset) -> `upcycle-ds sft` N steps on the pretraining text (loss on every token)
               at a constant LR after warmup (the dense checkpoint = a "stable phase" checkpoint)
  per seed s   from pretrain/hf, on the continuation text, M steps each, same --seed s (data order), LR schedule
               (warmup, cosine to 0.1 x), global batch and tokens; MoE arms: `upcycle-ds upcycle ... --seed s` +
               `upcycle-ds train`, dense arms: `upcycle-ds sft` (--save-every-epochs 1e9: no intermediate exports)
    --suite equal-steps (one micro-batch of `mbs` rows per step):
      (a) dense            dense continuation
      (b) upcycled         --num-experts 8 --top-k 2 (1.34x the dense FLOPs per step at cpu size)
      (c) drop-upcycled    the same with --reinit-ratio 0.5 (Drop-Upcycling, Nakamura et al. 2025)
      (d) dense, equal FLOPs (with --equal-flops-arm): `sft` for M x (MoE FLOPs / dense FLOPs) steps
    --suite equal-flops (every arm ~ the dense FLOPs per step; each step = mbs / micro_mbs micro-batches of
                         `micro_mbs` rows, --grad-accum, so the load-balancing loss has a micro-batch to act on):
      (a) dense_acc        dense continuation
      (e) top1             --num-experts 8 --top-k 1: each token through one full copy of the dense MLP
      (f) granular         --num-experts 32 --top-k 4 --granularity 4: 4 slices of I/4 neurons, one copy's worth
      (f-global) granular_global   (f) with `train --aux-loss-scope global` (balance over the step, not the
                                   micro-batch: docs/training.md)
  eval         `upcycle-ds eval` held-out loss of every final HF export and of the upcycled models before training
               (copies: exactly the pretrained loss), with the per-row paired t-test against (a); then, for every
               MoE arm and its start, which experts held-out tokens of each source-file type (tests, library
               modules, encodings tables, pydoc's English text) are routed to (bench/quality/specialise.py)

FLOPs and parameters come from `upcycle_ds.flops` / `upcycle_ds.plan` (router included), printed at the start.
Curves come from the runs' own held-out evals (`--eval-data`, `--eval-every`), which the final `upcycle-ds eval`
reproduces. Output under --out: upcycle_quality.json / upcycle_equal_flops.json (config, curves, finals, FLOPs,
specialisation, timings), the .png of the same name, and the table printed last. Run dirs and logs go to --work
(default bench/quality/work/SIZE; a rerun skips finished stages; both suites share the pretraining).

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/upcycle_quality.py --size cpu --out bench/quality/work/out_cpu
    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/upcycle_quality.py --size cpu --suite equal-flops \
        --out bench/quality/work/out_cpu
    python bench/upcycle_quality.py --size gpu --suite equal-flops --out $OUT/quality      # bench/gpu/run.sh
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality.presets import SIZES, Size  # noqa: E402
from bench.quality.runs import Runner, eval_curve, train_seconds  # noqa: E402


@dataclass(frozen=True, kw_only=True)
class Arm:
    """One continuation run per seed. Dense arms run `sft`, MoE arms `upcycle` (with these flags) + `train`."""

    label: str
    experts: int = 0
    """0: dense."""
    top_k: int = 0
    granularity: int = 1
    reinit_ratio: float = 0.0
    aux_scope: str = "micro"
    accumulate: bool = False
    """Each step as mbs / micro_mbs micro-batches of micro_mbs rows (--grad-accum), not one of mbs rows."""
    equal_flops_of: str | None = None
    """Dense only: as many steps as it takes to spend this arm's continuation FLOPs."""
    same_init_as: str | None = None
    """An MoE arm upcycled with the same flags (its start is evaluated once)."""

    @property
    def moe(self) -> bool:
        return self.experts > 0


def arms_of(size: Size) -> dict[str, Arm]:
    E, k, G = size.experts, size.top_k, size.granularity
    return {
        "dense": Arm(label="(a) dense continuation"),
        "upcycled": Arm(label=f"(b) upcycled E={E} top-{k}", experts=E, top_k=k),
        "drop": Arm(label=f"(c) Drop-Upcycling r={size.reinit_ratio}", experts=E, top_k=k,
                    reinit_ratio=size.reinit_ratio),
        "dense_eqflops": Arm(label="(d) dense, equal FLOPs", equal_flops_of="upcycled"),
        "dense_acc": Arm(label="(a) dense continuation", accumulate=True),
        "top1": Arm(label=f"(e) coarse top-1 E={E}", experts=E, top_k=1, accumulate=True),
        "granular": Arm(label=f"(f) granular G={G}, {E * G} experts top-{G}", experts=E * G, top_k=G,
                        granularity=G, accumulate=True),
        "granular_global": Arm(label="(f-global) (f) + global-batch aux loss", experts=E * G, top_k=G,
                               granularity=G, accumulate=True, aux_scope="global", same_init_as="granular"),
    }


SUITES = {"equal-steps": ("dense", ["upcycled", "drop"]),
          "equal-flops": ("dense_acc", ["top1", "granular", "granular_global"])}
"""suite -> (baseline arm, the other arms in order)."""
RESULT_NAMES = {"equal-steps": "upcycle_quality", "equal-flops": "upcycle_equal_flops"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--suite", choices=sorted(SUITES), default="equal-steps",
                   help="equal-steps: (a) dense, (b) upcycled top-2, (c) Drop-Upcycling; equal-flops: (a) dense, "
                        "(e) coarse top-1, (f) granular one-copy, (f-global) (f) with --aux-loss-scope global")
    p.add_argument("--out", required=True, help="results: upcycle_quality.{json,png} (equal-steps) or "
                                                "upcycle_equal_flops.{json,png} (equal-flops)")
    p.add_argument("--work", default=None, help="run dirs + logs (default bench/quality/work/SIZE)")
    p.add_argument("--nproc", type=int, default=0,
                   help="--nproc of every training run (0, default: no launcher, the run is one rank in its own "
                        "process; 1: one rank started by the deepspeed launcher, ~2 more Python start-ups per run)")
    p.add_argument("--equal-flops-arm", action=argparse.BooleanOptionalAction, default=False,
                   help="equal-steps suite: also run (d), dense continuation for as many FLOPs as (b)")
    p.add_argument("--arms", nargs="+", default=None,
                   help="the suite's arms to run besides its baseline (a), which always runs (default: all of them)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override size fields, e.g. --set steps=200 seeds=0,1,2 (see bench/quality/presets.py)")
    a = p.parse_args(argv)
    base, others = SUITES[a.suite]
    if a.arms is None:
        a.arms = list(others)
    bad = [x for x in a.arms if x not in others]
    if bad:
        p.error(f"--arms {' '.join(bad)}: not in --suite {a.suite} (its arms: {', '.join(others)})")
    if a.equal_flops_arm and a.suite != "equal-steps":
        p.error("--equal-flops-arm belongs to --suite equal-steps (every arm of equal-flops costs ~ the dense FLOPs)")
    a.run_arms = [base] + [x for x in others if x in a.arms] + (["dense_eqflops"] if a.equal_flops_arm else [])
    return a


def apply_overrides(size: Size, sets: list[str]) -> Size:
    kw = {}
    types = {f.name: f.type for f in dataclasses.fields(Size)}
    for s in sets:
        k, v = s.split("=", 1)
        if k not in types:
            raise SystemExit(f"--set {s}: unknown field {k}")
        cur = getattr(size, k)
        kw[k] = [int(x) for x in v.split(",")] if isinstance(cur, list) else type(cur)(v)
    return dataclasses.replace(size, **kw)


# ----------------------------------------------------------------------------------------------- FLOPs and params

def arm_counts(dense_config: dict, arm: Arm, seq: int) -> dict:
    """Parameters (all, active per token) and training FLOPs per token of an arm's model, from `upcycle_ds.plan` /
    `upcycle_ds.flops` (matmul FLOPs, router included, 3 x forward)."""
    from upcycle_ds.flops import train_flops_per_token
    from upcycle_ds.plan import count_params, shape_from_config, upcycled_shape

    if arm.moe:
        shape = upcycled_shape(dense_config, num_experts=arm.experts, top_k=arm.top_k, granularity=arm.granularity)
    else:
        shape = shape_from_config(dense_config)
    pc = count_params(shape)
    unused = sum((m.num_experts - m.top_k) * 3 * shape.hidden * m.expert_intermediate for m in shape.mlps if m.is_moe)
    return {"params": pc.total, "active_params": pc.total - unused,
            "train_flops_per_token": train_flops_per_token(shape, seq)}


# ----------------------------------------------------------------------------------------------------- preparation

def prepare(work: Path, size: Size, log) -> dict:
    """Corpus split, tokenizer and the random initial Llama; kept in WORK/data, WORK/init (skipped if done)."""
    from bench.quality.corpus import build_split, write_text_rows
    from bench.quality.tokenizer import train_bpe

    marker = work / "data" / "corpus.json"
    key = {k: getattr(size, k) for k in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads", "seq",
                                         "chunk_chars", "heldout_rows", "bpe_chars", "mbs", "pretrain_steps")}
    # only as much text as the runs read (+50%), so every run tokenizes little: ~3.4 characters per token here
    need = lambda steps: int(steps * size.mbs * size.seq * 3.4 * 1.5)  # noqa: E731
    cont_steps = math.ceil(size.steps * 1.6)  # room for the equal-FLOPs arm (MoE/dense FLOPs ~1.3-1.5)
    info = json.loads(marker.read_text()) if marker.exists() else {}
    data = work / "data"
    split_now = lambda: build_split(chunk_chars=size.chunk_chars, heldout_percent=5,  # noqa: E731
                                    heldout_rows=size.heldout_rows)
    if info.get("key") == key and (work / "init" / "config.json").exists():
        if info.get("continue_steps", 0) < cont_steps:  # a longer continuation than prepared: more text
            cont = take_chars(split_now().cont, need(cont_steps))
            write_text_rows(data / "continue.jsonl", cont)
            info.update(continue_steps=cont_steps, continue_rows=len(cont), continue_chars=sum(map(len, cont)))
            marker.write_text(json.dumps(info, indent=1))
        if info.get("typed_rows_per_type") != size.typed_rows:  # a work dir prepared before the specialisation view
            info.update(write_typed_rows(data, split_now(), size.typed_rows))
            marker.write_text(json.dumps(info, indent=1))
        return info
    t = time.time()
    split = build_split(chunk_chars=size.chunk_chars, heldout_percent=5, heldout_rows=size.heldout_rows)
    pre = take_chars(split.pretrain, need(size.pretrain_steps))
    cont = take_chars(split.cont, need(cont_steps))
    write_text_rows(data / "pretrain.jsonl", pre)
    write_text_rows(data / "continue.jsonl", cont)
    write_text_rows(data / "heldout.jsonl", split.heldout)
    typed = write_typed_rows(data, split, size.typed_rows)
    tok_dir = train_bpe(take_chars(split.pretrain, size.bpe_chars), size.vocab, work / "tokenizer")
    init_model(work / "init", tok_dir, size)
    info = {"key": key, **split.summary, "pretrain_rows": len(pre), "continue_rows": len(cont),
            "pretrain_chars": sum(map(len, pre)), "continue_chars": sum(map(len, cont)),
            "continue_steps": cont_steps, **typed, "prepare_s": round(time.time() - t, 1)}
    marker.write_text(json.dumps(info, indent=1))
    log(f"prepared corpus in {info['prepare_s']} s: {json.dumps(split.summary)}")
    return info


def write_typed_rows(data: Path, split, per_type: int) -> dict:
    """DATA/heldout_by_type.jsonl: held-out chunks labelled with their file type, for the specialisation view."""
    from bench.quality.corpus import rows_by_type

    rows = rows_by_type(split.heldout_pool, per_type)
    tmp = data / "heldout_by_type.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(data / "heldout_by_type.jsonl")
    counts = {}
    for r in rows:
        counts[r["type"]] = counts.get(r["type"], 0) + 1
    return {"typed_rows_per_type": per_type, "typed_rows": counts}


def take_chars(texts: list[str], chars: int) -> list[str]:
    out, n = [], 0
    for t in texts:
        if n >= chars:
            break
        out.append(t)
        n += len(t)
    return out


def init_model(out: Path, tok_dir: Path, size: Size) -> None:
    import shutil

    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden,
                                   intermediate_size=size.intermediate, num_hidden_layers=size.layers,
                                   num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                                   max_position_embeddings=max(2048, size.seq), tie_word_embeddings=False,
                                   rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    for f in tok_dir.iterdir():
        shutil.copy(f, out / f.name)


# ------------------------------------------------------------------------------------------------------- the runs

def common_flags(size: Size, nproc: int) -> list[str]:
    flags = ["--max-length", size.seq, "--dtype", size.dtype, "--zero-stage", size.zero_stage,
             "--wandb-mode", "disabled", "--eval-fraction", 0]
    return flags + (["--nproc", nproc] if nproc else [])


def batch_flags(size: Size, arm: Arm) -> list:
    """One micro-batch of mbs rows per step, or (accumulate) mbs / micro_mbs micro-batches of micro_mbs rows: the
    same rows in the same steps either way (upcycle_ds.data.batches)."""
    if not arm.accumulate:
        return ["--micro-batch-size", size.mbs]
    if size.mbs % size.micro_mbs:
        raise SystemExit(f"micro_mbs={size.micro_mbs} must divide mbs={size.mbs}")
    return ["--micro-batch-size", size.micro_mbs, "--grad-accum", size.mbs // size.micro_mbs]


def run_all(size: Size, work: Path, a: argparse.Namespace, runner: Runner, info: dict, log) -> dict:
    data = work / "data"
    heldout = data / "heldout.jsonl"
    common = common_flags(size, a.nproc) + ["--eval-data", heldout]
    sft_only = ["--save-every-epochs", "1e9"]  # no intermediate HF checkpoints (no UpIT experts needed here)
    pre = work / "pretrain"
    runner.cli("pretrain", ["sft", "--model", work / "init", "--data", data / "pretrain.jsonl", "--out", pre,
                            "--max-steps", size.pretrain_steps, "--lr", size.pretrain_lr,
                            "--warmup-steps", max(1, size.pretrain_steps // 20), "--min-lr-ratio", 1.0,
                            "--eval-every", max(1, size.pretrain_steps // 10), "--seed", 1000, *sft_only,
                            "--micro-batch-size", size.mbs, *common],
               done=pre / "hf" / "config.json", clean=pre)
    runner.cli("eval_pretrained", ["eval", "--model", f"pretrained={pre / 'hf'}", "--data", heldout,
                                   "--max-length", size.seq, "--micro-batch-size", size.eval_batch,
                                   "--out", pre / "eval.json"], done=pre / "eval.json")
    specs = arms_of(size)
    dense_config = json.loads((pre / "hf" / "config.json").read_text())
    counts = {arm: arm_counts(dense_config, specs[arm], size.seq) for arm in a.run_arms}
    steps = {arm: size.steps for arm in a.run_arms}
    for arm in a.run_arms:
        if specs[arm].equal_flops_of:
            ref = arm_counts(dense_config, specs[specs[arm].equal_flops_of], size.seq)
            steps[arm] = round(size.steps * ref["train_flops_per_token"] / counts[arm]["train_flops_per_token"])
    base_flops = counts[a.run_arms[0]]["train_flops_per_token"]
    for arm in a.run_arms:
        c = counts[arm]
        log(f"{specs[arm].label}: {c['params'] / 1e6:.2f} M params ({c['active_params'] / 1e6:.2f} M active), "
            f"train FLOPs per step {c['train_flops_per_token'] * size.mbs * size.seq:.3g} = "
            f"{c['train_flops_per_token'] / base_flops:.3f} x dense, {steps[arm]} steps")
    every = max(1, size.steps // size.evals)
    cont = ["--data", data / "continue.jsonl", "--lr", size.lr, "--warmup-steps", size.warmup,
            "--min-lr-ratio", 0.1, "--eval-every", every, *common]

    def arm_chain(seed: int, arm: str):
        spec, sd = specs[arm], work / f"seed{seed}"
        out = sd / arm
        flags = [*batch_flags(size, spec), "--max-steps", steps[arm], "--seed", seed, *cont]
        if not spec.moe:
            return lambda: runner.cli(f"s{seed}_{arm}", ["sft", "--model", pre / "hf", "--out", out, *sft_only,
                                                         *flags], done=out / "hf" / "config.json", clean=out)
        moe = sd / f"{arm}_init"

        def chain():
            sd.mkdir(parents=True, exist_ok=True)
            runner.cli(f"s{seed}_{arm}_upcycle",
                       ["upcycle", "--model", pre / "hf", "--out", moe, "--num-experts", spec.experts,
                        "--top-k", spec.top_k, "--granularity", spec.granularity, "--seed", seed, "--overwrite",
                        "--reinit-ratio", spec.reinit_ratio], done=moe / "config.json")
            runner.cli(f"s{seed}_{arm}", ["train", "--model", moe, "--out", out, "--aux-loss-scope", spec.aux_scope,
                                          *flags], done=out / "hf" / "config.json", clean=out)
        return chain

    def eval_chain(seed: int):
        sd = work / f"seed{seed}"
        inits = [f"{arm}_init={sd / f'{arm}_init'}" for arm in a.run_arms
                 if specs[arm].moe and specs[arm].same_init_as not in a.run_arms]
        return lambda: runner.cli(f"s{seed}_eval_{a.suite}",
                                  ["eval", "--model", *[f"{arm}={sd / arm / 'hf'}" for arm in a.run_arms], *inits,
                                   "--data", heldout, "--max-length", size.seq, "--micro-batch-size", size.eval_batch,
                                   "--out", eval_path(sd, a.suite)], done=eval_path(sd, a.suite))

    # CPU: `parallel` runs at a time (1 thread each); on a GPU all runs share the device at once
    runner.chains([arm_chain(seed, arm) for seed in size.seeds for arm in a.run_arms], size.parallel)
    runner.chains([eval_chain(seed) for seed in size.seeds], size.parallel)
    res = collect(size, work, a, specs, counts, steps, runner, info)
    t = time.time()
    add_specialisation(res, size, work, a.run_arms, specs, log)
    res["specialisation_s"] = round(time.time() - t, 1)
    return res


def eval_path(seed_dir: Path, suite: str) -> Path:
    return seed_dir / ("eval.json" if suite == "equal-steps" else f"eval_{suite}.json")


# ------------------------------------------------------------------------------------------------------ results

def collect(size: Size, work: Path, a: argparse.Namespace, specs: dict[str, Arm], counts: dict, steps: dict,
            runner: Runner, info: dict) -> dict:
    from upcycle_ds.eval.stats import paired_t

    tokens_per_step = size.mbs * size.seq
    base = a.run_arms[0]
    pre_eval = json.loads((work / "pretrain" / "eval.json").read_text())["models"]["pretrained"]
    dense_c = arm_counts(json.loads((work / "pretrain" / "hf" / "config.json").read_text()), specs["dense"],
                         size.seq)
    res = {"suite": a.suite, "size": a.size, "config": dataclasses.asdict(size), "corpus": info,
           "python": platform.python_version(), "platform": platform.platform(terse=True),
           "pretrain": {"steps": size.pretrain_steps, "tokens": size.pretrain_steps * tokens_per_step,
                        "train_flops": size.pretrain_steps * tokens_per_step * dense_c["train_flops_per_token"],
                        "curve": eval_curve(work / "pretrain"),
                        "heldout_loss": pre_eval["metrics"]["all"]["loss"]},
           "arms": {}, "timings_s": runner.times, "cpu_s": runner.cpu}
    for arm in a.run_arms:
        spec, cnt = specs[arm], counts[arm]
        init_arm = spec.same_init_as if spec.same_init_as in a.run_arms else arm
        per_seed = {}
        for seed in size.seeds:
            sd = work / f"seed{seed}"
            ev = json.loads(eval_path(sd, a.suite).read_text())
            final = ev["models"][arm]["metrics"]["all"]["loss"]
            test = next((t for t in ev["comparisons"].get(arm, []) if t["metric"] == "loss" and t["task"] == "all"),
                        None)
            start = (ev["models"][f"{init_arm}_init"] if spec.moe else pre_eval)["metrics"]["all"]["loss"]
            per_seed[seed] = {"heldout_loss": final["value"], "heldout_loss_se_rows": final["se"],
                              "start_loss": start["value"], "vs_baseline_row_paired": test,
                              "curve": eval_curve(sd / arm), "train_step_s": round(train_seconds(sd / arm), 1),
                              "run_wall_s": runner.times.get(f"s{seed}_{arm}"),
                              "run_cpu_s": runner.cpu.get(f"s{seed}_{arm}")}
        finals = [v["heldout_loss"] for v in per_seed.values()]
        res["arms"][arm] = {
            "label": spec.label, "spec": dataclasses.asdict(spec), "params": cnt["params"],
            "active_params": cnt["active_params"], "steps": steps[arm], "tokens": steps[arm] * tokens_per_step,
            "train_flops_per_token": cnt["train_flops_per_token"],
            "extra_train_flops": steps[arm] * tokens_per_step * cnt["train_flops_per_token"],
            "heldout_loss_mean": statistics.fmean(finals),
            "heldout_loss_sd_seeds": statistics.stdev(finals) if len(finals) > 1 else float("nan"),
            "seeds": per_seed}
    ref = res["arms"][base]
    for arm, r in res["arms"].items():
        diffs = [r["seeds"][s]["heldout_loss"] - ref["seeds"][s]["heldout_loss"] for s in size.seeds]
        r["flops_x_baseline"] = r["extra_train_flops"] / ref["extra_train_flops"]
        r["diff_vs_baseline_mean"] = statistics.fmean(diffs)
        r["diff_vs_baseline_sd_seeds"] = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        r["diff_vs_baseline_per_seed"] = diffs
        r["diff_vs_baseline_seed_paired_t"] = (paired_t([ref["seeds"][s]["heldout_loss"] for s in size.seeds],
                                                        [r["seeds"][s]["heldout_loss"] for s in size.seeds])
                                               if arm != base and len(diffs) > 1 else None)
    return res


def add_specialisation(res: dict, size: Size, work: Path, run_arms: list[str], specs: dict[str, Arm], log) -> None:
    """For every MoE arm and seed: expert shares by source-file type on the held-out set, after and before training
    (bench/quality/specialise.py); kept in WORK/seedS/ARM/specialisation.json (a rerun reads it)."""
    from bench.quality.specialise import specialisation

    rows = [json.loads(line) for line in (work / "data" / "heldout_by_type.jsonl").read_text().splitlines()]
    for arm in run_arms:
        spec = specs[arm]
        if not spec.moe:
            continue
        init_arm = spec.same_init_as if spec.same_init_as in run_arms else arm
        out = {"seeds": {}, "start": {}}
        for seed in size.seeds:
            sd = work / f"seed{seed}"
            for key, model in (("seeds", sd / arm / "hf"), ("start", sd / f"{init_arm}_init")):
                cache = model.parent / f"specialisation_{model.name}.json"
                got = json.loads(cache.read_text()) if cache.exists() else {}
                if got.get("rows") != len(rows):
                    got = {"rows": len(rows), **specialisation(model, rows, size.seq)}
                    cache.write_text(json.dumps(got))
                out[key][seed] = got
        for key in ("seeds", "start"):
            mi = [v["mutual_info_bits_mean"] for v in out[key].values()]
            out[f"{key}_mutual_info_bits_mean"] = statistics.fmean(mi)
            out[f"{key}_mutual_info_bits_sd"] = statistics.stdev(mi) if len(mi) > 1 else float("nan")
        res["arms"][arm]["specialisation"] = out
        log(f"{spec.label}: I(file type; expert) = {out['seeds_mutual_info_bits_mean']:.3f} ± "
            f"{out['seeds_mutual_info_bits_sd']:.3f} bits after training, {out['start_mutual_info_bits_mean']:.3f} "
            f"at the start (mean over layers, seeds)")


def table(res: dict) -> str:
    n = len(res["config"]["seeds"])
    lines = [f"{res['suite']}: held-out loss after the continuation (mean ± sd over {n} seeds; pretrained start "
             f"{res['pretrain']['heldout_loss']['value']:.4f}); Δ = arm − (a) per seed, same data order",
             "| arm | params (active) | steps | train FLOPs (× (a)) | held-out loss | Δ vs (a): mean ± sd (per seed) "
             "| p: seeds paired; rows paired per seed | I(type; expert) bits: start → trained |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, r in res["arms"].items():
        per = ", ".join(f"{d:+.4f}" for d in r["diff_vs_baseline_per_seed"])
        seed_t = r["diff_vs_baseline_seed_paired_t"]
        rows_p = [v["vs_baseline_row_paired"] for v in r["seeds"].values()]
        p = "" if seed_t is None else (f"{seed_t['p']:.2g}; " + ", ".join(f"{t['p']:.2g}" if t else "—"
                                                                           for t in rows_p))
        sp = r.get("specialisation")
        mi = (f"{sp['start_mutual_info_bits_mean']:.3f} → {sp['seeds_mutual_info_bits_mean']:.3f} ± "
              f"{sp['seeds_mutual_info_bits_sd']:.3f}") if sp else ""
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f}M ({r['active_params'] / 1e6:.2f}M) | {r['steps']} | "
                     f"{r['extra_train_flops']:.3g} ({r['flops_x_baseline']:.3f}) | "
                     f"{r['heldout_loss_mean']:.4f} ± {r['heldout_loss_sd_seeds']:.4f} | "
                     f"{r['diff_vs_baseline_mean']:+.4f} ± {r['diff_vs_baseline_sd_seeds']:.4f} ({per}) | {p} | {mi} |")
    return "\n".join(lines)


def dump_json(obj) -> str:
    """Indented JSON with every list of numbers on one line (the specialisation shares are thousands of numbers)."""
    import re

    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s+([-+0-9.eE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def command_line(argv: list[str]) -> str:
    """The command as run, with the --work / --out directories written as WORK / OUT (no local paths in results)."""
    hide = {"--work": "WORK", "--out": "OUT"}
    out = ["bench/upcycle_quality.py"]
    for i, x in enumerate(argv):
        flag = x.split("=", 1)[0]
        if i and argv[i - 1] in hide:
            x = hide[argv[i - 1]]
        elif "=" in x and flag in hide:
            x = f"{flag}={hide[flag]}"
        out.append(x)
    return " ".join(out)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    size = apply_overrides(SIZES[a.size], a.set)
    work = Path(a.work) if a.work else ROOT / "bench" / "quality" / "work" / a.size
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work / "logs", echo=lambda *x: print(*x, flush=True))
    t0 = time.time()
    print(f"upcycle_quality --size {a.size} --suite {a.suite}: arms {', '.join(a.run_arms)}; work {work}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, nice {os.nice(0)}, load {os.getloadavg()}",
          flush=True)
    info = prepare(work, size, print)
    res = run_all(size, work, a, runner, info, print)
    res["wall_s"] = round(time.time() - t0, 1)
    res["cpu_s_total"] = round(sum(runner.cpu.values()), 1)
    res["load_avg_end"] = os.getloadavg()
    res["command"] = command_line(argv if argv is not None else sys.argv[1:])
    from bench.quality.plot import plot_upcycle

    name = RESULT_NAMES[a.suite]
    (out / f"{name}.json").write_text(dump_json(res))
    plot_upcycle(res, out / f"{name}.png")
    print(f"\nwall {res['wall_s']:.0f} s, children's CPU {res['cpu_s_total']:.0f} s; results {out / f'{name}.json'}, "
          f"{out / f'{name}.png'}\n")
    print(table(res))


if __name__ == "__main__":
    main()
