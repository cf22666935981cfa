"""Classification metrics with seeded bootstrap confidence intervals, calibration and
confusion-matrix figures. Pure functions of (labels, probabilities)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from dtl.evaluation.stats import bootstrap_ci

LOWER_IS_BETTER = ("loss", "ece")


def direction(metric: str) -> str:
    """``minimize`` for losses and calibration error (``val_loss``, ``test_ece``, ``test_ece_after``,
    their CI bounds: a ``_``-separated part of the name says so), else ``maximize``."""
    return "minimize" if set(metric.split("_")) & set(LOWER_IS_BETTER) else "maximize"


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def _binary_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties (equals sklearn's roc_auc_score)."""
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata  # deferred: SciPy, only for this statistic

    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _confusion_counts(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def accuracy_macro_f1(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 only: cheap enough for thousands of bootstrap draws per table row."""
    k = probs.shape[1]
    cm = _confusion_counts(y, probs.argmax(1), k).astype(float)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1)
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)
    return {"accuracy": float(tp.sum() / max(len(y), 1)), "macro_f1": float(f1.mean())}


def point_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Scalar metrics of one sample (no CIs); numpy only, so the bootstrap stays fast."""
    k = probs.shape[1]
    pred = probs.argmax(1)
    cm = _confusion_counts(y, pred, k).astype(float)
    support, predicted, tp = cm.sum(1), cm.sum(0), np.diag(cm)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    if k == 2:
        auc = _binary_auc(y == 1, probs[:, 1])
    else:  # one-vs-rest, macro over the classes present in this sample
        aucs = [_binary_auc(y == c, probs[:, c]) for c in range(k) if present[c]]
        auc = float(np.nanmean(aucs)) if len(aucs) > 1 else float("nan")
    return {
        "accuracy": float(tp.sum() / max(len(y), 1)),
        "balanced_accuracy": float(recall[present].mean()) if present.sum() > 1 else float("nan"),
        "macro_f1": float(f1.mean()),
        "weighted_f1": float((f1 * support).sum() / max(support.sum(), 1)),
        "roc_auc": auc,
        "ece": expected_calibration_error(y, probs),
    }


def evaluate_predictions(y: np.ndarray, probs: np.ndarray, classes: list[str], split: str,
                         n_boot: int = 1000, seed: int = 0, groups=None) -> dict[str, float]:
    """``{split}_{metric}`` with ``_ci_low``/``_ci_high``, plus per-class precision/recall/F1.
    With ``groups`` (patients, or near-duplicate clusters) the bootstrap resamples whole groups."""
    out: dict[str, float] = {}
    point = point_metrics(y, probs)
    cis = bootstrap_ci(y, probs, point_metrics, n_boot, seed, groups) if n_boot > 0 else {}
    for k, v in point.items():
        out[f"{split}_{k}"] = v
        if k in cis:
            out[f"{split}_{k}_ci_low"], out[f"{split}_{k}_ci_high"] = cis[k]
    p, r, f, _ = skm.precision_recall_fscore_support(y, probs.argmax(1), labels=list(range(len(classes))),
                                                     zero_division=0)
    for i, c in enumerate(classes):
        out[f"{split}_precision_{c}"], out[f"{split}_recall_{c}"], out[f"{split}_f1_{c}"] = float(p[i]), float(r[i]), float(f[i])
    return out


def confusion(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    cm = skm.confusion_matrix(y, pred, labels=list(range(len(classes))))
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    return {"classes": list(classes), "counts": cm.tolist(), "normalized": np.round(norm, 4).tolist()}


def confusion_figure(cm: dict, title: str, ax=None):
    """Counts with row-normalised shading; returns the matplotlib figure."""
    import matplotlib  # deferred: plotting, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plotting, only when a figure is drawn

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cm["classes"]), 1.0 + 0.9 * len(cm["classes"])))
    norm = np.asarray(cm["normalized"])
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    n = len(cm["classes"])
    ax.set_xticks(range(n), cm["classes"], rotation=45, ha="right")
    ax.set_yticks(range(n), cm["classes"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{cm['counts'][i][j]}\n{norm[i, j]:.0%}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.6 else "black")
    if fig is not None:
        fig.tight_layout()
    return fig or ax.figure


@dataclass
class Evaluation:
    """A final evaluation of one checkpoint, per split: metrics (``<split>_<metric>`` with CI keys),
    confusion matrices, predictions tables (one row per item) and the bootstrap unit of the CIs."""

    metrics: dict[str, float] = field(default_factory=dict)
    confusion: dict[str, dict] = field(default_factory=dict)
    predictions: dict[str, pd.DataFrame] = field(default_factory=dict)
    ci_unit: dict[str, str] = field(default_factory=dict)

    HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc", "ece")

    def text(self) -> str:
        """The headline metrics of every split, one line each, with their 95% CIs."""
        lines = []
        for k in (k for k in self.metrics if k.split("_", 1)[1] in self.HEADLINE):
            lo, hi = self.metrics.get(f"{k}_ci_low"), self.metrics.get(f"{k}_ci_high")
            lines.append(f"{k:28s} {self.metrics[k]:.4f}" + (f"  (95% CI {lo:.4f}–{hi:.4f})" if lo is not None else ""))
        return "\n".join(lines)
