"""Standard errors and paired tests for evaluation results (no scipy: the one distribution needed is written here).

- proportion: p ± sqrt(p (1 - p) / n)  (binomial standard error; exact match, multiple-choice accuracy)
- mean of per-row values: mean ± sd / sqrt(n)
- token-weighted mean (held-out LM loss = sum of token losses / tokens, the trainer's eval loss): the ratio
  estimator's standard error over rows, sqrt(sum_i (l_i - R n_i)^2 / (m (m - 1))) / mean(n_i)
- paired tests on the same rows: McNemar's exact test for right/wrong outcomes (two-sided binomial test on the
  discordant pairs) and the paired t-test for per-row values (two-sided, Student t with n - 1 degrees of freedom).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def proportion(oks: Sequence[bool]) -> dict:
    n = len(oks)
    p = sum(map(bool, oks)) / n if n else float("nan")
    return {"value": p, "se": math.sqrt(p * (1 - p) / n) if n else float("nan"), "n": n}


def mean(values: Sequence[float]) -> dict:
    n = len(values)
    m = sum(values) / n if n else float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return {"value": m, "se": sd / math.sqrt(n) if n > 1 else float("nan"), "n": n}


def ratio(sums: Sequence[float], counts: Sequence[float]) -> dict:
    """sum(sums) / sum(counts) with the ratio estimator's standard error over the m rows."""
    m, total = len(sums), float(sum(counts))
    r = sum(sums) / total if total else float("nan")
    if m < 2 or not total:
        return {"value": r, "se": float("nan"), "n": m, "tokens": int(total)}
    var = sum((s - r * c) ** 2 for s, c in zip(sums, counts)) / (m * (m - 1))
    return {"value": r, "se": math.sqrt(var) / (total / m), "n": m, "tokens": int(total)}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if math.isnan(t) or df <= 0:
        return float("nan")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def mcnemar(a_ok: Sequence[bool], b_ok: Sequence[bool]) -> dict:
    """Exact McNemar test of two right/wrong vectors on the same rows: b = only A right, c = only B right."""
    if len(a_ok) != len(b_ok):
        raise ValueError("paired outcomes must have the same length")
    only_a = sum(1 for x, y in zip(a_ok, b_ok) if x and not y)
    only_b = sum(1 for x, y in zip(a_ok, b_ok) if y and not x)
    n, k = only_a + only_b, min(only_a, only_b)
    p = 1.0 if n == 0 else min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n)
    diff = (only_b - only_a) / len(a_ok) if a_ok else float("nan")
    return {"test": "mcnemar", "n": len(a_ok), "only_a": only_a, "only_b": only_b, "diff": diff, "p": p}


def paired_t(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired t-test of per-row values (diff = mean of b - a)."""
    if len(a) != len(b):
        raise ValueError("paired values must have the same length")
    d = [y - x for x, y in zip(a, b)]
    m = mean(d)
    t = m["value"] / m["se"] if m["se"] and not math.isnan(m["se"]) else (0.0 if m["value"] == 0 else float("inf"))
    p = t_two_sided_p(t, len(d) - 1) if len(d) > 1 else float("nan")
    return {"test": "paired_t", "n": len(d), "diff": m["value"], "se": m["se"], "t": t, "p": p}
