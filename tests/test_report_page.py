"""The report page as a reader opens it: a figure first, one point per row and per gain, built
from a real sqlite MLflow store holding two phase-2 studies and the shortcut baseline."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from dtl.report import results
from dtl.tracking import schema
from dtl.tracking.adapter import connect, start_run


def _study(t, name: str, tags: dict, f1: float, rng) -> None:
    run = start_run(t, name, {schema.DATA_DIGEST: "d" * 12, schema.SPLIT_PROTOCOL: "near-duplicate-groups",
                              schema.ANNOTATION_MASK: "off", **tags})
    run.log_metrics({"test_accuracy": f1 + 0.02, "test_macro_f1": f1, "test_macro_f1_ci_low": f1 - 0.05,
                     "test_macro_f1_ci_high": f1 + 0.05, "val_accuracy": f1, "val_macro_f1": f1})
    labels = ["Benign", "Pre"] * 20
    p = np.clip(rng.normal(f1, 0.2, 40), 0.01, 0.99)  # probability of the true class
    pred = pd.DataFrame({"path": [f"img{i}.jpg" for i in range(40)], "label": labels,
                         "p_Benign": [q if y == "Benign" else 1 - q for q, y in zip(p, labels)]})
    pred["p_Pre"] = 1 - pred["p_Benign"]
    run.log_table(pred, "evaluation/predictions_test.csv")
    run.end()


@pytest.fixture()
def report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = connect(f"sqlite:///{tmp_path}/mlflow.db", "report-page")
    rng = np.random.default_rng(0)
    study = {schema.ROLE: schema.Role.STUDY, schema.PHASE: "phase2", schema.BACKBONE: "test_resnet"}
    _study(t, "double", {**study, schema.STRATEGY: "double"}, 0.8, rng)
    _study(t, "scratch", {**study, schema.STRATEGY: "scratch"}, 0.6, rng)
    _study(t, "baseline", {schema.ROLE: schema.Role.BASELINE, schema.BACKBONE: "baseline:colour-histogram",
                           schema.STRATEGY: "logistic|boost", schema.PREPROCESSING: "default"}, 0.5, rng)
    out = results.build(t, tmp_path / "report", "all-dtl",
                        description="A **tiny** table, *two* studies, [docs](docs/results.md):\n\n- one\n- two")
    return t, out


@pytest.mark.slow  # a sqlite store, three runs and the report's bootstraps: about a minute on 2 busy cores
def test_the_report_opens_on_the_forest_plot_with_one_point_per_row_and_per_gain(report):
    """report.html opened on a 25-column table that overflowed the page: the first element after
    the title is the forest plot; it plots each row (the shortcut baseline included) and each gain."""
    t, out = report
    page = (out / "report.html").read_text()
    body = page.split("<body>", 1)[1]
    first = re.findall(r"<(h1|h2|p|table|ul|pre)\b[^>]*>(.*?)</\1>", body, re.S)[:2]
    assert first[0] == ("h1", "Results")
    assert first[1][0] == "p" and first[1][1].startswith('<img src="data:image/png;base64,') and 'alt="forest"' in first[1][1]
    assert body.index("forest") < body.index("<table")
    # the real page's Markdown, rendered by markdown-it-py: emphasis, links, lists, and `|` kept inside a cell
    assert "<strong>tiny</strong>" in body and "<em>two</em>" in body and '<a href="docs/results.md">docs</a>' in body
    assert "<li>one</li>\n<li>two</li>" in body and "<td>logistic|boost</td>" in body and "logistic/boost" not in body

    df = results.collect(t, "all-dtl")
    base, df = results.baseline_gains(df)
    gain, cv = results.gains(df), results.cv_gains(df)
    fig = results.forest_figure(df, gain, cv, base)
    rows_ax, gains_ax = fig.axes
    assert len(df) == 3 and len(rows_ax.containers) == 3  # double, scratch and the baseline row
    plotted = sorted(round(c.lines[0].get_xdata()[0], 4) for c in rows_ax.containers)
    assert plotted == [0.5, 0.6, 0.8]
    assert any("baseline:colour-histogram" in lbl.get_text() for lbl in rows_ax.get_yticklabels())
    f1_gains = pd.concat([gain, base])
    f1_gains = f1_gains[f1_gains["metric"] == "test_macro_f1"]
    assert len(f1_gains) == 3 and len(gains_ax.containers) == 3  # double − scratch, each model − baseline
    labels = [lbl.get_text() for lbl in gains_ax.get_yticklabels()]
    assert sum("model − baseline" in x for x in labels) == 2 and sum("double − scratch" in x for x in labels) == 1


def test_the_forest_plot_shows_each_comparison_once_fold_level_where_cross_validated():
    """With final.cv on the main rows and variant rows trained once (reproduce.sh), the gains panel
    showed only the fold-level gains: the variants' bootstrap gains (hed − default, masked −
    unmasked) were dropped. Each comparison is now plotted once, fold-level where both rows were
    cross-validated, else from its paired bootstrap."""
    row = dict.fromkeys(results.COLUMNS, "")
    df = pd.DataFrame([{**row, "backbone": "test_resnet", "strategy": s, "masked": "on", "split_protocol": "g",
                        "test_macro_f1": 0.9, "f1_low": 0.85, "f1_high": 0.95, "cv_f1": float("nan")}
                       for s in ("double", "scratch")])

    def frame(*comparisons):
        return pd.DataFrame([{"backbone": "test_resnet", "comparison": c, "metric": "test_macro_f1", "gain": 0.01,
                              "ci_low": -0.01, "ci_high": 0.03} for c in comparisons])

    cv = frame("double − scratch (g, mask on, default)", "model − baseline:colour (logistic) (double, g, mask on, default)")
    gain = frame("double − scratch (g, mask on, default)", "hed=0.2 − default (test_resnet, double, g, mask on)")
    base = frame("model − baseline:colour (logistic) (double, g, mask on, default)",
                 "model − baseline:colour (logistic) (double, g, mask on, hed=0.2)")
    fig = results.forest_figure(df, gain, cv, base)
    labels = sorted(lbl.get_text() for lbl in fig.axes[1].get_yticklabels())
    assert len(fig.axes[1].containers) == 4 and len(set(labels)) == 4, labels
    assert any("hed=0.2 − default" in x for x in labels) and sum("model − baseline" in x for x in labels) == 2
    assert "the rest: paired bootstrap" in fig.axes[1].get_title()
