"""Bootstrap statistics over test items: intervals of one model, paired differences of two.

Pure numpy functions of (labels, probabilities). When the items come in groups (patients in
C-NMC, near-duplicate clusters of one smear field in Aria), whole groups are resampled: images
of one patient or one field are not independent, and resampling them one by one makes the
interval too narrow.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MetricFn = Callable[[np.ndarray, np.ndarray], dict]


class Resampler:
    """Seeded bootstrap index draws over items, or over groups of items when ``groups`` is given."""

    def __init__(self, n: int, groups=None, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.n = n
        if groups is None:
            self.members = None
            self.unit = "image"
        else:
            _, inverse = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
            order = np.argsort(inverse, kind="stable")
            bounds = np.flatnonzero(np.diff(inverse[order])) + 1
            self.members = np.split(order, bounds)
            self.unit = "group"

    @property
    def n_units(self) -> int:
        return self.n if self.members is None else len(self.members)

    def draw(self) -> np.ndarray:
        if self.members is None:
            return self.rng.integers(0, self.n, self.n)
        picks = self.rng.integers(0, len(self.members), len(self.members))
        return np.concatenate([self.members[i] for i in picks])


def _interval(values: list[float], alpha: float) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    if not len(arr):
        return float("nan"), float("nan")
    return float(np.quantile(arr, alpha / 2)), float(np.quantile(arr, 1 - alpha / 2))


def bootstrap_ci(y: np.ndarray, probs: np.ndarray, metric_fn: MetricFn, n: int = 1000, seed: int = 0,
                 groups=None, alpha: float = 0.05) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each metric that ``metric_fn(y, probs)`` returns."""
    rs = Resampler(len(y), groups, seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n):
        idx = rs.draw()
        for k, v in metric_fn(y[idx], probs[idx]).items():
            samples.setdefault(k, []).append(v)
    return {k: _interval(v, alpha) for k, v in samples.items()}


def paired_bootstrap(y: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, metric_fn: MetricFn,
                     metrics: tuple[str, ...], n: int = 1000, seed: int = 0, groups=None,
                     alpha: float = 0.05) -> dict[str, dict]:
    """Difference A − B of each named metric over the SAME test items, with a paired percentile
    bootstrap interval (one draw of items, or groups, scores both models). ``excludes_zero`` says
    whether the interval lies entirely on one side of 0."""
    if len(y) != len(probs_a) or len(y) != len(probs_b):
        raise ValueError(f"paired comparison needs the same items: {len(y)} labels, "
                         f"{len(probs_a)} and {len(probs_b)} predictions")
    point_a, point_b = metric_fn(y, probs_a), metric_fn(y, probs_b)
    rs = Resampler(len(y), groups, seed)
    diffs: dict[str, list[float]] = {m: [] for m in metrics}
    for _ in range(n):
        idx = rs.draw()
        a, b = metric_fn(y[idx], probs_a[idx]), metric_fn(y[idx], probs_b[idx])
        for m in metrics:
            diffs[m].append(a[m] - b[m])
    out = {}
    for m in metrics:
        lo, hi = _interval(diffs[m], alpha)
        arr = np.asarray(diffs[m], dtype=float)
        arr = arr[~np.isnan(arr)]
        out[m] = {"diff": float(point_a[m] - point_b[m]), "ci_low": lo, "ci_high": hi,
                  "excludes_zero": bool(lo > 0 or hi < 0), "n_items": int(len(y)), "n_units": rs.n_units,
                  "unit": rs.unit,
                  # share of resamples where A is not better: a one-sided bootstrap p-value for "A beats B"
                  "p_le_0": float((arr <= 0).mean()) if len(arr) else float("nan")}
    return out


def mean_spread(values) -> dict:
    """Mean, sample standard deviation and range of seed repeats."""
    arr = np.asarray([v for v in values if v is not None and v == v], dtype=float)
    if not len(arr):
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max()), "n": int(len(arr))}


def paired_difference(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray,
                      metric: Callable[[np.ndarray, np.ndarray], float], n: int = 1000, seed: int = 0,
                      groups=None, alpha: float = 0.05) -> dict[str, float]:
    """:func:`paired_bootstrap` of one scalar ``metric(y, pred)`` (any prediction format the metric
    takes: labels, probabilities): ``diff``, ``ci_low``, ``ci_high`` and ``p_le_0``."""
    y, pred_a, pred_b = np.asarray(y), np.asarray(pred_a), np.asarray(pred_b)
    if not len(y) == len(pred_a) == len(pred_b):
        raise ValueError(f"y, pred_a and pred_b differ in length ({len(y)}, {len(pred_a)}, {len(pred_b)})")
    r = paired_bootstrap(y, pred_a, pred_b, lambda t, q: {"m": metric(t, q)}, ("m",), n, seed, groups, alpha)["m"]
    return {k: r[k] for k in ("diff", "ci_low", "ci_high", "p_le_0")}


def corrected_t_interval(values, n_train: float, n_test: float, alpha: float = 0.05) -> dict:
    """Mean of ``J`` resampled-train/test results (K-fold x repeats) with the corrected resampled t
    interval of Nadeau & Bengio (2003): the folds' training sets overlap, so the plain variance
    of the J results understates the mean's; it is scaled by ``1/J + n_test/n_train`` instead of
    ``1/J``. For paired differences pass the per-fold differences. ``p`` is the two-sided p-value
    of "mean = 0" under that t statistic with J − 1 degrees of freedom."""
    from scipy import stats as st  # deferred: SciPy (with scikit-learn) only when a CV is summarised

    arr = np.asarray([v for v in values if v is not None and v == v], dtype=float)
    j = len(arr)
    if j < 2 or n_train <= 0:
        return {"mean": float(arr.mean()) if j else float("nan"), "sd": float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan"), "t": float("nan"), "p": float("nan"), "n": j}
    mean, var = float(arr.mean()), float(arr.var(ddof=1))
    se = float(np.sqrt((1.0 / j + n_test / n_train) * var))
    half = float(st.t.ppf(1 - alpha / 2, j - 1)) * se
    if not np.isfinite(se):  # infinite folds (both ways: the mean is NaN too): nothing to conclude
        return {"mean": mean, "sd": float(np.sqrt(var)), "ci_low": float("nan"), "ci_high": float("nan"),
                "t": float("nan"), "p": float("nan"), "n": j}
    t = mean / se if se > 0 else (0.0 if mean == 0 else float("inf") * np.sign(mean))
    p = float(2 * st.t.sf(abs(t), j - 1)) if se > 0 else (1.0 if mean == 0 else 0.0)
    return {"mean": mean, "sd": float(np.sqrt(var)), "ci_low": mean - half, "ci_high": mean + half,
            "t": float(t), "p": p, "n": j}


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control across a table's
    comparisons): sort ascending, multiply the i-th smallest by (m − i), keep them monotone, cap at 1.
    NaN p-values stay NaN and do not count in m."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def joined_units(units_a, units_b) -> np.ndarray:
    """Resampling units for items that two groupings describe (two split protocols of the same
    files): items linked in EITHER grouping end in one unit (connected components), so a paired
    bootstrap never treats as independent two items that one of the protocols keeps together."""
    a, b = np.asarray(units_a, dtype=str), np.asarray(units_b, dtype=str)
    parent = list(range(len(a)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for labels in (a, b):
        first: dict = {}
        for i, u in enumerate(labels):
            if u in first:
                parent[find(i)] = find(first[u])
            else:
                first[u] = i
    return np.asarray([f"u{find(i)}" for i in range(len(a))])
