"""Held-out accuracy of HF checkpoints (dense or MoE) on WORK/data/test.jsonl: greedy decoding with transformers'
`generate`, exact match of the answer, per task and overall, with the standard error sqrt(p(1-p)/n).

Exact match after normalisation: strip whitespace, surrounding quotes and a trailing period, case-insensitive
("Yes" == "yes", "N." == "N"); nothing else (no substring / first-token credit).

    python examples/upit_smollm2/eval.py --test WORK/data/test.jsonl --out WORK/results.json \
        --model base=WORK/dense --model dense_sft=WORK/runs/dense_sft/hf ...
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
import transformers


def norm(s: str) -> str:
    s = s.strip()
    s = s.strip("\"'`").strip()
    if s.endswith("."):
        s = s[:-1]
    return s.strip().lower()


@torch.no_grad()
def generate(path: str, rows: list[dict], batch_size: int, max_new_tokens: int) -> list[str]:
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        texts = [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outs


def stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def table(results: dict) -> str:
    tasks = sorted({t for r in results.values() for t in r["tasks"]})
    lines = ["| model | " + " | ".join(tasks) + " | all (n) |", "|---" * (len(tasks) + 2) + "|"]
    for name, r in results.items():
        cells = [f"{r['tasks'][t]['acc']:.3f} ± {r['tasks'][t]['se']:.3f}" if t in r["tasks"] else "" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{r['acc']:.3f} ± {r['se']:.3f}** ({r['n']}) |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test")
    ap.add_argument("--model", action="append", help="NAME=HF_DIR (repeat)")
    ap.add_argument("--out", help="results JSON (per model: per-task and overall accuracy)")
    ap.add_argument("--table", metavar="RESULTS_JSON", help="only print the markdown table of a results JSON")
    ap.add_argument("--max-samples-per-task", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    a = ap.parse_args()
    if a.table:
        print(table(json.loads(Path(a.table).read_text())))
        return
    if not (a.test and a.model and a.out):
        ap.error("--test, --model and --out are needed (or --table)")
    rows = [json.loads(l) for l in Path(a.test).read_text().splitlines() if l.strip()]
    if a.max_samples_per_task:
        seen = defaultdict(int)
        kept = []
        for r in rows:
            if seen[r["task"]] < a.max_samples_per_task:
                seen[r["task"]] += 1
                kept.append(r)
        rows = kept
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for spec in a.model:
        name, path = spec.split("=", 1)
        t0 = time.time()
        preds = generate(path, rows, a.batch_size, a.max_new_tokens)
        per = defaultdict(lambda: [0, 0])
        samples = []
        for r, p in zip(rows, preds):
            ok = norm(p) == norm(r["ideal"])
            per[r["task"]][0] += ok
            per[r["task"]][1] += 1
            samples.append({"task": r["task"], "ideal": r["ideal"], "pred": p, "ok": ok})
        n = sum(v[1] for v in per.values())
        c = sum(v[0] for v in per.values())
        res = {"path": path, "n": n, "acc": c / n, "se": stderr(c / n, n),
               "tasks": {t: {"n": v[1], "acc": v[0] / v[1], "se": stderr(v[0] / v[1], v[1])} for t, v in per.items()},
               "eval_s": round(time.time() - t0, 1), "samples": samples}
        results[name] = res
        out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
        print(f"{name}: {c}/{n} = {c / n:.3f} ± {res['se']:.3f}  ({res['eval_s']} s)  "
              + "  ".join(f"{t} {v['acc']:.2f}" for t, v in res["tasks"].items()), flush=True)


if __name__ == "__main__":
    main()
