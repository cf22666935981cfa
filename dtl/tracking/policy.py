"""The promotion policy (``registry/policy.yaml``): which metric decides the champion, in which
direction, from what value on, and the tie-breaks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from dtl import DTLError
from dtl.evaluation.metrics import direction


@dataclass(frozen=True)
class Policy:
    registered_model: str = "all-dtl"
    metric: str = "val_macro_f1"
    direction: str = "maximize"  # maximize | minimize; must agree with the metric (losses, ECE: minimize)
    min_value: float | None = None
    tie_breaks: tuple[str, ...] = ("val_balanced_accuracy", "val_accuracy")


def load_policy(path: str | Path, registered_model: str = "") -> Policy:
    p = Path(path)
    raw = {}
    if p.exists():
        raw = yaml.safe_load(p.read_text()) or {}
    elif str(path) != "registry/policy.yaml":
        raise DTLError(f"promotion policy {p} does not exist")
    known = set(Policy.__dataclass_fields__)
    bad = sorted(set(raw) - known)
    if bad:
        raise DTLError(f"{p}: unknown policy key(s) {bad}; valid: {sorted(known)}")
    metric = str(raw.get("metric", Policy.metric))
    if not metric.startswith("val_"):
        raise DTLError(f"{p}: metric={metric!r} is not a validation metric. Promotion selects on validation "
                       "(val_macro_f1, val_balanced_accuracy, val_loss, ...); selecting on test would make the "
                       "test figures of the champion optimistic.")
    raw.setdefault("direction", direction(metric))
    if raw["direction"] not in ("maximize", "minimize"):
        raise DTLError(f"{p}: direction must be maximize or minimize")
    if raw["direction"] != direction(metric):
        raise DTLError(f"{p}: direction={raw['direction']} contradicts metric {metric} "
                       f"({'lower' if direction(metric) == 'minimize' else 'higher'} is better); "
                       f"use direction: {direction(metric)} or leave it out")
    if "tie_breaks" in raw:
        raw["tie_breaks"] = tuple(raw["tie_breaks"] or ())
        bad = [t for t in raw["tie_breaks"] if not str(t).startswith("val_")]
        if bad:
            raise DTLError(f"{p}: tie_breaks {bad} are not validation metrics")
    pol = Policy(**raw)
    if registered_model:
        pol = Policy(registered_model, pol.metric, pol.direction, pol.min_value, pol.tie_breaks)
    return pol
