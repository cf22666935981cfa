"""Seeded, leakage-free splits: pure functions over label and patient (or group) columns.

The same seed and the same data give the same split on any machine: every random choice is
drawn from ``numpy.random.default_rng(seed)`` over items sorted by name.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def patient_split(df: pd.DataFrame, fraction: float, seed: int, name: str = "val",
                  rest: str = "train") -> pd.Series:
    """Assign whole patients to ``name`` so that about ``fraction`` of each class's images are
    there (patients visited in a seeded order, each taken when it brings the share closer to
    the target); the others go to ``rest``. Patients are class-pure in C-NMC (``H`` = normal
    subject), so stratifying by class keeps the class ratio and never splits a patient."""
    out = pd.Series(rest, index=df.index, dtype=object)
    if fraction <= 0:
        return out
    rng = np.random.default_rng(seed)
    for label in sorted(df["label"].unique()):
        sub = df[df["label"] == label]
        counts = sub.groupby("patient").size().sort_index()
        order = rng.permutation(len(counts))
        target = fraction * len(sub)
        taken, chosen = 0, []
        for i in order:  # take a patient whenever it brings the class's share closer to the target
            if len(chosen) == len(counts) - 1:
                break
            c = int(counts.iloc[i])
            if abs(taken + c - target) < abs(taken - target) or not chosen:
                chosen.append(counts.index[i])
                taken += c
        out[sub.index[sub["patient"].isin(chosen)]] = name
    return out


def group_split(labels: pd.Series, groups: pd.Series, val_fraction: float, test_fraction: float,
                seed: int) -> pd.Series:
    """Class-stratified train/val/test assignment of whole groups (seeded): a group never spans
    two splits. A group counts under its most frequent label (near-duplicate clusters and
    acquisition blocks are single-class; the rule only matters for odd mixed groups)."""
    # one count table instead of a value_counts per group (0.3 s -> 0.02 s for 900 groups); a tie
    # goes to the first label in sorted order (crosstab sorts its columns, idxmax takes the first)
    counts = pd.crosstab(groups, labels)
    stratum = counts.idxmax(axis=1) if counts.size else pd.Series(dtype=object)  # pandas 2.2 refuses idxmax of 0×0
    sizes = groups.value_counts()
    rng = np.random.default_rng(seed)
    where: dict = {}
    for label in sorted(stratum.unique()):
        names = sorted(stratum.index[stratum == label])
        order = [names[i] for i in rng.permutation(len(names))]
        total = int(sizes[names].sum())
        for name, fraction in (("test", test_fraction), ("val", val_fraction)):
            rest = [g for g in order if g not in where]
            for g in _take(rest, sizes, fraction * total):
                where[g] = name
    return groups.map(lambda g: where.get(g, "train")).astype(object)


def _take(order: list, sizes: pd.Series, target: float) -> list:
    """Groups, visited in ``order``, taken whenever they bring the taken size closer to
    ``target``; the last group is always left over (for training)."""
    taken, chosen = 0, []
    if target <= 0:
        return chosen
    for g in order[:-1]:
        c = int(sizes[g])
        if abs(taken + c - target) < abs(taken - target):
            chosen.append(g)
            taken += c
    return chosen


def resampling_units(table: pd.DataFrame) -> tuple[str, np.ndarray | None]:
    """What items are grouped by, for bootstraps and cross-validation folds: patients where every
    row has one (C-NMC), else near-duplicate groups / acquisition blocks where the manifest has
    them, else images (``None``)."""
    patients = table["patient"].astype(str)
    if len(table) and (patients != "").all():
        return "patient", patients.to_numpy()
    if "group" in table and len(table) and (table["group"].astype(str) != "").all():
        return "group", table["group"].astype(str).to_numpy()
    return "image", None


def cv_folds(labels, units, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of each item: stratified group K-fold (scikit-learn's
    ``StratifiedGroupKFold``, shuffled with ``seed``), so a unit (patient, near-duplicate group,
    acquisition block) never spans two folds and each fold keeps about the class ratio. The same
    labels, units and seed give the same folds for every model of a job."""
    from sklearn.model_selection import StratifiedGroupKFold  # deferred: scikit-learn, only when folds are made

    labels = np.asarray(labels, dtype=str)
    units = np.asarray(units if units is not None else np.arange(len(labels)), dtype=str)
    n_units = len(np.unique(units))
    if k < 2 or k > n_units:
        raise ValueError(f"cross-validation needs 2 <= k <= the number of units ({n_units}), got k={k}")
    order = np.lexsort((units,))  # the fold draw depends on the items, not on the manifest's row order
    fold = np.empty(len(labels), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels[order], units[order])):
        fold[order[test]] = f
    return fold


def fold_split(labels, units, k: int, fold: int, seed: int) -> np.ndarray:
    """The train/val/test assignment of fold ``fold`` of :func:`cv_folds`: that fold is test, the
    next one (cyclically) is val (checkpoint selection), the other k − 2 train."""
    ids = cv_folds(labels, units, k, seed)
    return np.where(ids == fold, "test", np.where(ids == (fold + 1) % k, "val", "train")).astype(object)


def patient_overlap(df: pd.DataFrame) -> int:
    """Number of patients that appear in more than one split (0 when no patient IDs)."""
    known = df[df["patient"].astype(str) != ""]
    if known.empty:
        return 0
    per = known.groupby("patient")["split"].nunique()
    return int((per > 1).sum())
