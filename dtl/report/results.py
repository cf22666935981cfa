"""Results table and figures, built from an MLflow search (never from local state).

One row per (backbone, transfer strategy) of phase-2 studies with a final evaluation:
phase-1 validation metric, phase-2 validation and test metrics with 95% CIs, trials run and
pruned, best hyperparameters, registered version and alias; plus the gain of double over
single transfer, the seed's own table format, a confusion-matrix grid, learning curves and
the Optuna histories. Written as Markdown, CSV and one self-contained HTML page.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from dtl.evaluation.metrics import confusion_figure, point_metrics
from dtl.evaluation.stats import corrected_t_interval, holm, joined_units, paired_bootstrap
from dtl.explain.report import section as explain_section
from dtl.fuzzy.report import section as fuzzy_section
from dtl.report.tables import html_page, markdown_table, png_bytes
from dtl.tracking import schema
from dtl.tracking.adapter import Tracking, find_runs, redact
from dtl.train.phases import input_part, preprocessing_of

HIDDEN = ["phase2_run", "cv_id", "f1_low", "f1_high", "cv_f1", "cv_f1_low", "cv_f1_high"]  # for joins and plots
COLUMNS = ["backbone", "strategy", "init", "split_protocol", "masked", "preprocessing", "phase1_val_macro_f1", "phase2_val_accuracy",
           "val_macro_f1", "test_accuracy", "test_accuracy_ci", "test_macro_f1", "test_macro_f1_ci", "ci_unit",
           "test_accuracy_seeds", "test_macro_f1_seeds", "test_accuracy_cv", "test_macro_f1_cv",
           "test_balanced_accuracy", "trials", "pruned", "failed",
           "flags", "best_params", "registered_version", "alias", "data_digest", *HIDDEN]
ROW_KEY = ("backbone", "strategy", "split_protocol", "masked", "preprocessing")  # one row per study of this kind (the latest)
GAIN_METRICS = ("accuracy", "macro_f1")


def _ci(m: dict, k: str) -> str:
    lo, hi = m.get(f"{k}_ci_low"), m.get(f"{k}_ci_high")
    return f"{lo:.4f}–{hi:.4f}" if lo is not None and hi is not None else ""


def collect(tracking: Tracking, registered_model: str, data_digest: str | None = None) -> pd.DataFrame:
    """The results table, from MLflow: phase-2 study runs that hold a final evaluation."""
    runs = [r for r in find_runs(tracking, schema.study_query("phase2", data_digest)) if "test_accuracy" in r.data.metrics or "val_accuracy" in r.data.metrics]
    p1_runs = {r.info.run_id: r for r in find_runs(tracking, schema.study_query("phase1"))}
    versions = {}
    try:
        for v in tracking.client.search_model_versions(f"name='{registered_model}'"):
            # search results carry no aliases in every store: read each version itself
            versions.setdefault(v.run_id, []).append(tracking.client.get_model_version(v.name, v.version))
    except Exception:
        pass
    latest: dict = {}
    for r in runs:  # the latest study per (backbone, strategy, data, masking, stain settings)
        key = (*(r.data.tags.get(k) for k in (schema.BACKBONE, schema.STRATEGY, schema.DATA_DIGEST)), _masked(r.data.tags),
               preprocessing_of(r.data.tags, r.data.params))
        if key not in latest or r.info.start_time > latest[key].info.start_time:
            latest[key] = r
    rows = []
    for r in latest.values():
        t, m = r.data.tags, r.data.metrics
        init = t.get(schema.INIT, "")
        p1 = p1_runs.get(init.split("phase1:")[-1]) if init.startswith("phase1:") else None
        vs = sorted(versions.get(r.info.run_id, []), key=lambda v: int(v.version))
        v = vs[-1] if vs else None
        rows.append({
            "backbone": t.get(schema.BACKBONE), "strategy": t.get(schema.STRATEGY),
            "init": (f"phase 1 ({p1.data.tags.get(schema.INIT, '?')} → {p1.data.tags.get(schema.DATA_KIND, '?')})") if p1 else init,
            "split_protocol": t.get(schema.SPLIT_PROTOCOL), "masked": _masked(t),
            "preprocessing": preprocessing_of(r.data.tags, r.data.params),
            "phase1_val_macro_f1": p1.data.metrics.get("val_macro_f1") if p1 else None,
            "phase2_val_accuracy": m.get("val_accuracy"), "val_macro_f1": m.get("val_macro_f1"),
            "test_accuracy": m.get("test_accuracy"), "test_accuracy_ci": _ci(m, "test_accuracy"),
            "test_macro_f1": m.get("test_macro_f1"), "test_macro_f1_ci": _ci(m, "test_macro_f1"),
            "ci_unit": t.get(schema.CI_UNIT_PREFIX + "test", "image"),
            "test_accuracy_seeds": _seeds(m, "test_accuracy"), "test_macro_f1_seeds": _seeds(m, "test_macro_f1"),
            "test_accuracy_cv": _cv(m, t, "test_accuracy"), "test_macro_f1_cv": _cv(m, t, "test_macro_f1"),
            "test_balanced_accuracy": m.get("test_balanced_accuracy"),
            "trials": int(m.get("n_complete", 0) + m.get("n_pruned", 0) + m.get("n_failed", 0)),
            "pruned": int(m.get("n_pruned", 0)), "failed": int(m.get("n_failed", 0)),
            "flags": _flags(t),
            "best_params": json.dumps({k[len(schema.BEST_PARAM_PREFIX):]: _short(val) for k, val in sorted(t.items())
                                        if k.startswith(schema.BEST_PARAM_PREFIX)})
            if _tuned(t) else "none tuned (config values)",
            "registered_version": v.version if v else "", "alias": ",".join(v.aliases) if v else "",
            "data_digest": (t.get(schema.DATA_DIGEST) or "")[:12], "phase2_run": r.info.run_id,
            "cv_id": t.get(schema.CV_ID, ""), "f1_low": m.get("test_macro_f1_ci_low"),
            "f1_high": m.get("test_macro_f1_ci_high"), "cv_f1": m.get("cv_test_macro_f1_mean"),
            "cv_f1_low": m.get("cv_test_macro_f1_ci_low"), "cv_f1_high": m.get("cv_test_macro_f1_ci_high"),
        })
    df = pd.DataFrame(rows + baseline_rows(tracking, data_digest), columns=COLUMNS)
    return df.sort_values(["backbone", "strategy"]).reset_index(drop=True) if len(df) else df


BASELINE_PREFIX = "baseline:"
SHORTCUT_FLAG = "not shown to use more than global image statistics"


def baseline_rows(tracking: Tracking, data_digest: str | None = None) -> list[dict]:
    """The shortcut-baseline runs as rows of the table (``backbone`` = ``baseline:<features>``,
    ``strategy`` = the classifier): the latest per (features, protocol, masking, preprocessing)."""
    flt = schema.where({schema.ROLE: schema.Role.BASELINE, **({schema.DATA_DIGEST: data_digest} if data_digest else {})},
                       status="FINISHED")
    latest: dict = {}
    for r in find_runs(tracking, flt):  # oldest first: the last one wins
        t = r.data.tags
        latest[tuple(t.get(k) for k in (schema.DATA_DIGEST, schema.SPLIT_PROTOCOL, schema.ANNOTATION_MASK,
                                        schema.PREPROCESSING))] = r  # one baseline per input the models see
    out = []
    for r in latest.values():
        t, m = r.data.tags, r.data.metrics
        out.append({"backbone": t.get(schema.BACKBONE), "strategy": t.get(schema.STRATEGY),
                    "init": "none: global image statistics", "split_protocol": t.get(schema.SPLIT_PROTOCOL),
                    "masked": _masked(t), "preprocessing": t.get(schema.PREPROCESSING, "default"),
                    "val_macro_f1": m.get("val_macro_f1"), "test_accuracy": m.get("test_accuracy"),
                    "test_accuracy_ci": _ci(m, "test_accuracy"), "test_macro_f1": m.get("test_macro_f1"),
                    "test_macro_f1_ci": _ci(m, "test_macro_f1"), "ci_unit": t.get(schema.CI_UNIT_PREFIX + "test", "image"),
                    "test_balanced_accuracy": m.get("test_balanced_accuracy"), "trials": 0, "pruned": 0, "failed": 0,
                    "test_accuracy_cv": _cv(m, t, "test_accuracy"), "test_macro_f1_cv": _cv(m, t, "test_macro_f1"),
                    "flags": "", "best_params": "", "registered_version": "", "alias": "",
                    "cv_id": t.get(schema.CV_ID, ""),  # final.cv: refitted on the models' folds
                    "data_digest": (t.get(schema.DATA_DIGEST) or "")[:12], "phase2_run": r.info.run_id,
                    "f1_low": m.get("test_macro_f1_ci_low"), "f1_high": m.get("test_macro_f1_ci_high"),
                    "cv_f1": m.get("cv_test_macro_f1_mean"), "cv_f1_low": m.get("cv_test_macro_f1_ci_low"),
                    "cv_f1_high": m.get("cv_test_macro_f1_ci_high")})
    return out


def is_baseline(row) -> bool:
    return str(row["backbone"]).startswith(BASELINE_PREFIX)


def _masked(tags: dict) -> str:
    """``on``/``off``: whether the annotation corner was masked for this study ('' before masking existed)."""
    return tags.get(schema.ANNOTATION_MASK, "")


def _tuned(tags: dict) -> bool:
    return any(k.startswith(schema.BEST_PARAM_PREFIX) for k in tags)


def _flags(tags: dict) -> str:
    """A study whose best trial is one of TPE's random start-up draws did not tune anything yet
    (a study with an empty search space tunes nothing by design and is not flagged)."""
    return "best trial is a random start-up draw" if tags.get(schema.BEST_IS_STARTUP_DRAW) == "true" and _tuned(tags) else ""


def _seeds(m: dict, k: str) -> str:
    n = m.get("seeds_n")
    if not n or f"seeds_{k}_mean" not in m:
        return ""
    return f"{m[f'seeds_{k}_mean']:.4f} ± {m[f'seeds_{k}_std']:.4f} (n={int(n)})"


def _cv(m: dict, tags: dict, k: str) -> str:
    """``mean ± sd [corrected 95% CI] (K×R)`` of a cross-validated metric ('' without ``final.cv``)."""
    if f"cv_{k}_mean" not in m:
        return ""
    return (f"{m[f'cv_{k}_mean']:.4f} ± {m[f'cv_{k}_sd']:.4f} [{m[f'cv_{k}_ci_low']:.4f}–{m[f'cv_{k}_ci_high']:.4f}]"
            f" ({tags.get(schema.CV, '?')})")


def _short(v: str) -> str:
    try:
        f = float(v)
        return f"{f:.3g}" if not f.is_integer() else str(int(f))
    except ValueError:
        return v


def comparison_pairs(df: pd.DataFrame) -> list[tuple[str, int, int]]:
    """Pairs of rows that differ in one respect: double vs single/scratch (same protocol and
    masking), each protocol vs the default grouped one, masked vs unmasked, each stain setting vs
    the default preprocessing. ``(what, a, b)`` with row indices; the gain reported is a − b."""
    pairs = []
    rows = df.reset_index(drop=True)
    if "preprocessing" not in rows:  # tables from before the column: every row default
        rows = rows.assign(preprocessing="default")
    for i, a in rows.iterrows():
        for j, b in rows.iterrows():
            if is_baseline(a) or is_baseline(b):
                continue  # baseline pairs: baseline_pairs
            same = {k: a[k] == b[k] for k in ROW_KEY}
            differs = [k for k, v in same.items() if not v]
            if len(differs) != 1:
                continue
            k = differs[0]
            if k == "strategy" and a[k] == "double":
                pairs.append((f"double − {b[k]}", i, j))
            elif k == "split_protocol" and a[k] == DEFAULT_PROTOCOL:
                pairs.append((f"{a[k]} − {b[k]}", i, j))
            elif k == "masked" and a[k] == "on" and b[k] == "off":
                pairs.append(("masked − unmasked", i, j))
            elif k == "preprocessing" and b[k] == "default":
                pairs.append((f"{a[k]} − default", i, j))
    return pairs


DEFAULT_PROTOCOL = "near-duplicate-groups"


def baseline_pairs(df: pd.DataFrame) -> list[tuple[str, int, int]]:
    """Each model row with the baseline row of its data, split protocol, masking and input
    preprocessing (scored on the same test items, on the input the model sees): ``(what, model
    row, baseline row)``, the gain reported is model − baseline."""
    rows = df.reset_index(drop=True)
    key = lambda r: (r["data_digest"], r["split_protocol"], r["masked"], input_part(r["preprocessing"]))  # noqa: E731
    bases = {key(b): (j, b) for j, b in rows.iterrows() if is_baseline(b)}
    return [(f"model − {bases[key(a)][1]['backbone']} ({bases[key(a)][1]['strategy']})", i, bases[key(a)][0])
            for i, a in rows.iterrows() if not is_baseline(a) and key(a) in bases]


def paired_gains(pairs: list[tuple[str, dict, pd.DataFrame, pd.DataFrame]], classes: list[str] | None = None,
                 n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (comparison, metric): the difference a − b with a paired bootstrap CI over the
    test items both predictions tables hold (matched by path), resampling their bootstrap units."""
    out = []
    for what, info, pa, pb in pairs:
        m = pa.merge(pb, on="path", suffixes=("_a", "_b"))
        if m.empty:
            continue
        cls = classes or [c[2:] for c in pa.columns if c.startswith("p_")]
        index = {c: i for i, c in enumerate(cls)}
        y = m["label_a"].map(index).to_numpy()
        prob = {s: m[[f"p_{c}_{s}" for c in cls]].to_numpy(float) for s in ("a", "b")}
        units = _units(m)
        res = paired_bootstrap(y, prob["a"], prob["b"], point_metrics, GAIN_METRICS, n_boot, seed, units)
        for metric, r in res.items():
            out.append({**info, "comparison": what, "metric": f"test_{metric}", "gain": r["diff"],
                        "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                        "ci_excludes_0": "yes" if r["excludes_zero"] else "no",
                        "test_items": r["n_items"], "units": f"{r['n_units']} {r['unit']}s"})
    cols = ["backbone", "comparison", "metric", "gain", "ci_low", "ci_high", "ci_excludes_0", "test_items", "units"]
    return pd.DataFrame(out, columns=cols)


def _units(m: pd.DataFrame):
    """Resampling units of the items two predictions tables share: the rows' own units when both
    group them alike, else the join of both groupings (two split protocols: items that either
    protocol keeps together are resampled together)."""
    if "bootstrap_unit_a" not in m:
        return None
    ua = m["bootstrap_unit_a"].astype(str).to_numpy()
    ub = m["bootstrap_unit_b"].astype(str).to_numpy() if "bootstrap_unit_b" in m else ua
    same = pd.Series(ua).groupby(ub).nunique().eq(1).all() and pd.Series(ub).groupby(ua).nunique().eq(1).all()
    return ua if same else joined_units(ua, ub)


def test_predictions(run_id: str, cache: dict | None = None) -> pd.DataFrame | None:
    """The per-item test predictions a study (or baseline) run logged, None without them."""
    cache = {} if cache is None else cache
    if run_id not in cache:
        try:
            cache[run_id] = pd.read_csv(mlflow.artifacts.download_artifacts(
                artifact_uri=f"runs:/{run_id}/evaluation/predictions_test.csv"))
        except Exception:  # noqa: BLE001 - a study without a final evaluation
            cache[run_id] = None
    return cache[run_id]


def gains(df: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    """Paired gains of the comparable rows of ``df``, from the predictions each study logged."""
    pairs, tables = [], {}
    for what, i, j in comparison_pairs(df):
        a, b = df.iloc[i], df.iloc[j]
        ta, tb = test_predictions(a["phase2_run"], tables), test_predictions(b["phase2_run"], tables)
        if ta is not None and tb is not None:
            info = {"backbone": a["backbone"]}
            pairs.append((f"{what} ({_context(a, b)})", info, ta, tb))
    return paired_gains(pairs, n_boot=n_boot)


def baseline_gains(df: pd.DataFrame, n_boot: int = 1000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Model − shortcut baseline for every model row (paired bootstrap over the same test items),
    and ``df`` with :data:`SHORTCUT_FLAG` in the flags of each row whose test-accuracy gain does
    not have a CI above 0."""
    out, tables, df = [], {}, df.copy()
    for what, i, j in baseline_pairs(df):
        a, b = df.iloc[i], df.iloc[j]
        ta, tb = test_predictions(a["phase2_run"], tables), test_predictions(b["phase2_run"], tables)
        if ta is None or tb is None:
            continue
        g = paired_gains([(f"{what} ({_model_label(a)})", {"backbone": a["backbone"]}, ta, tb)], n_boot=n_boot)
        out.append(g)
        acc = g[g["metric"] == "test_accuracy"]
        if len(acc) and is_flagged(acc.iloc[0]):
            df.loc[df.index[i], "flags"] = "; ".join(x for x in (df.iloc[i]["flags"], SHORTCUT_FLAG) if x)
    cols = paired_gains([]).columns
    return (pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)), df


def _model_label(a) -> str:
    """How a model − baseline comparison names its model row (the same in both gains tables)."""
    return ", ".join(x for x in (a["strategy"], a["split_protocol"], f"mask {a['masked']}", a["preprocessing"]) if x)


def is_flagged(g) -> bool:
    """A model − baseline gain whose CI is not above 0 (no verdict, False, where the CI is undefined)."""
    return bool(g["ci_low"] == g["ci_low"] and not g["ci_low"] > 0)


def gap_text(g: pd.Series) -> str:
    """A gain row as a version tag: ``+0.0120 [-0.0030, +0.0270]``."""
    return f"{g['gain']:+.4f} [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}]"


def baseline_folds_path(cid: str) -> str:
    """Where a baseline run keeps its scores on the folds ``cid`` (one file per set of folds: jobs
    with other ``final.cv`` settings on the same data share the baseline run)."""
    return f"cv/folds-{cid}.json"


def cv_gains(df: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """The comparisons of :func:`comparison_pairs` and :func:`baseline_pairs` (model − shortcut
    baseline, the baseline refitted on each fold) whose two rows were cross-validated on the same
    folds (same ``cv_id``): per metric, the mean of the per-fold differences a − b with the
    corrected resampled t interval and p-value (Nadeau & Bengio), and Holm's adjustment across all
    of the table's CV comparisons. Rows on other folds (another split protocol) are not paired."""
    out, folds = [], {}

    def load(run_id, path="cv/folds.json"):
        if (run_id, path) not in folds:
            try:
                folds[(run_id, path)] = mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")["folds"]
            except Exception:  # noqa: BLE001 - a study without cross-validation, a baseline without these folds
                folds[(run_id, path)] = None
        return folds[(run_id, path)]

    for what, i, j in comparison_pairs(df) + baseline_pairs(df):
        a, b = df.iloc[i], df.iloc[j]
        base = is_baseline(b)
        context = _model_label(a) if base else _context(a, b)
        if not a["cv_id"] or (a["cv_id"] != b["cv_id"] and not base):
            continue
        # a baseline run holds one file per set of folds it was refitted on (the model's cv_id's)
        fa = load(a["phase2_run"])
        fb = load(b["phase2_run"], baseline_folds_path(a["cv_id"]) if base else "cv/folds.json")
        if not fa or not fb:
            continue
        by_b = {(f["repeat"], f["fold"]): f for f in fb}
        matched = [(f, by_b[(f["repeat"], f["fold"])]) for f in fa if (f["repeat"], f["fold"]) in by_b]
        n_train = float(np.mean([f["n_train"] for f, _ in matched]))
        n_test = float(np.mean([f["n_test"] for f, _ in matched]))
        for metric in (f"test_{g}" for g in GAIN_METRICS):
            r = corrected_t_interval([x[metric] - y[metric] for x, y in matched], n_train, n_test, alpha)
            out.append({"backbone": a["backbone"], "comparison": f"{what} ({context})", "metric": metric,
                        "gain": r["mean"], "sd": r["sd"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                        "p": r["p"], "folds": r["n"]})
    cols = ["backbone", "comparison", "metric", "gain", "sd", "ci_low", "ci_high", "p", "p_holm", "survives_holm",
            "folds"]
    res = pd.DataFrame(out, columns=cols)
    if len(res):
        res["p_holm"] = holm(res["p"].to_numpy())
        res["survives_holm"] = np.where(res["p_holm"] < alpha, "yes", "no")
    return res


CV_TEXT = " ".join("""
Each cross-validated gain is the mean over folds of a − b, both rows retrained with their study's best
parameters on the same stratified group folds (`final.cv`: patients, near-duplicate groups or acquisition
blocks never span two folds). Its 95% CI and p-value come from the corrected resampled t statistic
(Nadeau & Bengio 2003: variance × (1/J + n_test/n_train)), so training variance is included; `p_holm` is
Holm's adjustment across all comparisons of this table, and a gain *survives* where p_holm < 0.05. The
parameters were tuned on the main split, whose items every fold contains, so the fold scores are slightly
optimistic. Rows with another split protocol have other folds and are not paired here. A `model − baseline`
gain pairs the model's folds with the shortcut baseline refitted (not re-chosen) on the train part of each
same fold.
""".split())


def _cv_summary(cv: pd.DataFrame) -> str:
    if cv.empty:
        return "No cross-validated comparison (run with `-o final.cv=5` to retrain each study's best on 5 folds)."
    return _listed(cv, cv["survives_holm"] == "yes", "cross-validated gains", "survives Holm's correction",
                   "survive Holm's correction", lambda r: f", p_holm {r.p_holm:.3g}")


def _listed(table: pd.DataFrame, sig, what: str, none_verb: str, verb: str, extra=lambda r: "") -> str:
    """One sentence naming the rows of ``table`` where ``sig`` holds (gain and CI each)."""
    sig = table[sig]
    if sig.empty:
        return f"None of the {len(table)} {what} {none_verb}: no difference is shown by these runs."
    items = "; ".join(f"{r.backbone} {r.comparison} {r.metric} {r.gain:+.4f} ({r.ci_low:+.4f} to {r.ci_high:+.4f}"
                      f"{extra(r)})" for r in sig.itertuples())
    return f"{len(sig)} of {len(table)} {what} {verb}: {items}."


GAINS_TEXT = ("Each gain is a − b of a test metric over the test items that both rows were evaluated on "
              "(matched by file), with a 95% paired bootstrap CI resampling the same items (or their patients / "
              "near-duplicate groups) for both models. A gain is called a difference only where its CI excludes 0. "
              "This CI covers the sampling of test items for ONE trained model each; the cross-validated gains "
              "above also cover training variance. Rows of two split protocols share only the test items that "
              "both splits happen to hold (a chance overlap, so little power); their items are resampled in the "
              "join of both groupings (items linked by either protocol stay together).")


BASELINE_TEXT = " ".join("""
The `baseline:` rows are the strongest shortcut baseline of this data (`dtl data audit` lists them all):
a logistic regression or gradient boosting on global statistics of the model's own input that ignore
the cells' shape (17 colour statistics, the pooled annotation box as preprocessed, the border), chosen by
grouped cross-validation on the train split, refitted on it and scored on the same test items as the
models. Each model's gain over it is a paired bootstrap over those items; a model whose test-accuracy
gain does not have a CI above 0 is flagged "not shown to use more than global image statistics" (this
bootstrap decides the flag here, in the table and on the registered version, whose tags are set when it
is registered). With `final.cv` the baseline is also refitted on each fold, and the fold-level model −
baseline test is listed under "Cross-validated gains" (and plotted in the forest plot in place of this one).
""".split())


def baseline_section(base: pd.DataFrame) -> list[str]:
    """The report's lines on the models beside the shortcut baseline (none without a baseline run)."""
    if base.empty:
        return []
    acc = base[base["metric"] == "test_accuracy"]
    flagged = acc[[is_flagged(r) for _, r in acc.iterrows()]]
    verdict = (f"{len(flagged)} of {len(acc)} models are {SHORTCUT_FLAG}: "
               + "; ".join(f"{r.backbone} {r.comparison} {r.gain:+.4f} ({r.ci_low:+.4f} to {r.ci_high:+.4f})"
                           for r in flagged.itertuples()) + "." if len(flagged) else
               f"All {len(acc)} models beat the baseline with a test-accuracy CI above 0.")
    return ["## Beside the shortcut baseline", "", BASELINE_TEXT, "", verdict, "", markdown_table(base)]


def _gain_summary(gain: pd.DataFrame) -> str:
    if gain.empty:
        return "No comparable pairs of rows (one strategy, protocol and masking setting only)."
    return _listed(gain, gain["ci_excludes_0"] == "yes", "gains", "has a CI that excludes 0", "have a CI that excludes 0")


def _context(a, b) -> str:
    return ", ".join(f"{a[k]}" for k in ROW_KEY[1:] if a[k] == b[k] and a[k] != "")


def seed_table(df: pd.DataFrame) -> pd.DataFrame:
    """The seed project's format: Model | Phase-2 Accuracy | Eval Acc | Notes."""
    rows = []
    for _, r in df.iterrows():
        if is_baseline(r):
            continue
        note = f"{r['strategy']} transfer, init {r['init']}, {r['split_protocol']} split"
        if r["test_accuracy_ci"]:
            note += f", test 95% CI {r['test_accuracy_ci']}"
        rows.append({"Model": r["backbone"], "Phase-2 Accuracy": _pct(r["phase2_val_accuracy"]),
                     "Eval Acc": _pct(r["test_accuracy"]), "Notes": note})
    return pd.DataFrame(rows, columns=["Model", "Phase-2 Accuracy", "Eval Acc", "Notes"])


def _pct(v) -> str:
    return f"{100 * v:.2f}%" if v is not None and v == v else "n/a"


def figures(tracking: Tracking, df: pd.DataFrame) -> dict:
    """PNG bytes: confusion-matrix grid (test), learning curves and Optuna histories."""
    import matplotlib  # deferred: plotting, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plotting, only when a figure is drawn

    out = {}
    if df.empty:
        return out
    n = len(df)
    cols = min(n, 5)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    for ax, (_, r) in zip(axes.flat, df.iterrows()):
        try:
            cm = mlflow.artifacts.load_dict(f"runs:/{r['phase2_run']}/evaluation/confusion_test.json")
            confusion_figure(cm, _label(r).replace(", ", "\n", 1), ax=ax)
        except Exception:
            ax.set_axis_off()
    fig.tight_layout()
    out["confusion_grid.png"] = png_bytes(fig)

    legend_rows = -(-len(df) // 3)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2 + 0.22 * legend_rows))
    for _, r in df.iterrows():
        run = tracking.client.get_run(r["phase2_run"])
        best = run.data.tags.get(schema.BEST_TRIAL_RUN_ID)
        label = _label(r)
        if best:
            hist = tracking.client.get_metric_history(best, "val_macro_f1")
            axes[0].plot([h.step for h in hist], [h.value for h in hist], marker="o", label=label)
        trials = find_runs(tracking, schema.children(r["phase2_run"]))
        vals = [(int(t.data.tags.get(schema.OPTUNA_TRIAL, 0)), t.data.metrics.get("best_val_macro_f1", np.nan))
                for t in trials]
        vals.sort()
        if vals:
            ys = [v for _, v in vals]
            best_so_far = np.fmax.accumulate(np.nan_to_num(ys, nan=-np.inf))
            axes[1].plot([k for k, _ in vals], best_so_far, drawstyle="steps-post", label=label)
            axes[1].scatter([k for k, _ in vals], ys, s=12)
    axes[0].set(title="learning curve of the best trial", xlabel="epoch", ylabel="val macro-F1")
    axes[1].set(title="Optuna history (best so far)", xlabel="trial", ylabel="val macro-F1")
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    # one legend below both panels: beside the curves it would hide them once there are many rows
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.22 * legend_rows / (4.2 + 0.22 * legend_rows) + 0.02, 1, 1))
    out["curves.png"] = png_bytes(fig)
    return out


def forest(df: pd.DataFrame, gain: pd.DataFrame, cv: pd.DataFrame, base: pd.DataFrame | None = None) -> bytes | None:
    """The report's first screen (:func:`forest_figure`) as PNG bytes, None without rows."""
    fig = forest_figure(df, gain, cv, base)
    return png_bytes(fig) if fig is not None else None


def forest_figure(df: pd.DataFrame, gain: pd.DataFrame, cv: pd.DataFrame, base: pd.DataFrame | None = None):
    """The report's first screen: each row's test macro-F1 with its 95% CI (cross-validated where
    ``final.cv`` ran: mean and corrected t CI; else the single model's bootstrap CI; the shortcut
    baseline rows too), and each gain in macro-F1 with its CI (fold-level where cross-validated,
    else the paired bootstrap; model − baseline gains from ``base``), grouped by backbone, with 0
    marked. One errorbar per plotted point (``ax.containers``); None without rows."""
    import matplotlib  # deferred: plotting, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plotting, only when a figure is drawn

    if df.empty:
        return None
    rows = df.sort_values(["backbone", "strategy", "masked", "split_protocol"], ascending=False).reset_index(drop=True)
    # each comparison once: fold-level where both rows were cross-validated, else the paired bootstrap
    done = cv.set_index(["backbone", "comparison"]).index if len(cv) else pd.Index([])
    rest = [x[~x.set_index(["backbone", "comparison"]).index.isin(done)] for x in (gain, base) if x is not None and len(x)]
    g = pd.concat([x for x in (cv, *rest) if len(x)] or [gain])
    g = g[g["metric"] == "test_macro_f1"].sort_values(["backbone", "comparison"], ascending=False).reset_index(drop=True)
    row_labels = [_label(r) + (f" v{r['registered_version']}" if r["registered_version"] else "") for _, r in rows.iterrows()]
    gain_labels = [f"{r['backbone']}: {r['comparison']}" for _, r in g.iterrows()]
    longest = [max((len(x) for x in labels), default=10) for labels in (row_labels, gain_labels)]
    # each panel as wide as its labels (8 pt: ~0.075 in per character) plus 3.5 in of plot
    widths = [0.075 * n + 3.5 for n in longest]
    fig, axes = plt.subplots(1, 2, figsize=(sum(widths), 1.4 + 0.32 * max(len(rows), len(g), 3)),
                             gridspec_kw={"width_ratios": widths})
    ax = axes[0]
    for y, r in rows.iterrows():
        cvd = r.get("cv_f1") is not None and r["cv_f1"] == r["cv_f1"]
        x, lo, hi = (r["cv_f1"], r["cv_f1_low"], r["cv_f1_high"]) if cvd else (r["test_macro_f1"], r["f1_low"], r["f1_high"])
        if x is None or x != x:
            continue
        ax.errorbar([x], [y], xerr=[[x - (lo if lo == lo and lo is not None else x)],
                                     [(hi if hi == hi and hi is not None else x) - x]],
                    fmt="o" if cvd else "s", color="C0" if cvd else "C1", capsize=3)
    ax.set_yticks(range(len(rows)), row_labels, fontsize=8)
    ax.set_title("test macro-F1, 95% CI\n(● cross-validated, ■ one model: bootstrap)", fontsize=9)
    ax.set_xlabel("macro-F1")
    ax = axes[1]
    for y, r in g.iterrows():
        ax.errorbar([r["gain"]], [y], xerr=[[r["gain"] - r["ci_low"]], [r["ci_high"] - r["gain"]]], fmt="o",
                    color="C2" if (r["ci_low"] > 0 or r["ci_high"] < 0) else "C7", capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(g)), gain_labels, fontsize=8)
    ax.set_title("gains in test macro-F1, 95% CI\n" + ("(fold-level, corrected t" + ("; the rest: paired bootstrap)" if any(len(x) for x in rest) else ")")
                                                   if len(cv) else "(paired bootstrap)"),
                 fontsize=9)
    ax.set_xlabel("a − b")
    fig.tight_layout()
    return fig


def _label(r) -> str:
    """A row's name in figures: backbone and strategy, with protocol, masking and stain settings."""
    extra = [str(r[k]) for k in ("split_protocol",) if r.get(k)] + ([f"mask {r['masked']}"] if r.get("masked") else [])
    extra += [str(r["preprocessing"])] if r.get("preprocessing") not in (None, "", "default") else []
    return f"{r['backbone']} ({r['strategy']})" + (", " + ", ".join(extra) if extra else "")


def build(tracking: Tracking, out_dir: str | Path, registered_model: str, data_digest: str | None = None,
          provenance: dict | None = None, description: str = "") -> Path:
    """Write results.md / results.csv / seed_table.csv / report.html and the figures."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = collect(tracking, registered_model, data_digest)
    base, df = baseline_gains(df)
    gain = gains(df)
    cv = cv_gains(df)
    seed = seed_table(df)
    figs = figures(tracking, df)
    first = forest(df, gain, cv, base)
    if first:
        figs = {"forest.png": first, **figs}
    df.to_csv(out / "results.csv", index=False)
    cv.to_csv(out / "cv_gains.csv", index=False)
    seed.to_csv(out / "seed_table.csv", index=False)
    fuzzy_md, fuzzy_figs = fuzzy_section(tracking, data_digest)  # empty without fuzzy-head runs
    explain_md, explain_figs = explain_section(tracking, data_digest, studies=set(df["phase2_run"]))  # of the table's rows
    for name, data in {**figs, **fuzzy_figs, **explain_figs}.items():
        (out / name).write_bytes(data)
    prov = {"generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tracking_uri": redact(tracking.uri),
            "experiment_id": tracking.experiment_id, **(provenance or {})}
    commands = row_commands(tracking, df)
    if len(commands) > 1:  # rows from several jobs: each row's own command, not only the latest job's
        prov["row_commands"] = commands
    for k in ("command", "report_command"):  # `python -m dtl` shows as a path to dtl/__main__.py
        if isinstance(prov.get(k), str):
            prov[k] = re.sub(r"\S*dtl/__main__\.py", "dtl", prov[k])
    shown = df.drop(columns=HIDDEN) if not df.empty else df
    md = ["# Results", "", *(["![forest](forest.png)", ""] if "forest.png" in figs else []),  # the first screen
          *([description.strip(), ""] if description else []),
          "Generated from an MLflow search by `dtl report`. Split protocol per row (`split_protocol`): C-NMC is "
          "split by patient; Aria has no patient IDs, so its splits keep near-duplicate groups (one smear field "
          "photographed several times) on one side (`near-duplicate-groups`), or whole runs of consecutive file "
          "numbers (`acquisition-blocks:N`, stricter), or single images (`image-level`, leaks near-duplicates "
          "across splits: optimistic). `masked` = the Aria corner annotation (its colour differs by class) "
          "blanked before training and in the served model.", "",
          markdown_table(shown), *baseline_section(base), "## Cross-validated gains", "", CV_TEXT, "", _cv_summary(cv), "",
          *([markdown_table(cv)] if len(cv) else []),
          "## Paired gains (one model each, test items resampled)", "", GAINS_TEXT, "", _gain_summary(gain), "",
          markdown_table(gain),
          "## Seed format", "", markdown_table(seed), *fuzzy_md, *explain_md, "## Figures", ""]
    md += [f"![{n}]({n})\n" for n in figs if n != "forest.png"]
    md += ["", "## Provenance", "", "```json", json.dumps(prov, indent=2, default=str), "```", ""]
    (out / "results.md").write_text("\n".join(md))
    (out / "provenance.json").write_text(json.dumps(prov, indent=2, default=str))
    (out / "report.html").write_text(html_page("ALL double transfer: results", "\n".join(md),
                                               {**figs, **fuzzy_figs, **explain_figs}))
    return out


def row_commands(tracking: Tracking, df: pd.DataFrame) -> list[dict]:
    """The job (pipeline run, command, git commit) that produced each row: the provenance that the
    study run's parent pipeline logged, where it logged one."""
    out: dict = {}
    for _, r in df.iterrows():
        tags = tracking.client.get_run(r["phase2_run"]).data.tags
        parent = tags.get(schema.PIPELINE_RUN) or tags.get(schema.PARENT, "")  # (nested in older stores)
        if parent not in out:
            try:
                p = mlflow.artifacts.load_dict(f"runs:/{parent}/report/provenance.json")
            except Exception:  # noqa: BLE001 - a job that built no report
                p = {}
            out[parent] = {"pipeline_run": parent, "rows": [],
                           "command": re.sub(r"\S*dtl/__main__\.py", "dtl", p.get("command", "")),
                           "git_commit": p.get("git_commit", ""), "wall_time_s": p.get("wall_time_s")}
        out[parent]["rows"].append(_label(r))
    return list(out.values())


def last_provenance(tracking: Tracking) -> dict:
    """The provenance that the latest finished ``main`` logged, to keep it when a report is rebuilt."""
    runs = find_runs(tracking, schema.where({schema.ROLE: schema.Role.PIPELINE, schema.JOB: "main"}, status="FINISHED"))
    for r in sorted(runs, key=lambda r: r.info.start_time, reverse=True):
        try:
            return mlflow.artifacts.load_dict(f"runs:/{r.info.run_id}/report/provenance.json")
        except Exception:  # noqa: BLE001 - an older run without it
            continue
    return {}

