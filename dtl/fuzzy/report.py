"""The "fuzzy vs softmax" section of the report, built from the fuzzy study runs in MLflow."""

from __future__ import annotations

import mlflow
import pandas as pd

from dtl.evaluation import robustness
from dtl.report.tables import markdown_table, png_bytes
from dtl.tracking import schema
from dtl.tracking.adapter import Tracking, find_runs

CORRUPTIONS = (("blur", 1), ("blur", 2), ("jpeg", 1), ("jpeg", 2))  # of dtl.evaluation.robustness: kind, severity
SET_NAMES = {"test": "test (in-distribution)", "segmented": "cross-variant (Segmented)",
             "original": "cross-variant (Original)",
             **{f"{k}_{s}": robustness.describe(k, s) for k, s in CORRUPTIONS},
             # fuzzy studies scored before 2026-12-02 used their own table, on the resized images
             "blur1": "Gaussian blur r=1 (resized image)", "blur2": "Gaussian blur r=2 (resized image)",
             "jpeg1": "JPEG q=30", "jpeg2": "JPEG q=10"}


def result_text(r) -> str:
    """What ``dtl fuzzy`` prints for one source model (a :class:`dtl.fuzzy.job.FuzzyResult`): the
    study, then fuzzy vs softmax per test set."""
    lines = [f"fuzzy {r.backbone}: study {r.study} run {r.run_id} best val macro-F1 "
             f"{r.best_value:.4f} {r.best_params} ({r.counts}) -> {r.registered}"]
    for s, v in (r.results or {}).items():
        d = v["diff"]["macro_f1"]
        lines.append(f"  {s:10s} n={v['n']:4d} acc {v['fuzzy']['accuracy']:.4f} vs softmax {v['softmax']['accuracy']:.4f}; "
                     f"macro-F1 {v['fuzzy']['macro_f1']:.4f} vs {v['softmax']['macro_f1']:.4f} "
                     f"(diff {d['diff']:+.4f}, 95% CI {d['ci_low']:+.4f}..{d['ci_high']:+.4f}: {verdict(d)}); "
                     f"error AUROC firing {v['fuzzy']['abstain_auroc']:.3f} vs maxprob {v['softmax']['abstain_auroc']:.3f}")
    return "\n".join(lines)


def verdict(d: dict) -> str:
    """Plain words for a paired difference (fuzzy − softmax) and its 95% CI: a claim only when the CI excludes 0."""
    if d["ci_low"] > 0:
        return "fuzzy better (CI excludes 0)"
    if d["ci_high"] < 0:
        return "fuzzy worse (CI excludes 0)"
    return "no significant difference (CI includes 0)"


def risk_coverage_figure(results: dict, title: str, axes=None):
    """Risk-coverage curves, fuzzy firing strength vs softmax max-probability, one panel per set."""
    import matplotlib  # deferred: plotting, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plotting, only when a figure is drawn

    sets = list(results)
    if axes is None:
        _, axes = plt.subplots(1, len(sets), figsize=(2.8 * len(sets), 2.8), squeeze=False)
        axes = axes[0]
    for ax, s in zip(axes, sets):
        for head, label in (("fuzzy", "fuzzy: firing strength"), ("softmax", "softmax: max prob")):
            cov, risk = results[s][head]["curve"]
            ax.plot(cov, risk, label=label)
        ax.set_title(f"{title}: {SET_NAMES.get(s, s)}", fontsize=8)
        ax.set_xlabel("coverage")
        ax.set_ylabel("selective risk (error)")
    axes[0].legend(fontsize=7)
    fig = axes[0].figure
    fig.tight_layout()
    return fig


def collect(tracking: Tracking, data_digest: str | None = None) -> list[dict]:
    """The latest finished fuzzy study per (backbone, strategy, data) with its comparison."""
    flt = schema.where({schema.ROLE: schema.Role.FUZZY_STUDY, **({schema.DATA_DIGEST: data_digest} if data_digest else {})},
                       status="FINISHED")
    latest: dict = {}
    for r in find_runs(tracking, flt):
        if schema.REGISTERED in r.data.tags:
            latest[tuple(r.data.tags.get(k) for k in (schema.BACKBONE, schema.STRATEGY, schema.DATA_DIGEST))] = r
    out = []
    for key in sorted(latest, key=str):
        r = latest[key]
        comp = mlflow.artifacts.load_dict(f"runs:/{r.info.run_id}/fuzzy/comparison.json")
        out.append({"run": r.info.run_id, "strategy": key[1], "registered": r.data.tags[schema.REGISTERED], **comp})
    return out


def table(rows: list[dict]) -> list[dict]:
    """One row per (model, evaluation set): both heads' metrics and the paired differences."""
    out = []
    for r in rows:
        for s, v in r["sets"].items():
            f, m = v["fuzzy"], v["softmax"]
            da, df1 = v["diff"]["accuracy"], v["diff"]["macro_f1"]
            out.append({
                "backbone": r["backbone"], "set": SET_NAMES.get(s, s), "n": v["n"],
                "acc fuzzy / softmax": f"{f['accuracy']:.4f} / {m['accuracy']:.4f}",
                "Δacc [95% CI]": f"{da['diff']:+.4f} [{da['ci_low']:+.4f}, {da['ci_high']:+.4f}]",
                "macro-F1 fuzzy / softmax": f"{f['macro_f1']:.4f} / {m['macro_f1']:.4f}",
                "ΔF1 [95% CI]": f"{df1['diff']:+.4f} [{df1['ci_low']:+.4f}, {df1['ci_high']:+.4f}]",
                "ECE fuzzy / softmax": f"{f['ece']:.3f} / {m['ece']:.3f}",
                "error AUROC firing / maxprob": f"{f['abstain_auroc']:.3f} / {m['abstain_auroc']:.3f}",
                "acc at 80% coverage fuzzy / softmax": f"{f['selective_accuracy_80']:.4f} / {m['selective_accuracy_80']:.4f}",
                "verdict (F1)": verdict(df1),
            })
    return out


def section(tracking: Tracking, data_digest: str | None = None) -> tuple[list[str], dict]:
    """Markdown lines and PNG figures of the fuzzy-vs-softmax section; empty without fuzzy runs."""
    import matplotlib.pyplot as plt  # deferred: plotting, only when a figure is drawn

    rows = collect(tracking, data_digest)
    if not rows:
        return [], {}
    tab = table(rows)
    df = pd.DataFrame(tab)
    wins = [t for t in tab if t["verdict (F1)"].startswith("fuzzy better")]
    losses = [t for t in tab if t["verdict (F1)"].startswith("fuzzy worse")]
    summary = (f"The fuzzy head beats the softmax head on macro-F1 with a 95% CI excluding 0 in {len(wins)} of "
               f"{len(df)} (model, set) comparisons and is worse in {len(losses)}; "
               + ("it does not beat softmax in general." if len(wins) <= len(df) / 2 else
                  "see the table for where it helps."))
    n_sets = max(len(r["sets"]) for r in rows)
    fig, axes = plt.subplots(len(rows), n_sets, figsize=(2.8 * n_sets, 2.8 * len(rows)), squeeze=False)
    for ax_row, r in zip(axes, rows):
        risk_coverage_figure(r["sets"], r["backbone"], ax_row)
        for ax in ax_row[len(r["sets"]):]:
            ax.set_axis_off()
    lines = ["## Fuzzy vs softmax", "",
             "A Mamdani fuzzy inference system on each phase-2 model's pooled head features (PCA on train, "
             "fuzzy c-means, Gaussian membership functions, tuned on val) against the model's own softmax head, "
             "on the same test items. Differences are fuzzy − softmax with paired bootstrap 95% CIs; the "
             "abstention signal of the fuzzy head is its firing strength, of softmax its maximum probability "
             "(AUROC for detecting errors: higher is better). The fuzzy head's probabilities are its normalised "
             "crisp outputs, not calibrated probabilities: its ECE is expected to be high.", "", summary, "", markdown_table(df),
             "Best fuzzy hyperparameters: " + "; ".join(
                 f"{r['backbone']}: {', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in r['params'].items())} "
                 f"(val macro-F1 {r['best_value']:.4f}, registered {r['registered']})" for r in rows), "",
             "![fuzzy_risk_coverage.png](fuzzy_risk_coverage.png)", ""]
    return lines, {"fuzzy_risk_coverage.png": png_bytes(fig)}

