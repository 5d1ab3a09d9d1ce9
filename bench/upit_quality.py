"""UpIT (Hui et al., ACL 2025) vs vanilla upcycling vs dense SFT, from the dense model bench/upcycle_quality.py
pretrains, on real instruction data (8 tasks of the OpenAI `evals` wheel, MIT), with upcycle_ds's own commands.

    prepare   (any machine with the wheel; not on the GPU machine)
              python bench/upit_quality.py prepare --evals-wheel evals-3.0.1.post1-py3-none-any.whl
              -> bench/quality/data/upit/{train,test}.jsonl (+ summary.json), ~3 MiB, git-ignored: carry it
    run       python bench/upit_quality.py run --size cpu|gpu --out DIR [--base DENSE_HF_DIR]
              --base defaults to bench/quality/work/SIZE/pretrain/hf (run bench/upcycle_quality.py --size SIZE first)

The three arms, as examples/upit_smollm2 defines them (every arm's last stage is the same epochs over the same rows):

  (a) dense SFT     = the UpIT recipe's stage-1 model (`sft/hf`): sft.epochs over train.jsonl
  (b) vanilla       = `upcycle-ds upcycle` of the base (E experts, top-2, all layers) + `upcycle-ds train` with the
                      recipe's common + train fields: train.epochs over train.jsonl
  (c) UpIT          = `upcycle-ds upit --config recipe.yaml` (sft checkpoints -> experts [+ genetic expansion] ->
                      seed data -> router init -> post-training with the same fields as (b))

plus the base model untrained, and a control (a'): dense SFT for as many epochs as UpIT trains in total
(sft.epochs + train.epochs), so that "more training" and "the method" can be told apart. Evaluation: `upcycle-ds eval` on the fixed held-out test rows: log-likelihood
accuracy over each task's label set (`choice_acc`), exact match of the greedy answer, the per-token NLL of the right
answer, each ± its standard error, and paired tests of every arm against (a) dense SFT. Output under --out:
upit_quality.json (eval results incl. per-row predictions, timings) and the table printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality.evals_tasks import extract, subset  # noqa: E402
from bench.quality.runs import Runner  # noqa: E402

DATA = ROOT / "bench" / "quality" / "data" / "upit"


@dataclass(kw_only=True)
class UpitSize:
    train_per_task: int
    test_per_task: int
    experts: int
    dtype: str
    zero_stage: int
    mbs: int
    seq: int
    sft_epochs: float
    sft_lr: float
    save_every_epochs: float
    save_until_epochs: float
    seed_fraction: float
    router_epochs: float
    train_epochs: float
    train_lr: float
    eval_batch: int
    eval_max_length: int = 1024
    max_new_tokens: int = 8
    parallel: int = 1


SIZES = {
    # 2 CPU cores: 4 SFT checkpoints (0.5, 1, 1.5, 2 epochs) -> 4 experts, no expansion
    "cpu": UpitSize(train_per_task=150, test_per_task=50, experts=4, dtype="fp32", zero_stage=0, mbs=8, seq=384,
                    sft_epochs=2, sft_lr=5e-4, save_every_epochs=0.5, save_until_epochs=2, seed_fraction=0.05,
                    router_epochs=2, train_epochs=1, train_lr=5e-4, eval_batch=16),
    # one H200: the paper's FFN schedule shape: 4 SFT epochs, checkpoints every 0.25 epoch over the first 2 -> 8
    "gpu": UpitSize(train_per_task=1000, test_per_task=150, experts=8, dtype="bf16", zero_stage=1, mbs=16, seq=1024,
                    sft_epochs=4, sft_lr=2e-4, save_every_epochs=0.25, save_until_epochs=2, seed_fraction=0.02,
                    router_epochs=4, train_epochs=2, train_lr=2e-4, eval_batch=32, parallel=3),
    # the CPU rehearsal of bench/gpu/run.sh: the gpu size's precision and ZeRO stage at toy size (numbers meaningless)
    "rehearse": UpitSize(train_per_task=16, test_per_task=4, experts=4, dtype="bf16", zero_stage=1, mbs=2, seq=128,
                         sft_epochs=1, sft_lr=1e-3, save_every_epochs=0.5, save_until_epochs=1, seed_fraction=0.5,
                         router_epochs=1, train_epochs=1, train_lr=1e-3, eval_batch=8, eval_max_length=128,
                         max_new_tokens=2, parallel=2),
    # smoke test (numbers meaningless)
    "tiny": UpitSize(train_per_task=12, test_per_task=4, experts=4, dtype="fp32", zero_stage=0, mbs=4, seq=384,
                     sft_epochs=1, sft_lr=1e-3, save_every_epochs=0.5, save_until_epochs=1, seed_fraction=0.2,
                     router_epochs=1, train_epochs=1, train_lr=1e-3, eval_batch=8),
}
ARMS = {"base": "base (pretrained, no SFT)", "dense_sft": "(a) dense SFT", "vanilla": "(b) vanilla upcycling",
        "upit": "(c) UpIT", "dense_long": "(a') dense SFT, UpIT's epochs"}


def recipe(size: UpitSize, base: Path, train: Path, out: Path) -> dict:
    return {
        "model": str(base), "data": str(train), "out": str(out), "num_experts": size.experts, "top_k": 2,
        "layers": "all", "seed": 0,
        "common": {"dtype": size.dtype, "zero_stage": size.zero_stage, "micro_batch_size": size.mbs,
                   "max_length": size.seq, "eval_fraction": 0, "wandb_mode": "disabled"},
        "sft": {"epochs": size.sft_epochs, "lr": size.sft_lr, "save_every_epochs": size.save_every_epochs,
                "save_until_epochs": size.save_until_epochs},
        "assemble": {},
        "seed_data": {"fraction": size.seed_fraction},
        "router_init": {"epochs": size.router_epochs},
        "train": {"epochs": size.train_epochs, "lr": size.train_lr},
    }


def cmd_prepare(a) -> None:
    import glob

    if a.toy:
        from bench.quality.evals_tasks import toy

        info = toy(Path(a.data), test_per_task=a.test_per_task, train_per_task=a.train_per_task)
        print(f"{a.data}: made-up rows (--toy): " + ", ".join(f"{t} {s['test']}+{s['train']}"
                                                              for t, s in info["tasks"].items()))
        return
    wheel = a.evals_wheel or next(iter(sorted(glob.glob(str(DATA.parents[1] / "wheels" / "evals-*.whl")))), None)
    if not wheel:
        raise SystemExit(f"no evals wheel: pip download --no-deps evals==3.0.1.post1 -d {DATA.parents[1] / 'wheels'}")
    info = extract(Path(wheel), Path(a.data), test_per_task=a.test_per_task, train_per_task=a.train_per_task)
    size = sum(p.stat().st_size for p in Path(a.data).iterdir())
    print(f"{a.data}: {size / 2**20:.1f} MiB; " + ", ".join(f"{t} {s['test']}+{s['train']}"
                                                           for t, s in info["tasks"].items()))


def cmd_run(a) -> None:
    size = SIZES[a.size] if a.parallel is None else replace(SIZES[a.size], parallel=a.parallel)
    base = Path(a.base) if a.base else ROOT / "bench" / "quality" / "work" / a.size / "pretrain" / "hf"
    if not (base / "config.json").is_file():
        raise SystemExit(f"--base {base}: no dense checkpoint; run bench/upcycle_quality.py --size {a.size} first")
    data = Path(a.data)
    if not (data / "train.jsonl").is_file():
        raise SystemExit(f"{data}/train.jsonl missing: run `python bench/upit_quality.py prepare` first")
    work = Path(a.work) if a.work else ROOT / "bench" / "quality" / "work" / f"upit_{a.size}"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"upit_quality --size {a.size}: base {base}, work {work}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
          f", nice {os.nice(0)}", flush=True)
    n_train = subset(data / "train.jsonl", work / "train.jsonl", size.train_per_task, shuffle_seed=0)
    n_test = subset(data / "test.jsonl", work / "test.jsonl", size.test_per_task)
    print(f"data: {n_train} train rows, {n_test} test rows ({size.test_per_task} per task)", flush=True)
    runner = Runner(work / "logs", echo=lambda *x: print(*x, flush=True))
    cfg = recipe(size, base, work / "train.jsonl", work / "upit")
    (work / "recipe.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    nproc = ["--nproc", a.nproc] if a.nproc else []
    vmoe = work / "vanilla_moe"
    vtrain = {**cfg["common"], **cfg["train"], "model": str(vmoe), "data": cfg["data"], "out": str(work / "vanilla"),
              "seed": 0}
    (work / "vanilla_train.yaml").write_text(yaml.safe_dump(vtrain, sort_keys=False))

    def vanilla():
        runner.cli("vanilla_upcycle", ["upcycle", "--model", base, "--out", vmoe, "--num-experts", size.experts,
                                       "--top-k", 2, "--layers", "all", "--seed", 0, "--overwrite"],
                   done=vmoe / "config.json")
        runner.cli("vanilla", ["train", "--config", work / "vanilla_train.yaml", *nproc],
                   done=work / "vanilla" / "hf" / "config.json", clean=work / "vanilla")

    upit = lambda: runner.cli("upit", ["upit", "--config", work / "recipe.yaml", *nproc],  # noqa: E731
                              done=work / "upit" / "train" / "DONE")
    # control (a'): dense SFT for as many epochs as UpIT trains in total (sft + post-training), same LR and batch
    long_cfg = {**cfg["common"], "model": str(base), "data": cfg["data"], "out": str(work / "dense_long"), "seed": 0,
                "epochs": size.sft_epochs + size.train_epochs, "lr": size.sft_lr, "save_every_epochs": 1e9}
    (work / "dense_long_sft.yaml").write_text(yaml.safe_dump(long_cfg, sort_keys=False))
    dense_long = lambda: runner.cli("dense_long", ["sft", "--config", work / "dense_long_sft.yaml", *nproc],  # noqa: E731
                                    done=work / "dense_long" / "hf" / "config.json", clean=work / "dense_long")
    # on a GPU the arms share the device at once
    runner.chains([upit, vanilla, dense_long] if a.control else [upit, vanilla], size.parallel)
    models = {"base": base, "dense_sft": work / "upit" / "sft" / "hf", "vanilla": work / "vanilla" / "hf",
              "upit": work / "upit" / "train" / "hf"}
    runner.cli("eval", ["eval", "--model", *[f"{k}={v}" for k, v in models.items()], "--data", work / "test.jsonl",
                        "--max-length", size.eval_max_length, "--micro-batch-size", size.eval_batch,
                        "--max-new-tokens", size.max_new_tokens, "--out", work / "eval.json"],
               done=work / "eval.json")
    if a.control:
        runner.cli("eval_control", ["eval", "--model", f"dense_long={work / 'dense_long' / 'hf'}", "--data",
                                    work / "test.jsonl", "--max-length", size.eval_max_length, "--micro-batch-size",
                                    size.eval_batch, "--max-new-tokens", size.max_new_tokens,
                                    "--out", work / "eval_control.json"], done=work / "eval_control.json")
    ev = json.loads((work / "eval.json").read_text())
    if a.control:
        ev["models"]["dense_long"] = json.loads((work / "eval_control.json").read_text())["models"]["dense_long"]
    # the baseline of the paired tests is (a) dense SFT; `upcycle-ds eval` compared against its first model (base)
    from upcycle_ds.eval.evaluate import compare, comparison_lines

    ev["comparisons"] = {k: compare(ev["models"]["dense_sft"], ev["models"][k]) for k in ("vanilla", "upit")}
    ev["comparisons"]["upit_vs_vanilla"] = compare(ev["models"]["vanilla"], ev["models"]["upit"])
    if a.control:
        ev["comparisons"]["upit_vs_dense_long"] = compare(ev["models"]["dense_long"], ev["models"]["upit"])
    res = {"size": a.size, "config": asdict(size), "recipe": cfg, "base": str(base),
           "data": json.loads((data / "summary.json").read_text()), "train_rows": n_train, "test_rows": n_test,
           "timings_s": runner.times, "cpu_s": runner.cpu, "cpu_s_total": round(sum(runner.cpu.values()), 1),
           "wall_s": round(time.time() - t0, 1), "load_avg_end": os.getloadavg(), "command": " ".join(sys.argv),
           "eval": ev}
    (out / "upit_quality.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
    print(f"\nwall {res['wall_s']:.0f} s, children's CPU {res['cpu_s_total']:.0f} s; results {out / 'upit_quality.json'}\n")
    print(summary_table(ev["models"]))
    for k, tests in ev["comparisons"].items():
        a_name, b_name = ("dense_sft", k) if "_vs_" not in k else (k.split("_vs_")[1], k.split("_vs_")[0])
        print()
        print("\n".join(comparison_lines(a_name, b_name, [t for t in tests if t["task"] == "all"])))


def summary_table(models: dict) -> str:
    """Overall metrics, then log-likelihood accuracy per task; one column per arm (± standard error)."""
    from upcycle_ds.eval.evaluate import format_value

    names = list(models)
    lines = ["| | n | " + " | ".join(ARMS[k] for k in names) + " |", "|---|---|" + "---|" * len(names)]
    first = models[names[0]]["metrics"]
    for m in first["all"]:
        cells = [format_value(m, models[k]["metrics"]["all"][m]) for k in names]
        lines.append(f"| **{m}** (all tasks) | {first['all'][m]['n']} | " + " | ".join(cells) + " |")
    for task, block in first["tasks"].items():
        cells = [format_value("choice_acc", models[k]["metrics"]["tasks"][task]["choice_acc"]) for k in names]
        lines.append(f"| choice_acc {task} | {block['choice_acc']['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="evals wheel -> compact train/test jsonl")
    pp.add_argument("--evals-wheel", help="default: bench/quality/wheels/evals-*.whl")
    pp.add_argument("--data", default=str(DATA))
    pp.add_argument("--test-per-task", type=int, default=150)
    pp.add_argument("--train-per-task", type=int, default=1000)
    pp.add_argument("--toy", action="store_true", help="made-up rows in the same format, no wheel (the CPU rehearsal "
                    "of bench/gpu/run.sh)")
    pr = sub.add_parser("run", help="the three arms + evaluation")
    pr.add_argument("--size", choices=sorted(SIZES), default="cpu")
    pr.add_argument("--out", required=True)
    pr.add_argument("--base", help="dense HF dir (default bench/quality/work/SIZE/pretrain/hf)")
    pr.add_argument("--data", default=str(DATA))
    pr.add_argument("--work", help="run dirs + logs (default bench/quality/work/upit_SIZE)")
    pr.add_argument("--nproc", type=int, default=0, help="--nproc of the training stages (0: one rank, no launcher)")
    pr.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the control (a'): dense SFT for UpIT's total epochs (--no-control: not; the CPU "
                         "rehearsal of bench/gpu/run.sh, where (a') is the path of (a) again)")
    pr.add_argument("--parallel", type=int, default=None, help="arms at a time (default: the size's; bench/gpu/run.sh "
                    "sizes it from the plan, bench/gpu/fit.py)")
    a = p.parse_args()
    cmd_prepare(a) if a.cmd == "prepare" else cmd_run(a)


if __name__ == "__main__":
    main()
