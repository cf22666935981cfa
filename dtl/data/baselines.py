"""Shortcut baselines: how well cheap, non-morphological features predict the class.

A CNN that matches a classifier on global colour statistics may have learned the colour of an
acquisition session, not the cells. So ``dtl data audit`` fits, under the split's own grouping
(patients, near-duplicate groups or images, :func:`dtl.data.splits.resampling_units`), each
baseline with a standardised logistic regression and with gradient boosting, and reports
accuracy and macro-F1 of the out-of-fold predictions beside the majority rate:

* ``colour``: 17 global statistics of the preprocessed image, annotation mask and the recipe's
  ``data.colour`` (:func:`dtl.data.colour.apply`) applied and the masked box left out: per RGB channel the mean, standard deviation and 95th percentile, and an
  8-bin hue histogram;
* ``size``: the image's width, height and file size;
* ``annotation``: the pooled pixels of the annotation box (raw, as a model would see them with
  the mask off and colours raw), and ``annotation_masked`` (as the recipe's preprocessing leaves it);
* ``border``: the pooled 8-pixel frame of the preprocessed image.
"""

from __future__ import annotations

import os

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from dtl.data.splits import resampling_units

HUE_BINS = 8
BORDER = 8  # pixels of the frame, at the probe size
MODELS = ("linear", "boosting")


def colour_features(images: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """(n, 17) colour statistics of uint8 RGB images (n, h, w, 3) over the pixels where ``keep``
    (h, w) is True (all by default): mean, std and 95th percentile per channel, then the share of
    the pixels in each of 8 hue bins (HSV hue; grey pixels, saturation < 0.05, count in none)."""
    x = images.reshape(len(images), -1, 3).astype(np.float32) / 255.0
    if keep is not None:
        x = x[:, keep.ravel()]
    n, p = x.shape[:2]
    stats = np.concatenate([x.mean(1), x.std(1), np.percentile(x, 95, axis=1)], axis=1)
    # one contiguous plane per channel, a max/min of three planes and one histogram count instead of
    # reductions over the 3-long axis and a pass per bin: half the time, the same numbers to the bit
    r, g, b = (np.ascontiguousarray(x[..., c]) for c in range(3))
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    chroma = mx - mn
    coloured = np.where(mx > 0, chroma / np.maximum(mx, 1e-6), 0.0) >= 0.05
    safe = np.maximum(chroma, 1e-6)
    red = (g - b) / safe  # in [-1, 1] where red is the largest: mod 6 adds 6 to the negative ones
    hue = np.where(mx == r, np.where(red < 0, red + 6, red),
                   np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6.0
    bins = np.minimum((hue * HUE_BINS).astype(np.intp), HUE_BINS - 1) + HUE_BINS * np.arange(n)[:, None]
    hist = np.bincount(bins[coloured], minlength=n * HUE_BINS).reshape(n, HUE_BINS) / p
    return np.concatenate([stats, hist], axis=1).astype(np.float32)


def _classifier(model: str):
    if model == "linear":
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    return HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, random_state=0)


def fit_baseline(name: str, features: np.ndarray, y: np.ndarray, units, grouping: str, seed: int = 0,
                 folds: int = 5) -> list[dict]:
    """Out-of-fold accuracy and macro-F1 of each model on ``features``, folds keeping ``units``
    (patients, groups; None = images) together. One entry per model."""
    majority = float(np.bincount(y).max() / len(y))
    groups = units if units is not None else np.arange(len(y))
    # every training fold must hold every class: at most as many folds as the class with the fewest groups has groups
    per_class = [len(np.unique(np.asarray(groups)[y == c])) for c in np.unique(y)]
    k = min(folds, min(per_class))
    out = []
    for model in MODELS:
        if k < 2 or len(np.unique(features, axis=0)) == 1:  # nothing to learn from: the majority class
            pred = np.full(len(y), np.bincount(y).argmax())
        else:
            cv = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
            with threadpool_limits(1):  # BLAS threads only contend on matrices this small
                pred = cross_val_predict(_classifier(model), features, y, groups=groups, cv=cv)
        out.append({"name": name, "model": model, "accuracy": round(float(accuracy_score(y, pred)), 4),
                    "macro_f1": round(float(f1_score(y, pred, average="macro")), 4),
                    "majority": round(majority, 4), "grouping": grouping, "folds": int(k)})
    return out


def predict_proba(model: str, x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, n_classes: int) -> np.ndarray:
    """``model`` fitted on (``x_train``, ``y_train``): its (n, n_classes) probabilities on ``x``
    (a class absent from train gets 0; constant features predict the train class shares)."""
    out = np.zeros((len(x), n_classes))
    if len(np.unique(x_train, axis=0)) == 1 or len(np.unique(y_train)) == 1:
        out[:] = np.bincount(y_train, minlength=n_classes) / len(y_train)
        return out
    with threadpool_limits(1):  # BLAS threads only contend on matrices this small
        clf = _classifier(model).fit(x_train, y_train)
        out[:, clf.classes_] = clf.predict_proba(x)
    return out


def pool(region: np.ndarray, k: int = 4) -> np.ndarray:
    """k×k average pooling, flattened: the stamp's colours and layout, few enough features for boosting."""
    n, h, w, c = region.shape
    r = region[:, :h // k * k, :w // k * k].astype(np.float32) / 255.0
    return r.reshape(n, h // k, k, w // k, k, c).mean((2, 4)).reshape(n, -1)


def _frame_means(images: np.ndarray, segments: int = 4) -> np.ndarray:
    """Mean colour of the BORDER-pixel frame in ``segments`` pieces per side: (n, 4 * segments * 3)."""
    h, w = images.shape[1:3]
    sides = [images[:, :BORDER], images[:, h - BORDER:], images[:, :, :BORDER].transpose(0, 2, 1, 3),
             images[:, :, w - BORDER:].transpose(0, 2, 1, 3)]  # each (n, BORDER, length, 3)
    out = [piece.astype(np.float32).mean((1, 2)) / 255.0 for s in sides for piece in np.array_split(s, segments, 2)]
    return np.concatenate(out, axis=1)


def feature_sets(raw: np.ndarray, masked: np.ndarray, box: tuple[int, int], sizes: np.ndarray) -> dict:
    """The baselines' features from the images unmasked (``raw``) and as preprocessed
    (``masked``), the annotation box's top-left corner ``box`` (row, col; inside the edge that
    resizing blends with its neighbours) and ``sizes`` (n, 3)."""
    h, w = masked.shape[1:3]
    y0, x0 = box
    keep = np.ones((h, w), bool)
    keep[y0:, x0:] = False
    return {"colour": colour_features(masked, keep), "size": sizes.astype(np.float32),
            "annotation": pool(raw[:, y0:, x0:]), "annotation_masked": pool(masked[:, y0:, x0:]),
            "border": _frame_means(masked)}


def shortcut_baselines(features: dict, y: np.ndarray, table, seed: int = 0) -> list[dict]:
    """Every baseline in ``features`` with every model, under the grouping of the manifest rows
    ``table`` (the same rows, in order)."""
    grouping, units = resampling_units(table)
    return [e for name, f in features.items() for e in fit_baseline(name, f, y, units, grouping, seed)]


def file_sizes(root, paths) -> np.ndarray:
    return np.asarray([os.path.getsize(os.path.join(root, p)) for p in paths], dtype=np.int64)
