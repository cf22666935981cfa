"""Paired comparisons of two classifiers on the same test items (pure numpy)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def paired_bootstrap(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray,
                     metric: Callable[[np.ndarray, np.ndarray], float], n: int = 1000, seed: int = 0,
                     groups: np.ndarray | None = None, alpha: float = 0.05) -> dict[str, float]:
    """Percentile bootstrap of ``metric(y, pred_a) - metric(y, pred_b)`` over the same resamples.

    Both predictions are scored on every resample, so the interval reflects the paired
    difference (the shared difficulty of the items cancels). With ``groups`` (e.g. patient
    IDs) whole groups are resampled, never single items of a group. Returns ``diff`` (on the
    full sample), ``ci_low``, ``ci_high`` and ``p_le_0``: the share of resamples where A is
    not better than B (a one-sided bootstrap p-value for "A beats B").
    """
    y, pred_a, pred_b = np.asarray(y), np.asarray(pred_a), np.asarray(pred_b)
    if not len(y) == len(pred_a) == len(pred_b):
        raise ValueError(f"y, pred_a and pred_b differ in length ({len(y)}, {len(pred_a)}, {len(pred_b)})")
    rng = np.random.default_rng(seed)
    if groups is None:
        members = None
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    diffs = np.empty(n)
    for i in range(n):
        if members is None:
            idx = rng.integers(0, len(y), len(y))
        else:
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        diffs[i] = metric(y[idx], pred_a[idx]) - metric(y[idx], pred_b[idx])
    diffs = diffs[~np.isnan(diffs)]
    return {"diff": float(metric(y, pred_a) - metric(y, pred_b)),
            "ci_low": float(np.quantile(diffs, alpha / 2)) if len(diffs) else float("nan"),
            "ci_high": float(np.quantile(diffs, 1 - alpha / 2)) if len(diffs) else float("nan"),
            "p_le_0": float((diffs <= 0).mean()) if len(diffs) else float("nan")}
