"""The "Explain and stress" section of the report, built from the explain runs in MLflow:
one row per explained model, paired strategy comparisons on the same test items, one figure."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlflow
import numpy as np
import pandas as pd

from dtl.evaluation.robustness import KINDS, LABELS
from dtl.evaluation.stats import paired_difference
from dtl.explain.job import Summary
from dtl.report.tables import markdown_table, png_bytes
from dtl.tracking import schema
from dtl.tracking.adapter import Tracking, find_runs
from dtl.train.phases import preprocessing_of

CORRUPTED = tuple(f"{k}{s}" for k in KINDS for s in (1, 2, 3))
STAIN = tuple(f"stain{s}" for s in (1, 2, 3))


@dataclass
class Explained(Summary):
    """One explain run as the section reads it back: its summary, run id and per-item predictions."""

    run_id: str = ""
    items: pd.DataFrame = field(default_factory=pd.DataFrame)


def collect(tracking: Tracking, data_digest: str | None = None, studies: set | None = None) -> list[Explained]:
    """The latest finished explain run per (model, split): its summary and per-item predictions;
    with ``studies``, only those of models trained by these study runs (the rows of a table: an
    explained study that a later study of the same kind replaced is not shown beside it)."""
    flt = schema.where({schema.ROLE: schema.Role.EXPLAIN, **({schema.DATA_DIGEST: data_digest} if data_digest else {})},
                       status="FINISHED")
    latest = {}
    for r in find_runs(tracking, flt):  # oldest first: the last one wins
        latest[(r.data.tags.get(schema.MODEL), r.data.tags.get(schema.SPLIT))] = r
    out = []
    for key in sorted(latest, key=str):
        rid = latest[key].info.run_id
        try:
            s = mlflow.artifacts.load_dict(f"runs:/{rid}/explain/summary.json")
            items = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{rid}/explain/predictions.csv"))
        except Exception:  # noqa: BLE001 - an explain run without its files (killed mid-way)
            continue
        e = Explained(**vars(Summary.from_dict(s)), run_id=rid, items=items)
        if studies is not None and e.model_run not in studies:
            continue
        if not e.preprocessing:  # a summary from before the field: the label of its study run
            e.preprocessing = _study_preprocessing(tracking, e.model_run)
        out.append(e)
    return out


def _study_preprocessing(tracking: Tracking, run_id: str) -> str:
    try:
        r = tracking.client.get_run(run_id)
    except Exception:  # noqa: BLE001 - a study run deleted since: its label is unknown, not default
        return "unknown"
    return preprocessing_of(r.data.tags, r.data.params)


def _cell(r: dict | None, m: str) -> str:
    if not r or m not in r:
        return "n/a"
    return f"{r[m]:+.4f} [{r[f'{m}_ci_low']:+.4f}, {r[f'{m}_ci_high']:+.4f}]"


def table(rows: list[Explained]) -> pd.DataFrame:
    """One row per explained model: clean accuracy, cross-variant and occlusion changes with CIs,
    mean relative accuracy under corruption, CAM annotation share, ECE before/after, T."""
    out = []
    for s in rows:
        by = {r["kind"]: r for r in s.rows if r.get("severity", 0) == 0 and "accuracy" in r}
        mr, c, sp = s.mean_relative, s.calibration, s.split
        worst = min((k for k in mr if k != "mean"), key=mr.get) if mr else ""
        out.append({"model": s.label, "version": s.version or "(study run)", "backbone": s.backbone, "strategy": s.strategy,
                    "preprocessing": s.preprocessing, "masked": s.masked,
                    "split": sp, "n": s.n, "clean accuracy": f"{by['clean']['accuracy']:.4f}",
                    "cross-variant Δacc [95% CI]": _cell(by.get("cross-variant"), "d_accuracy"),
                    "corruptions: mean relative acc": f"{mr.get('mean', float('nan')):.3f}",
                    "worst corruption": f"{LABELS.get(worst, worst)} ({mr[worst]:.3f})" if worst else "",
                    "masked − unmasked annotation Δacc [95% CI]": _cell(by.get("occlusion"), "d_accuracy"),
                    "CAM on annotation (share, × area)": f"{s.shortcut_all['annotation']:.1%}, "
                                                         f"{s.shortcut_all['annotation_ratio']:.2f}×"
                                                         + (" FLAGGED" if s.flagged else ""),
                    "CAM share on cells": f"{s.shortcut_all['foreground']:.1%}",
                    f"ECE {sp} before → after": f"{c[f'{sp}_ece_before']:.4f} → {c[f'{sp}_ece_after']:.4f}",
                    "T": f"{c['temperature']:.3f}", "T stored": s.temperature_stored})
    return pd.DataFrame(out)


def _item_scores(items: pd.DataFrame, classes_index: dict) -> pd.DataFrame:
    """Per test item: correctness on the clean image, averaged over the corrupted sets it was scored
    on, averaged over the stain-shift sets, and cross-variant correctness (NaN where not scored)."""
    y = items["label"].map(classes_index).to_numpy()

    def mean_correct(cols):
        if not cols:
            return np.full(len(items), np.nan)
        scored = items[cols].to_numpy() >= 0
        hits = np.where(scored, items[cols].to_numpy() == y[:, None], 0).sum(1)
        n = scored.sum(1)
        return np.where(n > 0, hits / np.maximum(n, 1), np.nan)  # NaN: not in the corruption subsample

    out = pd.DataFrame({"path": items["path"], "unit": items["bootstrap_unit"].astype(str),
                        "clean": (items["clean"].to_numpy() == y).astype(float) if "clean" in items else np.nan,
                        "corrupted": mean_correct([c for c in CORRUPTED if c in items]),
                        "stain": mean_correct([c for c in STAIN if c in items])})
    if "cross_variant" in items:
        out["cross_variant"] = np.where(items["cross_variant"] >= 0, items["cross_variant"] == y, np.nan)
    return out


def _classes(s: Explained) -> dict:
    """Class name -> index as the row's model predicts them (its own class list, in its order)."""
    names = s.classes or sorted(s.items["label"].unique())  # older summaries: the sorted labels
    return {c: i for i, c in enumerate(names)}


METRICS = {"corrupted": "accuracy over all 15 corrupted sets", "cross_variant": "cross-variant accuracy",
           "stain_relative": "stain-shift relative accuracy (stain / clean, 3 severities)"}


def _comparison(a: Explained, b: Explained) -> str | None:
    """What ``a − b`` compares, when the two differ in one respect the section reports: double
    transfer against another strategy (same preprocessing), or a colour / stain setting against
    the default preprocessing (same strategy); ``None`` otherwise. Both on the same backbone,
    phase, data, masking and split."""
    if not all(getattr(a, k) == getattr(b, k) for k in ("backbone", "phase", "data", "masked", "split")):
        return None
    if a.preprocessing == b.preprocessing and a.strategy == "double" and b.strategy != "double":
        return f"double − {b.strategy} ({a.preprocessing}, mask {a.masked})"
    if a.strategy == b.strategy and b.preprocessing == "default" and a.preprocessing not in ("default", "unknown"):
        return f"{a.preprocessing} − default ({a.strategy}, mask {a.masked})"
    return None


def _stat(metric: str):
    """The statistic of one side's per-item scores (columns: score, and clean correctness)."""
    if metric == "stain_relative":
        return lambda t, q: float(q[:, 0].mean() / q[:, 1].mean()) if q[:, 1].mean() > 0 else float("nan")
    return lambda t, q: float(q[:, 0].mean())


def strategy_gains(rows: list[Explained], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Each pair of explained models that differ in one respect (:func:`_comparison`), on the same
    items: mean accuracy over all corrupted sets, cross-variant accuracy, and stain-shift relative
    accuracy, with paired bootstrap CIs over the items' bootstrap units (one draw scores both)."""
    out = []
    for a in rows:
        for b in rows:
            what = _comparison(a, b)
            if what is None:
                continue
            m = _item_scores(a.items, _classes(a)).merge(_item_scores(b.items, _classes(b)), on="path",
                                                            suffixes=("_a", "_b"))
            for metric, label in METRICS.items():
                col = "stain" if metric == "stain_relative" else metric
                if f"{col}_a" not in m:
                    continue
                ok = m[[f"{col}_a", f"{col}_b", "clean_a", "clean_b"]].notna().all(axis=1)
                if not ok.any():
                    continue
                pa, pb = (m.loc[ok, [f"{col}_{x}", f"clean_{x}"]].to_numpy(float) for x in ("a", "b"))
                d = paired_difference(np.zeros(int(ok.sum())), pa, pb, _stat(metric), n_boot, seed,
                                      m.loc[ok, "unit_a"].to_numpy())
                out.append({"backbone": a.backbone, "comparison": what, "metric": label,
                            "gain": d["diff"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
                            "ci_excludes_0": "yes" if d["ci_low"] > 0 or d["ci_high"] < 0 else "no",
                            "items": int(ok.sum())})
    return pd.DataFrame(out, columns=["backbone", "comparison", "metric", "gain", "ci_low", "ci_high",
                                      "ci_excludes_0", "items"])


def figure(rows: list[Explained]):
    """Accuracy per corruption (mean over its 3 severities) and clean, one group of bars per model."""
    import matplotlib  # deferred: plotting, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plotting, only when a figure is drawn

    sets = ["clean", *KINDS]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(sets) * max(1, len(rows)) / 2.5), 4.2))
    width = 0.8 / max(len(rows), 1)
    for j, s in enumerate(rows):
        acc = {k: np.mean([r["accuracy"] for r in s.rows if r.get("kind") == k and "accuracy" in r] or [np.nan])
               for k in sets}
        ax.bar(np.arange(len(sets)) + (j - (len(rows) - 1) / 2) * width, [acc[k] for k in sets], width,
               label=f"{s.backbone} ({s.strategy}, mask {s.masked}"
               + (f", {s.preprocessing})" if s.preprocessing != "default" else ")"))
    ax.set_xticks(range(len(sets)), ["clean", *(LABELS[k] for k in KINDS)], rotation=15, ha="right", fontsize=8)
    ax.set(ylim=(0, 1), ylabel="test accuracy (mean over 3 severities)", title="Accuracy under corruption per model")
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    return fig


def section(tracking: Tracking, data_digest: str | None = None, n_boot: int = 1000,
            studies: set | None = None) -> tuple[list[str], dict]:
    """Markdown lines and PNG figures of the explain section (of the models of ``studies``, see
    :func:`collect`); empty without explain runs."""
    rows = collect(tracking, data_digest, studies)
    if not rows:
        return [], {}
    gains = strategy_gains(rows, n_boot)
    best = max(rows, key=lambda s: s.mean_relative.get("mean", -1))
    flagged = [s.label for s in rows if s.flagged]
    lines = ["## Explain and stress", "",
             "From `dtl explain` runs (per model: `explain/<model>/robustness.md` beside this report). Δ = set − "
             "reference on the same items with 95% paired bootstrap CIs; relative accuracy = corrupted / clean on the "
             "same items (ImageNet-C style); ECE with 15 bins, T fitted on val only.", "",
             f"Most robust to corruption by mean relative accuracy: {best.label} ({best.backbone}, "
             f"{best.strategy}: {best.mean_relative.get('mean', float('nan')):.3f}). "
             + (f"Flagged for CAM mass on the annotation box: {', '.join(flagged)}." if flagged else
                "No model puts more CAM mass on the annotation box than the threshold."), "",
             markdown_table(table(rows)), "Double transfer against the other strategies, and each colour / stain setting against the default "
             "preprocessing, on the same items:", "",
             markdown_table(gains) if not gains.empty else "_(no pair of explained models differs in strategy or stain setting alone)_\n",
             "![explain_robustness.png](explain_robustness.png)", ""]
    return lines, {"explain_robustness.png": png_bytes(figure(rows))}
