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
    stratum = labels.groupby(groups).agg(lambda s: s.value_counts().sort_index().idxmax())
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


def patient_overlap(df: pd.DataFrame) -> int:
    """Number of patients that appear in more than one split (0 when no patient IDs)."""
    known = df[df["patient"].astype(str) != ""]
    if known.empty:
        return 0
    per = known.groupby("patient")["split"].nunique()
    return int((per > 1).sum())
