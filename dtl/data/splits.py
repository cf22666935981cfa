"""Seeded, leakage-free splits: pure functions over label (and patient) columns.

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


def stratified_split(labels: pd.Series, val_fraction: float, test_fraction: float,
                     seed: int) -> pd.Series:
    """Image-level stratified train/val/test assignment (per class, seeded)."""
    out = pd.Series("train", index=labels.index, dtype=object)
    rng = np.random.default_rng(seed)
    for label in sorted(labels.unique()):
        idx = labels.index[labels == label].to_numpy()
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        n_val = int(round(val_fraction * len(idx)))
        out[idx[:n_test]] = "test"
        out[idx[n_test:n_test + n_val]] = "val"
    return out


def patient_overlap(df: pd.DataFrame) -> int:
    """Number of patients that appear in more than one split (0 when no patient IDs)."""
    known = df[df["patient"].astype(str) != ""]
    if known.empty:
        return 0
    per = known.groupby("patient")["split"].nunique()
    return int((per > 1).sum())
