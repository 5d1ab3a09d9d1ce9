"""Score HF checkpoints (dense or MoE) on evaluation rows; summaries with standard errors; paired comparisons.

`evaluate_model` returns, for one checkpoint, per-row predictions and per-task / overall metrics:

| metric | rows | value | standard error |
|---|---|---|---|
| `loss` | training rows | sum of token NLLs / tokens (the trainer's eval loss); `ppl` = exp(loss) | ratio estimator over rows |
| `choice_acc` | `choices` | fraction where the most likely choice is `answer` | binomial |
| `exact_match` | `ideal` | fraction where the greedy answer matches an ideal (normalised) | binomial |
| `answer_nll` | `ideal` | mean over rows of the per-token NLL of the first ideal answer (lower is better) | over rows |

`compare` tests two results on the same rows: McNemar's exact test (`choice_acc`, `exact_match`) or the paired
t-test (`loss` on per-row NLL sums, `answer_nll`), per task and overall.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass

from . import stats
from .rows import EvalRow, normalise
from .scoring import greedy, load_model, prompt_ids, sequence_logprobs

METRICS = ("loss", "choice_acc", "exact_match", "answer_nll")
LOWER_IS_BETTER = {"loss", "answer_nll"}


@dataclass(kw_only=True)
class EvalOptions:
    max_length: int = 2048
    micro_batch_size: int = 8
    max_new_tokens: int = 32
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False


def evaluate_model(path: str, rows: list[EvalRow], opts: EvalOptions, log=lambda *a: None) -> dict:
    t0 = time.time()
    model, tok = load_model(path, device=opts.device, dtype=opts.dtype, trust_remote_code=opts.trust_remote_code)
    ex = [{"row": r.index, "task": r.task} for r in rows]
    kw = dict(max_length=opts.max_length, batch_size=opts.micro_batch_size)

    loss = [(i, r) for i, r in enumerate(rows) if "loss" in r.kinds]
    if loss:
        lp, n, trunc = sequence_logprobs(model, tok, [r.train_row for _, r in loss], allow_truncation=True,
                                         what="loss row", **kw)
        for (i, _), s, k, t in zip(loss, lp, n, trunc):
            ex[i].update(nll=-s, tokens=k, **({"truncated": True} if t else {}))
        log(f"  loss on {len(loss)} rows")

    cand = [(i, c) for i, r in enumerate(rows) if "choice" in r.kinds for c in r.choices]
    if cand:
        lp, _, _ = sequence_logprobs(model, tok, [rows[i].completion_row(c) for i, c in cand],
                                     allow_truncation=False, what="choice", **kw)
        scores = defaultdict(list)
        for (i, _), s in zip(cand, lp):
            scores[i].append(s)
        for i, sc in scores.items():
            pred = max(range(len(sc)), key=lambda j: (sc[j], -j))
            ex[i].update(choice_logprobs=sc, choice_pred=pred, answer=rows[i].answer,
                         choice_ok=pred == rows[i].answer)
        log(f"  {len(cand)} choices of {len(scores)} rows")

    gen = [i for i, r in enumerate(rows) if "generate" in r.kinds]
    if gen:
        lp, n, _ = sequence_logprobs(model, tok, [rows[i].completion_row(rows[i].ideals[0]) for i in gen],
                                     allow_truncation=False, what="ideal answer", **kw)
        prompts = [prompt_ids(tok, rows[i].prompt_messages, rows[i].prompt) for i in gen]
        outs = greedy(model, tok, prompts, batch_size=opts.micro_batch_size, max_new_tokens=opts.max_new_tokens)
        for i, s, k, o in zip(gen, lp, n, outs):
            ideals = {normalise(x) for x in rows[i].ideals}
            ex[i].update(generation=o, ideal=rows[i].ideals, exact_match=normalise(o) in ideals,
                         answer_nll=-s / k)
        log(f"  generated {len(gen)} answers")
    del model
    return {"path": str(path), "metrics": summarise(ex), "examples": ex, "eval_s": round(time.time() - t0, 1)}


def _metric(examples: list[dict], name: str) -> dict | None:
    if name == "loss":
        xs = [e for e in examples if "nll" in e]
        if not xs:
            return None
        out = stats.ratio([e["nll"] for e in xs], [e["tokens"] for e in xs])
        out["ppl"] = math.exp(out["value"]) if out["value"] < 700 else float("inf")
        return out
    if name == "choice_acc":
        xs = [e["choice_ok"] for e in examples if "choice_ok" in e]
        return stats.proportion(xs) if xs else None
    if name == "exact_match":
        xs = [e["exact_match"] for e in examples if "exact_match" in e]
        return stats.proportion(xs) if xs else None
    xs = [e["answer_nll"] for e in examples if "answer_nll" in e]
    return stats.mean(xs) if xs else None


def summarise(examples: list[dict]) -> dict:
    """{"all": {metric: {value, se, n, ...}}, "tasks": {task: {...}}} (only metrics some row has)."""
    by_task = defaultdict(list)
    for e in examples:
        by_task[e["task"]].append(e)

    def block(xs):
        return {m: v for m in METRICS if (v := _metric(xs, m)) is not None}

    return {"all": block(examples), "tasks": {t: block(xs) for t, xs in sorted(by_task.items())}}


def compare(a: dict, b: dict) -> list[dict]:
    """Paired tests of result `b` against `a` (same rows), per task and overall: diff = b - a."""
    ea, eb = a["examples"], b["examples"]
    if [e["row"] for e in ea] != [e["row"] for e in eb]:
        raise ValueError("the two results are not on the same rows")
    tasks = ["all"] + sorted({e["task"] for e in ea} - {"all"})
    out = []
    for task in tasks:
        pairs = [(x, y) for x, y in zip(ea, eb) if task == "all" or x["task"] == task]
        for m in METRICS:
            if m == "loss":
                ps = [(x, y) for x, y in pairs if "nll" in x and "nll" in y]
                if not ps:
                    continue
                res = stats.paired_t([x["nll"] for x, _ in ps], [y["nll"] for _, y in ps])
                per_row_tokens = sum(x["tokens"] for x, _ in ps) / len(ps)
                res["diff"] /= per_row_tokens  # mean per-row NLL-sum difference -> token-weighted loss difference
                res["se"] /= per_row_tokens
            elif m == "answer_nll":
                ps = [(x, y) for x, y in pairs if m in x and m in y]
                if not ps:
                    continue
                res = stats.paired_t([x[m] for x, _ in ps], [y[m] for _, y in ps])
            else:
                key = "choice_ok" if m == "choice_acc" else "exact_match"
                ps = [(x, y) for x, y in pairs if key in x and key in y]
                if not ps:
                    continue
                res = stats.mcnemar([x[key] for x, _ in ps], [y[key] for _, y in ps])
            out.append({"task": task, "metric": m, **res})
    return out


def format_value(m: str, v: dict) -> str:
    digits = 4 if m in LOWER_IS_BETTER else 3
    se = "nan" if v["se"] is None or math.isnan(v["se"]) else f"{v['se']:.{digits}f}"
    return f"{v['value']:.{digits}f} ± {se}"


def table(results: dict[str, dict]) -> str:
    """Markdown table: one line per (metric, task), one column per model."""
    names = list(results)
    lines = ["| metric | task | n | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    first = results[names[0]]["metrics"]
    keys = [("all", m) for m in first["all"]]
    if len(first["tasks"]) > 1:
        keys += [(t, m) for t, block in first["tasks"].items() for m in block]
    for task, m in keys:
        cells = []
        for name in names:
            block = results[name]["metrics"]["all" if task == "all" else "tasks"]
            v = block.get(m) if task == "all" else block.get(task, {}).get(m)
            cells.append(format_value(m, v) if v else "")
        n = (first["all"] if task == "all" else first["tasks"][task])[m]["n"]
        lines.append(f"| {m} | {task} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_lines(name_a: str, name_b: str, tests: list[dict]) -> list[str]:
    out = []
    for t in tests:
        if t["test"] == "mcnemar":
            detail = f"{t['only_b']} rows only {name_b} right, {t['only_a']} only {name_a} (McNemar)"
            diff = f"{t['diff']:+.3f}"
        else:
            detail = f"paired t = {t['t']:.2f}"
            diff = f"{t['diff']:+.4f} ± {t['se']:.4f}"
        out.append(f"{name_b} - {name_a}  {t['metric']:<11} {t['task']:<20} {diff}  p = {t['p']:.3g}  "
                   f"(n = {t['n']}; {detail})")
    return out
