"""Across-seed statistics for the reproduction (issue 14): intervals, orderings, and a stopping rule.

* :func:`bootstrap_interval` — percentile bootstrap of the mean over seeds: resample the n seed scores
  with replacement ``n_boot`` times (fixed ``rng_seed``), take the mean of each resample, and report
  the (α/2, 1 − α/2) quantiles of those means. Constant data gives a zero-width interval.
* :func:`ordering` — states "A < B" only when the two intervals are disjoint; otherwise the pair is
  "not distinguishable here".
* :func:`flattened_at` — the convergence criterion: a validation curve (lower is better) has flattened at
  evaluation point i ≥ 2K − 1 when the mean of its last K points improves on the mean of the K points
  before them by less than ``threshold``, relatively.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wadi_analysis.errors import InvalidValue

N_BOOT = 10_000
NOT_DISTINGUISHABLE = "not distinguishable here"


def bootstrap_interval(values: Sequence[float], level: float = 0.95, n_boot: int = N_BOOT,
                       rng_seed: int = 0) -> dict:
    """Mean of ``values`` and its percentile-bootstrap ``level`` interval (``n_boot`` resamples, fixed rng)."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0 or not np.all(np.isfinite(data)):
        raise InvalidValue("bootstrap_interval needs a non-empty list of finite scores")
    if not 0.0 < level < 1.0 or n_boot < 1:
        raise InvalidValue(f"bootstrap_interval needs 0 < level < 1 and n_boot >= 1, got {level}, {n_boot}")
    rng = np.random.default_rng(rng_seed)
    means = data[rng.integers(0, data.size, size=(n_boot, data.size))].mean(axis=1)
    alpha = 1.0 - level
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(data.mean()), "low": float(low), "high": float(high), "n": int(data.size),
            "level": level, "n_boot": n_boot}


def ordering(name_a: str, interval_a: dict, name_b: str, interval_b: dict) -> str:
    """``"A < B"`` (lower score first) when the intervals are disjoint, else :data:`NOT_DISTINGUISHABLE`."""
    if interval_a["high"] < interval_b["low"]:
        return f"{name_a} < {name_b}"
    if interval_b["high"] < interval_a["low"]:
        return f"{name_b} < {name_a}"
    return NOT_DISTINGUISHABLE


def flattened_at(curve: Sequence[float], window: int, threshold: float) -> int | None:
    """First evaluation index i where the mean of the last ``window`` points (w) improves on the mean of
    the ``window`` points before them by less than ``threshold``, relatively:

        (mean v[i-2w+1 .. i-w] - mean v[i-w+1 .. i]) / mean v[i-2w+1 .. i-w] < threshold

    Means of windows, not single points: a one-step FD curve at 300 samples moves by 10-30 % between
    points, so comparing two points "flattens" by chance (on reports/recipe's curves the point-to-point
    rule stopped at step 700 a run that went on from FD 2.8 to 1.7). Earliest index: 2w - 1."""
    if window < 1 or threshold < 0:
        raise InvalidValue(f"flattened_at needs window >= 1 and threshold >= 0, got {window}, {threshold}")
    values = [float(v) for v in curve]
    for i in range(2 * window - 1, len(values)):
        before = sum(values[i - 2 * window + 1: i - window + 1]) / window
        after = sum(values[i - window + 1: i + 1]) / window
        if (before - after) / max(abs(before), 1e-12) < threshold:
            return i
    return None
