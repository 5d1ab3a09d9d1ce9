"""Sparse Upcycling (Komatsuzaki et al., ICLR 2023), reproduced in shape with upcycle_ds's own commands: from one
dense checkpoint, does an upcycled MoE reach a lower held-out loss than continuing the dense model for the same steps?

Corpus: the running interpreter's standard library source (`Lib/**/*.py`, PSF licence; bench/quality/corpus.py),
split by file into train (halved: pretraining / continuation text) and held-out; a byte-level BPE tokenizer trained
on the pretraining text (bench/quality/tokenizer.py). Steps, every one a subprocess `python -m upcycle_ds.cli ...`:

  pretrain     a random Llama (size preset) -> `upcycle-ds sft` N steps on the pretraining text (loss on every token)
               at a constant LR after warmup (the dense checkpoint = a "stable phase" checkpoint)
  per seed s   from pretrain/hf, on the continuation text, M steps each, same --seed s (data order), LR schedule
               (warmup, cosine to 0.1 x), batch and tokens:
    (a) dense            `upcycle-ds sft`  (no intermediate HF checkpoints: --save-every-epochs 1e9)
    (b) upcycled         `upcycle-ds upcycle --num-experts 8 --top-k 2 --seed s` + `upcycle-ds train`
    (c) drop-upcycled    the same with `--reinit-ratio 0.5` (Drop-Upcycling, Nakamura et al. 2025)
    (d) dense, equal FLOPs (with --equal-flops-arm): `sft` for M x (MoE FLOPs / dense FLOPs) steps
  eval         `upcycle-ds eval` held-out loss of every final HF export, of the pretrained model and of the
               upcycled models before training (copies: the pretrained loss; Drop-Upcycling: higher), with the
               per-row paired t-test against (a)

Curves come from the runs' own held-out evals (`--eval-data`, `--eval-every`), which the final `upcycle-ds eval`
reproduces. Output under --out: upcycle_quality.json (config, curves, finals, FLOPs, timings), upcycle_quality.png,
and the table printed last. Run dirs and logs go to --work (default bench/quality/work/SIZE; a rerun skips finished
stages).

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/upcycle_quality.py --size cpu --out bench/quality/work/out_cpu
    python bench/upcycle_quality.py --size gpu --out $OUT/quality          # bench/gpu/run.sh on one H200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import flops as flops_mod  # noqa: E402
from bench.quality.presets import SIZES, Size  # noqa: E402
from bench.quality.runs import Runner, eval_curve, train_seconds  # noqa: E402

ARMS = {"dense": "(a) dense continuation", "upcycled": "(b) upcycled E=8 top-2",
        "drop": "(c) Drop-Upcycling r=0.5", "dense_eqflops": "(d) dense, equal FLOPs"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--out", required=True, help="results: upcycle_quality.json, upcycle_quality.png")
    p.add_argument("--work", default=None, help="run dirs + logs (default bench/quality/work/SIZE)")
    p.add_argument("--nproc", type=int, default=0,
                   help="--nproc of every training run (0, default: no launcher, the run is one rank in its own "
                        "process; 1: one rank started by the deepspeed launcher, ~2 more Python start-ups per run)")
    p.add_argument("--equal-flops-arm", action=argparse.BooleanOptionalAction, default=False,
                   help="also run (d): dense continuation for as many FLOPs as the MoE arms")
    p.add_argument("--arms", nargs="+", default=["dense", "upcycled", "drop"], choices=["dense", "upcycled", "drop"],
                   help="continuation arms to run ((a) dense is the baseline and always runs)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override size fields, e.g. --set steps=200 seeds=0,1,2 (see bench/quality/presets.py)")
    return p.parse_args()


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
    if info.get("key") == key and (work / "init" / "config.json").exists():
        if info.get("continue_steps", 0) < cont_steps:  # a longer continuation than prepared: more text
            cont = take_chars(build_split(chunk_chars=size.chunk_chars, heldout_percent=5,
                                          heldout_rows=size.heldout_rows).cont, need(cont_steps))
            write_text_rows(data / "continue.jsonl", cont)
            info.update(continue_steps=cont_steps, continue_rows=len(cont), continue_chars=sum(map(len, cont)))
            marker.write_text(json.dumps(info, indent=1))
        return info
    t = time.time()
    split = build_split(chunk_chars=size.chunk_chars, heldout_percent=5, heldout_rows=size.heldout_rows)
    pre = take_chars(split.pretrain, need(size.pretrain_steps))
    cont = take_chars(split.cont, need(cont_steps))
    write_text_rows(data / "pretrain.jsonl", pre)
    write_text_rows(data / "continue.jsonl", cont)
    write_text_rows(data / "heldout.jsonl", split.heldout)
    tok_dir = train_bpe(take_chars(split.pretrain, size.bpe_chars), size.vocab, work / "tokenizer")
    init_model(work / "init", tok_dir, size)
    info = {"key": key, **split.summary, "pretrain_rows": len(pre), "continue_rows": len(cont),
            "pretrain_chars": sum(map(len, pre)), "continue_chars": sum(map(len, cont)),
            "continue_steps": cont_steps, "prepare_s": round(time.time() - t, 1)}
    marker.write_text(json.dumps(info, indent=1))
    log(f"prepared corpus in {info['prepare_s']} s: {json.dumps(split.summary)}")
    return info


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
    flags = ["--micro-batch-size", size.mbs, "--max-length", size.seq, "--dtype", size.dtype,
             "--zero-stage", size.zero_stage, "--wandb-mode", "disabled", "--eval-fraction", 0]
    return flags + (["--nproc", nproc] if nproc else [])


def run_all(size: Size, work: Path, a: argparse.Namespace, runner: Runner, info: dict, log) -> dict:
    data = work / "data"
    heldout = data / "heldout.jsonl"
    common = common_flags(size, a.nproc) + ["--eval-data", heldout]
    sft_only = ["--save-every-epochs", "1e9"]  # no intermediate HF checkpoints (no UpIT experts needed here)
    pre = work / "pretrain"
    runner.cli("pretrain", ["sft", "--model", work / "init", "--data", data / "pretrain.jsonl", "--out", pre,
                            "--max-steps", size.pretrain_steps, "--lr", size.pretrain_lr,
                            "--warmup-steps", max(1, size.pretrain_steps // 20), "--min-lr-ratio", 1.0,
                            "--eval-every", max(1, size.pretrain_steps // 10), "--seed", 1000, *sft_only, *common],
               done=pre / "hf" / "config.json", clean=pre)
    runner.cli("eval_pretrained", ["eval", "--model", f"pretrained={pre / 'hf'}", "--data", heldout,
                                   "--max-length", size.seq, "--micro-batch-size", size.eval_batch,
                                   "--out", pre / "eval.json"], done=pre / "eval.json")
    c = flops_mod.counts(**shape(size), seq=size.seq)
    m = flops_mod.counts(**shape(size), seq=size.seq, experts=size.experts, top_k=size.top_k)
    eq_steps = round(size.steps * m["train_flops_per_token"] / c["train_flops_per_token"])
    arms = ["dense"] + [x for x in ("upcycled", "drop") if x in a.arms] + (["dense_eqflops"] if a.equal_flops_arm
                                                                              else [])
    every = max(1, size.steps // size.evals)
    cont = ["--data", data / "continue.jsonl", "--lr", size.lr, "--warmup-steps", size.warmup,
            "--min-lr-ratio", 0.1, "--eval-every", every, *common]

    def arm_chain(seed: int, arm: str):
        sd = work / f"seed{seed}"
        out = sd / arm
        if arm.startswith("dense"):
            steps = size.steps if arm == "dense" else eq_steps
            return lambda: runner.cli(f"s{seed}_{arm}", ["sft", "--model", pre / "hf", "--out", out, "--max-steps",
                                                         steps, "--seed", seed, *sft_only, *cont],
                                      done=out / "hf" / "config.json", clean=out)
        moe = sd / f"{arm}_init"

        def chain():
            sd.mkdir(parents=True, exist_ok=True)
            runner.cli(f"s{seed}_{arm}_upcycle",
                       ["upcycle", "--model", pre / "hf", "--out", moe, "--num-experts", size.experts,
                        "--top-k", size.top_k, "--seed", seed, "--overwrite",
                        "--reinit-ratio", size.reinit_ratio if arm == "drop" else 0.0],
                       done=moe / "config.json")
            runner.cli(f"s{seed}_{arm}", ["train", "--model", moe, "--out", out, "--max-steps", size.steps,
                                          "--seed", seed, *cont], done=out / "hf" / "config.json", clean=out)
        return chain

    def eval_chain(seed: int):
        sd = work / f"seed{seed}"
        inits = [f"{arm}_init={sd / f'{arm}_init'}" for arm in arms if not arm.startswith("dense")]
        return lambda: runner.cli(f"s{seed}_eval", ["eval", "--model", *[f"{arm}={sd / arm / 'hf'}" for arm in arms],
                                                    *inits, "--data", heldout, "--max-length", size.seq,
                                                    "--micro-batch-size", size.eval_batch, "--out", sd / "eval.json"],
                                  done=sd / "eval.json")

    # one seed after another on CPU (parallel 1); on a GPU all runs share the device at once (--parallel)
    runner.chains([arm_chain(seed, arm) for seed in size.seeds for arm in arms], size.parallel)
    runner.chains([eval_chain(seed) for seed in size.seeds], size.parallel)
    return collect(size, work, arms, c, m, eq_steps, runner, info)


def shape(size: Size) -> dict:
    return dict(vocab=size.vocab, hidden=size.hidden, intermediate=size.intermediate, layers=size.layers,
                heads=size.heads, kv_heads=size.kv_heads)


# ------------------------------------------------------------------------------------------------------ results

def collect(size: Size, work: Path, arms: list[str], c: dict, m: dict, eq_steps: int, runner: Runner,
            info: dict) -> dict:
    tokens_per_step = size.mbs * size.seq
    pre_eval = json.loads((work / "pretrain" / "eval.json").read_text())["models"]["pretrained"]
    res = {"size": size.__class__.__name__, "config": dataclasses.asdict(size), "corpus": info,
           "pretrain": {"steps": size.pretrain_steps, "tokens": size.pretrain_steps * tokens_per_step,
                        "train_flops": size.pretrain_steps * tokens_per_step * c["train_flops_per_token"],
                        "curve": eval_curve(work / "pretrain"),
                        "heldout_loss": pre_eval["metrics"]["all"]["loss"]},
           "arms": {}, "timings_s": runner.times, "cpu_s": runner.cpu}
    for arm in arms:
        cnt = c if arm.startswith("dense") else m
        steps = eq_steps if arm == "dense_eqflops" else size.steps
        per_seed = {}
        for seed in size.seeds:
            sd = work / f"seed{seed}"
            ev = json.loads((sd / "eval.json").read_text())
            final = ev["models"][arm]["metrics"]["all"]["loss"]
            test = next((t for t in ev["comparisons"].get(arm, []) if t["metric"] == "loss" and t["task"] == "all"),
                        None)
            start = (pre_eval if arm.startswith("dense") else ev["models"][f"{arm}_init"])["metrics"]["all"]["loss"]
            per_seed[seed] = {"heldout_loss": final["value"], "heldout_loss_se_rows": final["se"],
                              "start_loss": start["value"],
                              "vs_dense_row_paired": test, "curve": eval_curve(sd / arm),
                              "train_step_s": round(train_seconds(sd / arm), 1)}
        finals = [v["heldout_loss"] for v in per_seed.values()]
        res["arms"][arm] = {
            "label": ARMS[arm], "params": cnt["params"], "active_params": cnt["active_params"], "steps": steps,
            "tokens": steps * tokens_per_step,
            "extra_train_flops": steps * tokens_per_step * cnt["train_flops_per_token"],
            "heldout_loss_mean": statistics.fmean(finals),
            "heldout_loss_sd_seeds": statistics.stdev(finals) if len(finals) > 1 else float("nan"),
            "seeds": per_seed}
    dense = res["arms"]["dense"]["seeds"]
    for arm, r in res["arms"].items():
        diffs = [r["seeds"][s]["heldout_loss"] - dense[s]["heldout_loss"] for s in size.seeds]
        r["diff_vs_dense_mean"] = statistics.fmean(diffs)
        r["diff_vs_dense_sd_seeds"] = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        r["diff_vs_dense_per_seed"] = diffs
    return res


def table(res: dict) -> str:
    n = len(res["config"]["seeds"])
    dense_flops = res["arms"]["dense"]["extra_train_flops"]
    lines = [f"held-out loss after the continuation (mean ± sd over {n} seeds; pretrained start "
             f"{res['pretrain']['heldout_loss']['value']:.4f})",
             "| arm | params (active) | steps | extra train FLOPs (x dense) | held-out loss | Δ vs (a), per seed |",
             "|---|---|---|---|---|---|"]
    for arm, r in res["arms"].items():
        diffs = ", ".join(f"{d:+.4f}" for d in r["diff_vs_dense_per_seed"])
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f}M ({r['active_params'] / 1e6:.2f}M) | {r['steps']} | "
                     f"{r['extra_train_flops']:.3g} ({r['extra_train_flops'] / dense_flops:.2f}) | "
                     f"{r['heldout_loss_mean']:.4f} ± {r['heldout_loss_sd_seeds']:.4f} | "
                     f"{r['diff_vs_dense_mean']:+.4f} ({diffs}) |")
    return "\n".join(lines)


def main() -> None:
    a = parse_args()
    size = apply_overrides(SIZES[a.size], a.set)
    work = Path(a.work) if a.work else ROOT / "bench" / "quality" / "work" / a.size
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work / "logs", echo=lambda *x: print(*x, flush=True))
    t0 = time.time()
    print(f"upcycle_quality --size {a.size}: work {work}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"nice {os.nice(0)}", flush=True)
    info = prepare(work, size, print)
    res = run_all(size, work, a, runner, info, print)
    res["size"] = a.size
    res["wall_s"] = round(time.time() - t0, 1)
    res["cpu_s_total"] = round(sum(runner.cpu.values()), 1)
    res["load_avg_end"] = os.getloadavg()
    res["command"] = " ".join(sys.argv)
    from bench.quality.plot import plot_upcycle

    (out / "upcycle_quality.json").write_text(json.dumps(res, indent=1))
    plot_upcycle(res, out / "upcycle_quality.png")
    print(f"\nwall {res['wall_s']:.0f} s, children's CPU {res['cpu_s_total']:.0f} s; results {out / 'upcycle_quality.json'}, {out / 'upcycle_quality.png'}\n")
    print(table(res))


if __name__ == "__main__":
    main()
