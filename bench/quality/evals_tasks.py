"""Instruction data from the OpenAI `evals` wheel (MIT licence; PyPI `evals`, read from the zip, never installed).

Each task folder `evals/registry/data/<task>/*.jsonl` holds chat-format samples `{"input": [messages], "ideal":
answer}`. `extract` keeps a fixed set of tasks whose answers are short labels (so every test row is scored both by
exact match of the greedy answer and by log-likelihood over the task's label set), balances the labels where the
pool allows (round-robin over labels after a seeded shuffle, so chance is 1 / number of labels), and writes per task
a fixed held-out test split and up to `train_per_task` training rows: a few MiB of jsonl that travels anywhere.
"""

from __future__ import annotations

import json
import random
import zipfile
from collections import defaultdict
from pathlib import Path

# task -> why it is in: short label answers, a large pool, a signal a small model can pick up from the prompt
TASKS = {
    "formal_logic": "evaluate a nested boolean expression (true/false)",
    "sarcasm": "is a news headline sarcastic (1/0)",
    "diabetes": "tabular patient record -> diabetes risk (1/0)",
    "heart-disease": "tabular patient record -> heart disease (1/0)",
    "bulgarian-lexicon": "is this a Bulgarian word (Y/N)",
    "naughty_strings": "is this string malicious (Yes/No)",
    "connect4": "who won this connect-4 board (X/Y)",
    "regex-match": "does this regex match the string (Yes./No.)",
}
MAX_PROMPT_CHARS = 900  # drop the few very long prompts (they would not fit the CPU size's rows)


def read_task(z: zipfile.ZipFile, task: str) -> list[dict]:
    rows = []
    for name in sorted(z.namelist()):
        if name.startswith(f"evals/registry/data/{task}/") and name.endswith(".jsonl"):
            for line in z.read(name).decode("utf-8").splitlines():
                if not line.strip():
                    continue
                r = json.loads(line)
                if not (isinstance(r, dict) and isinstance(r.get("input"), list) and "ideal" in r):
                    continue
                ideal = r["ideal"][0] if isinstance(r["ideal"], list) and r["ideal"] else r["ideal"]
                msgs = [{"role": m["role"], "content": m["content"]} for m in r["input"]
                        if isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")]
                if msgs and msgs[-1]["role"] != "assistant" and sum(len(m["content"]) for m in msgs) <= MAX_PROMPT_CHARS:
                    rows.append({"messages": msgs, "ideal": str(ideal).strip()})
    if not rows:
        raise SystemExit(f"task {task}: no chat-format rows in the wheel")
    return rows


def balanced_order(rows: list[dict], seed: str) -> list[dict]:
    """Seeded shuffle, then round-robin over labels (most frequent first): every prefix is as balanced as the pool
    allows. Labels with a single row (e.g. connect4's one 'draw') are dropped."""
    by = defaultdict(list)
    for r in rows:
        by[r["ideal"]].append(r)
    rng = random.Random(seed)
    labels = sorted((k for k, v in by.items() if len(v) > 1), key=lambda k: (-len(by[k]), k))
    for k in labels:
        rng.shuffle(by[k])
    out, i = [], 0
    while any(i < len(by[k]) for k in labels):
        out += [by[k][i] for k in labels if i < len(by[k])]
        i += 1
    return out


def extract(wheel: Path, out: Path, *, test_per_task: int, train_per_task: int, seed: int = 0) -> dict:
    """WHEEL -> OUT/test.jsonl, OUT/train.jsonl, OUT/summary.json (rows in a fixed order; a size takes prefixes)."""
    z = zipfile.ZipFile(wheel)
    out.mkdir(parents=True, exist_ok=True)
    train, test, summary = [], [], {}
    for task in TASKS:
        rows = balanced_order(read_task(z, task), f"{seed}-{task}")
        labels = sorted({r["ideal"] for r in rows})
        te = rows[:test_per_task]
        tr = rows[test_per_task:test_per_task + train_per_task]
        for r in te:
            test.append({"task": task, "messages": r["messages"], "ideal": r["ideal"], "choices": labels,
                         "answer": labels.index(r["ideal"])})
        for r in tr:
            train.append({"task": task, "messages": r["messages"] + [{"role": "assistant", "content": r["ideal"]}]})
        summary[task] = {"pool": len(rows), "test": len(te), "train": len(tr), "labels": labels,
                         "what": TASKS[task]}
    for name, rows in (("test.jsonl", test), ("train.jsonl", train)):
        with open(out / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    info = {"wheel": wheel.name, "seed": seed, "tasks": summary}
    (out / "summary.json").write_text(json.dumps(info, indent=1))
    return info


def subset(src: Path, dst: Path, per_task: int, shuffle_seed: int | None = None) -> int:
    """The first `per_task` rows of every task of SRC -> DST (optionally shuffled together)."""
    seen, kept = defaultdict(int), []
    for line in src.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if seen[r["task"]] < per_task:
            seen[r["task"]] += 1
            kept.append(line)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(kept)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return len(kept)


def toy(out: Path, *, test_per_task: int, train_per_task: int, seed: int = 0) -> dict:
    """A made-up stand-in for `extract`'s output, same files and row format, for the CPU rehearsal of
    bench/gpu/run.sh (no wheel, no download): two label tasks a tiny model can learn (is the number even, which
    of two numbers is larger). The numbers mean nothing about UpIT."""
    rng = random.Random(seed)
    tasks = {
        "parity": (lambda: (lambda n: (f"Is {n} even? Answer Y or N.", "Y" if n % 2 == 0 else "N"))(rng.randrange(1000)),
                   ["N", "Y"]),
        "larger": (lambda: (lambda a, b: (f"Which is larger, A={a} or B={b}? Answer A or B.", "A" if a > b else "B"))(
            rng.randrange(500), rng.randrange(500, 1000) if rng.random() < 0.5 else rng.randrange(500)), ["A", "B"]),
    }
    out.mkdir(parents=True, exist_ok=True)
    train, test, summary = [], [], {}
    for task, (make, labels) in tasks.items():
        rows = [make() for _ in range(test_per_task + train_per_task)]
        for prompt, ideal in rows[:test_per_task]:
            test.append({"task": task, "messages": [{"role": "user", "content": prompt}], "ideal": ideal,
                         "choices": labels, "answer": labels.index(ideal)})
        for prompt, ideal in rows[test_per_task:]:
            train.append({"task": task, "messages": [{"role": "user", "content": prompt},
                                                     {"role": "assistant", "content": ideal}]})
        summary[task] = {"pool": len(rows), "test": test_per_task, "train": train_per_task, "labels": labels,
                         "what": "made up (CPU rehearsal)"}
    for name, rows in (("test.jsonl", test), ("train.jsonl", train)):
        with open(out / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    info = {"wheel": None, "seed": seed, "tasks": summary}
    (out / "summary.json").write_text(json.dumps(info, indent=1))
    return info
