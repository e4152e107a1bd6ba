"""Honest numbers for small evaluations: 95% intervals, paired differences between stages, seeds.

- `wilson_interval(k, n)`: the Wilson score interval of a proportion (accuracy on n questions); unlike
  p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not zero-width at 0 or n.
- `mean_interval(values)`: mean with a Student-t interval (normal when `normal=True`).
- `paired_bootstrap(baseline, other)`: the difference mean(other) - mean(baseline) of two stages scored
  on the SAME questions, with a percentile interval from B resamples of the questions (seeded: the same
  inputs give the same interval). Pairing matters: two stages of one model are right on mostly the same
  questions, so their difference is far less noisy than two independent accuracies suggest.
- `mean_se(values)`: mean and standard error across seeds (sample standard deviation / sqrt(K)).
- `stage_table` / `format_stage_table`: each stage's accuracy with its Wilson interval and its paired
  difference from a baseline stage with the bootstrap interval, as numbers and as aligned text.
Pure Python + numpy; no SciPy needed (the t quantile is computed here).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Mapping, Sequence

import numpy as np

__all__ = ["wilson_interval", "t_quantile", "mean_interval", "mean_se", "format_mean_se", "PairedDifference",
           "paired_bootstrap", "stage_table", "format_stage_table"]


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (low, high) of the proportion successes / n."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n > 0, got {successes} of {n}")
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact ends at 0 and n (rounding would put them a hair inside)
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1 + aa * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom (bisection on the exact CDF)."""
    if not 0 < p < 1 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def mean_interval(values: Sequence[float], confidence: float = 0.95, *, normal: bool = False
                  ) -> tuple[float, float, float]:
    """(mean, low, high): mean +- t_{n-1} * s / sqrt(n) (z instead of t when normal=True). Needs n >= 2."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"mean_interval needs at least 2 values, got {len(x)}")
    mean, se = float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))
    q = _z(confidence) if normal else t_quantile(0.5 + confidence / 2, len(x) - 1)
    return mean, mean - q * se, mean + q * se


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error) across seeds: sample standard deviation / sqrt(K); nan for one value."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("mean_se needs at least one value")
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


def format_mean_se(values: Sequence[float], digits: int = 3) -> str:
    """"0.345 ± 0.012" (mean ± standard error across seeds; "± n/a" for a single seed)."""
    mean, se = mean_se(values)
    return f"{mean:.{digits}f} ± " + ("n/a" if math.isnan(se) else f"{se:.{digits}f}")


@dataclass(frozen=True)
class PairedDifference:
    """mean(other) - mean(baseline) over the same questions, with a bootstrap percentile interval."""
    difference: float
    low: float
    high: float
    se: float  # standard deviation of the bootstrap differences
    n: int
    resamples: int
    confidence: float


def paired_bootstrap(baseline: Sequence[float], other: Sequence[float], *, resamples: int = 10_000, seed: int = 0,
                     confidence: float = 0.95, chunk: int = 1000) -> PairedDifference:
    """Paired bootstrap of mean(other - baseline): resample the questions (with replacement, the same
    resampled questions for both stages) `resamples` times with numpy's PCG64 seeded by `seed`; the
    interval is the (1-c)/2 and (1+c)/2 percentiles of the resampled differences."""
    a, b = np.asarray(baseline, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired_bootstrap needs two equally long non-empty score lists (one per question), "
                         f"got {a.shape} and {b.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    _z(confidence)
    d = b - a
    n = len(d)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        diffs[start: start + size] = d[rng.integers(0, n, size=(size, n))].mean(axis=1)
    low, high = np.quantile(diffs, [(1 - confidence) / 2, (1 + confidence) / 2])
    se = float(diffs.std(ddof=1)) if resamples > 1 else 0.0
    return PairedDifference(float(d.mean()), float(low), float(high), se, n, resamples, confidence)


def stage_table(stages: Mapping[str, Sequence[bool]], baseline: str, *, resamples: int = 10_000, seed: int = 0,
                confidence: float = 0.95) -> list[dict]:
    """One row per stage (in order): accuracy, its Wilson interval, and (other stages) the paired bootstrap
    difference from `baseline` with its interval. `stages`: name -> per-question correctness, every
    stage scored on the same questions in the same order."""
    if baseline not in stages:
        raise ValueError(f"baseline stage {baseline!r} is not among the stages {list(stages)}")
    base = [float(v) for v in stages[baseline]]
    rows = []
    for name, hits in stages.items():
        hits = [float(v) for v in hits]
        if len(hits) != len(base):
            raise ValueError(f"stage {name!r} has {len(hits)} questions, baseline {baseline!r} has {len(base)}: "
                             "paired differences need the same questions")
        k = int(sum(hits))
        low, high = wilson_interval(k, len(hits), confidence)
        row = {"stage": name, "n": len(hits), "correct": k, "accuracy": k / len(hits), "low": low, "high": high,
               "confidence": confidence}
        if name != baseline:
            row["vs_baseline"] = asdict(paired_bootstrap(base, hits, resamples=resamples, seed=seed,
                                                         confidence=confidence))
        rows.append(row)
    return rows


def format_stage_table(rows: Sequence[dict], baseline: str, digits: int = 3) -> str:
    """Aligned text of `stage_table` rows: stage | accuracy [95% interval] | difference from baseline [interval]."""
    pct = round(100 * rows[0]["confidence"]) if rows else 95
    f = f"{{:.{digits}f}}"
    sf = f"{{:+.{digits}f}}"
    header = ["stage", f"accuracy [{pct}% CI]", f"vs {baseline} [{pct}% CI, paired]"]
    body = []
    for r in rows:
        acc = f"{f.format(r['accuracy'])} [{f.format(r['low'])}, {f.format(r['high'])}]"
        v = r.get("vs_baseline")
        diff = "-" if v is None else f"{sf.format(v['difference'])} [{sf.format(v['low'])}, {sf.format(v['high'])}]"
        body.append([r["stage"], acc, diff])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.ljust(w) if j == 0 else c.rjust(w)  # noqa: E731
                                   for j, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])
