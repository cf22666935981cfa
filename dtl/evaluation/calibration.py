"""Are the probabilities honest: reliability diagrams and temperature scaling.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar ``T > 0`` fitted by
minimising the negative log-likelihood on the validation split only; the test split is scored
with the fitted ``T`` and never seen by the fit. Dividing by a positive scalar keeps the order
of the logits, so the predicted class never changes. The ECE is the one of :mod:`dtl.metrics`
(15 equal-width confidence bins), so the numbers match the study runs' ``*_ece``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from dtl.evaluation.metrics import expected_calibration_error

N_BINS = 15
LOG_T_BOUNDS = (-4.0, 4.0)  # T in [0.018, 55]: wide enough for any network we train
SANE_LOG_T = 3.0  # |log T| beyond this (T < 0.05 or > 20) means val cannot pin T down: not stored


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64, numerically stable)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits / T)``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The ``T`` that minimises the NLL of ``y`` (fit on validation logits only). A bounded
    search over log T: deterministic, and convex in practice for this one parameter."""
    if len(y) == 0:
        raise ValueError("cannot fit a temperature on an empty split")
    res = minimize_scalar(lambda lt: nll(logits, y, float(np.exp(lt))), bounds=LOG_T_BOUNDS, method="bounded",
                          options={"xatol": 1e-5})
    return float(np.exp(res.x))


def supported(temperature: float, val_errors: int) -> bool:
    """Whether the validation split pins ``temperature`` down: it made some errors (an error-free
    split drives T towards 0, i.e. one-hot probabilities) and T is not near the search bound."""
    return val_errors > 0 and abs(float(np.log(temperature))) <= SANE_LOG_T


def reliability(y: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Per confidence bin: mean confidence, accuracy and count (bins as in the ECE)."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0, 1, n_bins + 1)
    out = {"edges": edges.tolist(), "confidence": [], "accuracy": [], "count": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        out["count"].append(int(m.sum()))
        out["confidence"].append(float(conf[m].mean()) if m.any() else float("nan"))
        out["accuracy"].append(float(correct[m].mean()) if m.any() else float("nan"))
    out["ece"] = expected_calibration_error(y, probs, n_bins)
    return out


def reliability_figure(curves: dict[str, dict[str, dict]], title: str):
    """One panel per split; in each, accuracy against confidence before and after scaling, the
    diagonal of perfect calibration, and the share of images per bin as grey bars."""
    import matplotlib  # deferred: plotting, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plotting, only when a figure is drawn

    fig, axes = plt.subplots(1, len(curves), figsize=(4.3 * len(curves), 4.3), squeeze=False)
    for ax, (split, by) in zip(axes[0], curves.items()):
        ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
        first = next(iter(by.values()))
        centres = (np.asarray(first["edges"][:-1]) + np.asarray(first["edges"][1:])) / 2
        share = np.asarray(first["count"]) / max(sum(first["count"]), 1)
        ax.bar(centres, share, width=1 / len(centres), color="0.85", edgecolor="0.7", label="share of images")
        for (name, r), style in zip(by.items(), ("o-", "s-")):
            ax.plot(r["confidence"], r["accuracy"], style, ms=4, label=f"{name} (ECE {r['ece']:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (max probability)", ylabel="accuracy",
               title=f"{split} split")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
