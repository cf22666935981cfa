"""Shortcut probe: how well a linear classifier predicts the class from one image region.

On Aria the bottom-right scale-bar stamp alone predicts the class far above the majority
rate; after masking it must fall to the majority rate. The same probe on a central region of
cells, and on the field's median colour, puts the number in context. Cross-validation folds
keep near-duplicate groups together (a field in train and test would flatter the probe).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from dtl.data.baselines import feature_sets, file_sizes, pool, predict_proba, shortcut_baselines
from dtl.data.cache import split_array
from dtl.data.datasets import Dataset
from dtl.model.mask import AnnotationMask
from dtl.model.preprocess import InputSpec

CHUNK = 256  # images per feature batch: memory stays ~100 MB whatever the dataset's size
PROBE_SIZE = 224  # images are probed at Aria's native size (others are resized to it)


def probe_accuracy(features: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0,
                   folds: int = 5) -> float:
    """Mean accuracy of a standardised logistic regression over group-aware stratified folds."""
    if len(np.unique(features, axis=0)) == 1:  # a constant region: the fit would predict the majority
        return float(np.bincount(y).max() / len(y))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=300))
    cv = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    with threadpool_limits(1):  # BLAS threads only contend on matrices this small
        return float(cross_val_score(clf, features, y, groups=groups, cv=cv).mean())


def _images(ds: Dataset, cache_dir, mask: AnnotationMask | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All images at PROBE_SIZE² through the decoded cache (the training path, masked or not),
    label ids and groups."""
    spec = InputSpec(PROBE_SIZE, PROBE_SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), mask=mask)
    splits = sorted(ds.manifest["split"].unique())
    x = np.concatenate([np.asarray(split_array(ds, s, spec, False, cache_dir)) for s in splits])
    y = np.concatenate([ds.label_ids(s) for s in splits])
    g = np.concatenate([ds.split(s)["group"].to_numpy() for s in splits])
    return x, y, g


def _box(ds: Dataset, mask: AnnotationMask) -> tuple[int, int]:
    """The top-left corner of the annotation box at PROBE_SIZE, inside the edge that resizing to
    PROBE_SIZE blends with its neighbours."""
    y0, x0 = mask.box(PROBE_SIZE, PROBE_SIZE)
    scale = PROBE_SIZE / min(int(ds.manifest["width"].min()), int(ds.manifest["height"].min()))
    inset = 0 if scale == 1 else int(np.ceil(2 * scale))
    return y0 + inset, x0 + inset


def shortcut_probe(ds: Dataset, mask: AnnotationMask | None, cache_dir, seed: int = 0) -> dict:
    """Probe accuracies on the annotation box (raw and masked), a central box of the same size,
    and the field's median colour, beside the majority-class rate."""
    mask = mask or AnnotationMask()  # sets without a configured mask are probed at Aria's box
    x, y, groups = _images(ds, cache_dir, None)
    masked = _images(ds, cache_dir, mask)[0]
    y0, x0 = _box(ds, mask)
    h, w = PROBE_SIZE - y0, PROBE_SIZE - x0
    cy, cx = (PROBE_SIZE - h) // 2, (PROBE_SIZE - w) // 2
    colour = np.median(x.reshape(len(x), -1, 3), axis=1).astype(np.float32)
    out = {
        "region": {"rows": [y0, PROBE_SIZE], "cols": [x0, PROBE_SIZE], "image_size": PROBE_SIZE},
        "annotation": probe_accuracy(pool(x[:, y0:, x0:], 2), y, groups, seed),
        "annotation_masked": probe_accuracy(pool(masked[:, y0:, x0:], 2), y, groups, seed),
        "centre": probe_accuracy(pool(x[:, cy:cy + h, cx:cx + w], 2), y, groups, seed),
        "field_colour": probe_accuracy(colour, y, groups, seed),
        "majority": float(np.bincount(y).max() / len(y)),
        "n_images": int(len(y)),
    }
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def split_features(ds: Dataset, split: str, mask: AnnotationMask | None, cache_dir, colour: str = "raw",
                   segment: bool = False) -> dict:
    """The shortcut baselines' features (:func:`dtl.data.baselines.feature_sets`) of one split's
    images, in chunks from the memory-mapped cache: the recipe's ``mask`` and ``colour`` applied to
    the preprocessed images (the box is Aria's where no mask is set); the unmasked images stay raw."""
    box = _box(ds, mask or AnnotationMask())
    specs = [InputSpec(PROBE_SIZE, PROBE_SIZE, (0.0,) * 3, (1.0,) * 3, mask=m, colour=c)
             for m, c in ((None, "raw"), (mask, colour))]
    raw = split_array(ds, split, specs[0], False, cache_dir)
    masked = split_array(ds, split, specs[1], segment, cache_dir)  # the model's input (HSV-segmented if it is)
    table = ds.split(split)
    sizes = np.stack([table["width"].to_numpy(), table["height"].to_numpy(), file_sizes(ds.root, table["path"])], 1)
    parts = [feature_sets(np.asarray(raw[a:a + CHUNK]), np.asarray(masked[a:a + CHUNK]), box, sizes[a:a + CHUNK])
             for a in range(0, len(table), CHUNK)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def audit_baselines(ds: Dataset, mask: AnnotationMask | None, cache_dir, seed: int = 0,
                    colour: str = "raw") -> list[dict]:
    """The shortcut baselines (:mod:`dtl.data.baselines`) of every image of ``ds``, split by split
    (:func:`split_features`), cross-validated under the split's grouping."""
    splits = sorted(ds.manifest["split"].unique())
    parts = [split_features(ds, s, mask, cache_dir, colour) for s in splits]
    features = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    y = np.concatenate([ds.label_ids(s) for s in splits])
    return shortcut_baselines(features, y, pd.concat([ds.split(s) for s in splits]), seed)


ON_THE_INPUT = ("colour", "annotation_masked", "border")  # what the model's own input shows: the results
# table's baselines (the audit also fits the file size and the unmasked box, which a masked model never sees)


@dataclass
class HeldOutBaseline:
    """The strongest shortcut baseline of a dataset, chosen by grouped CV on its train split and
    refitted on all of it: its class probabilities on the other splits, and the train CV it won."""

    name: str
    model: str
    probs: dict  # split -> (n, classes) probabilities
    train_cv: list


def baseline_probs(ds: Dataset, name: str, model: str, mask: AnnotationMask | None, cache_dir, colour: str = "raw",
                   segment: bool = False, splits=("val", "test"), train: dict | None = None) -> dict:
    """Baseline ``name`` fitted with ``model`` on the train split of ``ds`` (the job's split, or one
    ``final.cv`` fold of the data) and its class probabilities on each of ``splits`` that ``ds``
    has; ``train``: the train split's features when already computed."""
    train = train or split_features(ds, "train", mask, cache_dir, colour, segment)
    y = ds.label_ids("train")
    return {s: predict_proba(model, train[name], y, split_features(ds, s, mask, cache_dir, colour, segment)[name],
                             len(ds.classes))
            for s in splits if (ds.manifest["split"] == s).any()}


@dataclass
class ItemFeatures:
    """One baseline's features of every item of a dataset, by path: computed once, then any
    re-split of the same items (a ``final.cv`` fold) takes its rows instead of decoding again."""

    paths: pd.Index
    x: np.ndarray

    @classmethod
    def of(cls, ds: Dataset, name: str, mask: AnnotationMask | None, cache_dir, colour: str = "raw",
           segment: bool = False) -> ItemFeatures:
        splits = sorted(ds.manifest["split"].unique())
        return cls(pd.Index(np.concatenate([ds.split(s)["path"].to_numpy() for s in splits])),
                   np.concatenate([split_features(ds, s, mask, cache_dir, colour, segment)[name] for s in splits]))

    def rows(self, table: pd.DataFrame) -> np.ndarray:
        idx = self.paths.get_indexer(table["path"])
        if (idx < 0).any():
            raise ValueError(f"{int((idx < 0).sum())} items of the re-split are not in the data the features were "
                             f"computed on (e.g. {table['path'].iloc[int(np.argmax(idx < 0))]})")
        return self.x[idx]

    def probs(self, ds: Dataset, model: str, splits=("val", "test")) -> dict:
        """:func:`baseline_probs` on the re-split ``ds`` of the same items, from these features."""
        return {s: predict_proba(model, self.rows(ds.split("train")), ds.label_ids("train"), self.rows(ds.split(s)),
                                 len(ds.classes))
                for s in splits if (ds.manifest["split"] == s).any()}


def held_out_baseline(ds: Dataset, mask: AnnotationMask | None, cache_dir, colour: str = "raw", seed: int = 0,
                      splits=("val", "test"), segment: bool = False) -> HeldOutBaseline:
    """What a model could score on ``splits`` without looking at the cells: every baseline of
    :data:`ON_THE_INPUT` is cross-validated on the train split (its own grouping), the best by
    accuracy (then macro-F1) is refitted on the whole train split and predicts the other splits."""
    train = {k: v for k, v in split_features(ds, "train", mask, cache_dir, colour, segment).items() if k in ON_THE_INPUT}
    y = ds.label_ids("train")
    cv = shortcut_baselines(train, y, ds.split("train"), seed)
    best = max(cv, key=lambda e: (e["accuracy"], e["macro_f1"]))
    probs = baseline_probs(ds, best["name"], best["model"], mask, cache_dir, colour, segment, splits, train)
    return HeldOutBaseline(best["name"], best["model"], probs, cv)
