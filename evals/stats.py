"""Confidence intervals for eval scores: bootstrap for means, Wilson for proportions.

* Continuous per-item scores (similarity, perplexity) and paired differences
  get a **percentile bootstrap** 95% interval: ``B`` resamples of the items with
  replacement, drawn from ``numpy.random.default_rng(seed)`` so the same scores
  always give the same interval.
* 0/1 scores (exact match, win rate, human preference without ties) get the
  **Wilson score** 95% interval, which stays inside [0, 1] and behaves at
  0% and 100%, unlike the normal approximation.

Every summary says which method it used (``method``).
"""
from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000
TIE_TOL = 1e-6


def bootstrap_ci(values: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of the mean of ``values``."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if x.size == 1 or np.all(x == x[0]):
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    mean = float(x.mean())  # resampled means may round a hair past the point estimate
    return min(float(lo), mean), max(float(hi), mean)


def wilson_ci(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n``."""
    if n <= 0:
        raise ValueError("wilson_ci needs n >= 1")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at p = 0 or 1 one bound is exactly p; keep rounding from moving it past p
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def is_binary(values: Sequence[float]) -> bool:
    return all(v in (0, 1, 0.0, 1.0, True, False) for v in values)


def summarize(values: Sequence[float], *, binary: bool | None = None, seed: int = 0) -> dict:
    """{mean, n, ci_low, ci_high, method, std} of per-item scores."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("summarize needs at least one value")
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    binary = is_binary(vals) if binary is None else binary
    if binary:
        lo, hi = wilson_ci(sum(vals), n)
        method = "wilson"
    else:
        lo, hi = bootstrap_ci(vals, seed=seed)
        method = f"bootstrap-percentile(B={BOOTSTRAP_RESAMPLES},seed={seed})"
    return {"mean": mean, "n": n, "ci_low": lo, "ci_high": hi, "method": method, "std": std}


def paired_difference(adapter: Sequence[float], base: Sequence[float], seed: int = 0) -> dict:
    """Mean of per-item ``adapter - base`` with a bootstrap 95% interval (items resampled as pairs)."""
    if len(adapter) != len(base):
        raise ValueError(f"paired_difference needs equal lengths, got {len(adapter)} and {len(base)}")
    diffs = [float(a) - float(b) for a, b in zip(adapter, base)]
    lo, hi = bootstrap_ci(diffs, seed=seed)
    return {"diff": sum(diffs) / len(diffs), "ci_low": lo, "ci_high": hi, "n": len(diffs),
            "method": f"paired-bootstrap-percentile(B={BOOTSTRAP_RESAMPLES},seed={seed})"}


def win_rate(adapter: Sequence[float], base: Sequence[float], *, higher_is_better: bool = True,
             tol: float = TIE_TOL) -> dict:
    """Share of items where the adapter beats the base (ties within ``tol`` are not wins), Wilson CI."""
    if len(adapter) != len(base) or not adapter:
        raise ValueError("win_rate needs two equal, non-empty lists")
    wins = ties = losses = 0
    for a, b in zip(adapter, base):
        d = (float(a) - float(b)) * (1 if higher_is_better else -1)
        if abs(d) <= tol:
            ties += 1
        elif d > 0:
            wins += 1
        else:
            losses += 1
    n = len(adapter)
    lo, hi = wilson_ci(wins, n)
    return {"rate": wins / n, "ci_low": lo, "ci_high": hi, "wins": wins, "ties": ties, "losses": losses,
            "n": n, "method": "wilson"}
