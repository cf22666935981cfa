"""Promotion policy: the pure selection table and its ranking against a second, comparison-based
implementation, then aliases against a real sqlite registry."""

import functools
import math
import random

import pytest

from dtl import DTLError
from dtl.tracking.policy import Policy, load_policy
from dtl.tracking.promotion import Candidate, Decision, select

P = Policy(metric="val_macro_f1", tie_breaks=("val_accuracy",), min_value=0.5)


def c(v, f1, acc=0.0, digest="d1", **kw):
    return Candidate(str(v), {"val_macro_f1": f1, "val_accuracy": acc}, digest, **kw)


@pytest.mark.parametrize("cands, current, force, champion, challenger, moved", [
    ([c(1, 0.8), c(2, 0.9)], None, False, "2", "1", True),                       # first promotion
    ([c(1, 0.8), c(2, 0.8, acc=0.9)], None, False, "2", "1", True),              # tie-break
    ([c(1, 0.8), c(2, 0.8)], None, False, "2", "1", True),                       # full tie: newest
    ([c(1, 0.4), c(2, 0.45)], None, False, None, None, False),                   # below min_value
    ([c(3, 0.7)], c(1, 0.9), False, "1", "3", False),                            # never downgrade
    ([c(3, 0.7)], c(1, 0.9), True, "3", None, True),                             # unless forced
    ([c(3, 0.7, digest="d2")], c(1, 0.9), False, "3", None, True),               # other data: not comparable
    ([c(1, 0.9), c(3, 0.95)], c(1, 0.9), False, "3", "1", True),                 # better candidate
    ([c(1, 0.9), c(3, 0.85)], c(1, 0.9), False, "1", "3", False),                # champion still best
    ([Candidate("4", {"val_macro_f1": 0.99}, "demo", True)], c(1, 0.7), False, "1", None, False),  # demo never
    ([Candidate("4", {"val_macro_f1": 0.99}, "demo", True)], c(1, 0.7), True, "4", None, True),    # ... unless forced
    ([c(5, 0.6, digest="real")], Candidate("4", {"val_macro_f1": 0.99}, "demo", True), False, "5", None, True),
    # same digest and protocol, but the champion saw the annotation corner: not the same data
    ([Candidate("6", {"val_macro_f1": 0.8}, "d1", protocol="p", mask="on")],
     Candidate("1", {"val_macro_f1": 0.9}, "d1", protocol="p", mask="off"), False, "6", None, True),
    ([Candidate("6", {"val_macro_f1": 0.8}, "d1", protocol="p", mask="on")],
     Candidate("1", {"val_macro_f1": 0.9}, "d1", protocol="p", mask="on"), False, "1", "6", False),
])
def test_select(cands, current, force, champion, challenger, moved):
    d = select(cands, P, current, force)
    assert (d.champion, d.challenger, d.moved) == (champion, challenger, moved), d.reason



def test_select_explains_every_decision_and_ranks_by_metric_then_tie_breaks_then_newest():
    """Every path's reason and ranking, by hand; the defaults (force=False) as a caller gets them."""
    from dtl.tracking.promotion import Decision

    d = select([c(1, 0.8), c(2, 0.9), c(3, 0.9, acc=0.1)], P)
    assert d == Decision("3", "2", True, "no champion yet", ["3", "2", "1"])  # acc breaks the tie
    assert select([c(1, 0.9)], P, c(1, 0.9)) == Decision("1", None, False, "the champion is still the best candidate", ["1"])
    assert select([c(1, 0.4)], P, c(7, 0.9)) == Decision(
        "7", None, False, "no candidate has val_macro_f1 meeting min_value=0.5", [])
    assert select([], P) == Decision(None, None, False, "no candidate has val_macro_f1 meeting min_value=0.5", [])
    assert select([c(2, 0.8, acc=0.5)], P, c(1, 0.8, acc=0.9)) == Decision(  # worse on the tie-break: kept
        "1", "2", False, "best candidate v2 is worse than champion v1 on val_macro_f1 over the same data "
        "(use --force to move anyway)", ["2"])
    assert select([c(2, 0.8, acc=0.5)], P, c(1, 0.8, acc=0.9), force=True) == Decision("2", None, True, "forced", ["2"])
    assert select([c(2, 0.95)], P, c(1, 0.9)) == Decision("2", None, True, "better than the champion", ["2"])
    assert select([c(2, 0.6, digest="d2")], P, c(1, 0.9)) == Decision(
        "2", None, True, "champion was trained on other data (digest, split protocol or masking differs)", ["2"])
    demo = Candidate("4", {"val_macro_f1": 0.99}, "demo", True)
    assert select([demo], P, c(1, 0.7)) == Decision("1", None, False, "v4 was trained on the synthetic demo data; it "
                                                    "never replaces champion v1, trained on real data (use --force to "
                                                    "move anyway)", ["4"])


def test_select_boundaries_missing_metrics_and_the_direction_of_each_tie_break():
    at = Policy(metric="val_macro_f1", min_value=0.5, tie_breaks=())
    assert select([c(1, 0.5)], at).champion == "1"  # min_value itself is good enough
    loss = Policy(metric="val_loss", direction="minimize", min_value=0.3, tie_breaks=("val_accuracy",))
    v = [Candidate("1", {"val_loss": 0.3, "val_accuracy": 0.2}), Candidate("2", {"val_loss": 0.3, "val_accuracy": 0.7}),
         Candidate("3", {"val_loss": 0.31, "val_accuracy": 0.99}), Candidate("4", {"val_accuracy": 0.99})]
    assert select(v, loss).ranked == ["2", "1"]  # <= 0.3 passes; the tie-break's own direction (higher accuracy)
    by_loss = Policy(metric="val_macro_f1", tie_breaks=("val_loss", "val_accuracy"))
    w = [Candidate("1", {"val_macro_f1": 0.8, "val_loss": 0.2}), Candidate("2", {"val_macro_f1": 0.8, "val_loss": 0.5}),
         Candidate("3", {"val_macro_f1": 0.8}), Candidate("5", {"val_macro_f1": float("nan")})]
    assert select(w, by_loss).ranked == ["1", "2", "3"]  # lower loss first; a missing tie-break last; NaN is out
    calibrated = Candidate("9", {"val_macro_f1": 0.4}, "d1", calibrated_from="1")  # below min_value: supersedes nothing
    assert select([c(1, 0.8), calibrated], P).ranked == ["1"]
    good = Candidate("9", {"val_macro_f1": 0.8}, "d1", calibrated_from="1")
    assert select([c(1, 0.8), good], P).ranked == ["9"]

def test_minimize_direction():
    p = Policy(metric="val_loss", direction="minimize", tie_breaks=())
    d = select([Candidate("1", {"val_loss": 0.3}), Candidate("2", {"val_loss": 0.2})], p)
    assert d.champion == "2"


def reference_ranking(cands: list[Candidate], policy: Policy) -> list[str]:
    """Written from the promotion rules, not from ``_key``: a candidate needs the policy metric (not NaN)
    within ``min_value``; then the metric in the policy's direction, each tie-break in its own direction
    (lower is better for losses and ECE), a missing or NaN value after any present one, and last the
    newest version first."""
    names = (policy.metric, *policy.tie_breaks)
    lower = [policy.direction == "minimize"] + [n.endswith(("_loss", "_ece")) for n in policy.tie_breaks]

    def value(cand, name):
        x = cand.metrics.get(name)
        return None if x is None or math.isnan(x) else x

    def eligible(cand):
        x = value(cand, policy.metric)
        if x is None or policy.min_value is None:
            return x is not None
        return x <= policy.min_value if policy.direction == "minimize" else x >= policy.min_value

    def before(a, b):  # negative: a ranks before b
        for name, low in zip(names, lower):
            x, y = value(a, name), value(b, name)
            if x == y:
                continue
            if x is None or y is None:
                return 1 if x is None else -1
            return -1 if (x < y) == low else 1
        return int(b.version) - int(a.version)

    return [x.version for x in sorted(filter(eligible, cands), key=functools.cmp_to_key(before))]


POLICIES = [
    Policy(metric="val_macro_f1", tie_breaks=("val_loss", "val_accuracy")),
    Policy(metric="val_macro_f1", min_value=0.2, tie_breaks=("val_accuracy", "val_ece")),
    Policy(metric="val_loss", direction="minimize", tie_breaks=("val_accuracy", "val_ece")),
    Policy(metric="val_loss", direction="minimize", min_value=0.2, tie_breaks=("val_ece", "val_balanced_accuracy")),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.metric}-{p.min_value}-{'-'.join(p.tie_breaks)}")
def test_select_ranks_like_a_metric_by_metric_comparison_with_missing_values_last(policy):
    """Random small registries on a coarse grid (so ties are common), some metrics missing or NaN."""
    rng = random.Random(7)
    names = ["val_macro_f1", "val_loss", "val_accuracy", "val_ece", "val_balanced_accuracy"]
    for _ in range(150):
        cands = []
        for version in rng.sample(range(1, 40), rng.randint(1, 6)):
            metrics = {}
            for name in names:
                r = rng.random()
                if r < 0.7:
                    metrics[name] = rng.choice([0.1, 0.2, 0.3])
                elif r < 0.8:
                    metrics[name] = float("nan")
            cands.append(Candidate(str(version), metrics))
        expected = reference_ranking(cands, policy)
        d = select(cands, policy)
        assert d.ranked == expected, cands
        assert (d.champion, d.challenger, d.moved) == (
            (expected[0], expected[1] if len(expected) > 1 else None, True) if expected else (None, None, False))


def test_select_ranks_and_filters_the_policy_metric_in_the_policy_direction():
    """A policy built in code may minimize a metric whose name does not say so (``val_error``): the
    ranking follows the policy's direction, as the ``min_value`` cut-off does."""
    p = Policy(metric="val_error", direction="minimize", min_value=0.3, tie_breaks=())
    cands = [Candidate("1", {"val_error": 0.2}), Candidate("2", {"val_error": 0.1}), Candidate("3", {"val_error": 0.5})]
    assert select(cands, p) == Decision("2", "1", True, "no champion yet", ["2", "1"])


@pytest.mark.parametrize("cands, current", [
    ([c(2, 0.95)], c(1, 0.9)),                                   # better on the metric
    ([c(2, 0.8, acc=0.9)], c(1, 0.8, acc=0.5)),                  # equal on the metric, better on the tie-break
    ([c(2, 0.8, acc=0.5)], c(1, 0.8, acc=0.5)),                  # a full tie: the newer version
    ([c(2, 0.6, digest="d2")], c(1, 0.9)),                       # worse, but on other data
    ([Candidate("3", {"val_macro_f1": 0.8}, calibrated_from="1")], Candidate("1", {"val_macro_f1": 0.8})),
])
def test_force_changes_nothing_where_the_champion_would_move_anyway(cands, current):
    """The reason says "forced" only when forcing overrode the rule; a move that needs no force keeps its reason."""
    unforced = select(cands, P, current)
    assert unforced.moved and unforced.reason != "forced"
    assert select(cands, P, current, force=True) == unforced


def test_a_forced_demo_model_over_a_real_champion_is_explained_by_the_data_not_by_force():
    demo = Candidate("4", {"val_macro_f1": 0.6}, "demo", synthetic=True)
    assert select([demo], P, c(1, 0.9), force=True) == Decision(
        "4", None, True, "champion was trained on other data (digest, split protocol or masking differs)", ["4"])


def test_a_version_listed_twice_is_never_its_own_challenger():
    """The same version read twice from a listing: it becomes champion, and there is no challenger."""
    d = select([c(2, 0.95), c(2, 0.95)], P, c(1, 0.9))
    assert (d.champion, d.challenger, d.moved, d.reason) == ("2", None, True, "better than the champion")


def test_policy_file_validation(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("metric: val_accuracy\nbogus: 1\n")
    with pytest.raises(DTLError, match="unknown policy key"):
        load_policy(f)
    f.write_text("metric: val_accuracy\ndirection: up\n")
    with pytest.raises(DTLError, match="maximize or minimize"):
        load_policy(f)
    f.write_text("metric: val_accuracy\ntie_breaks: [val_macro_f1]\n")
    assert load_policy(f, "other").registered_model == "other"



def test_policy_errors_name_the_file_the_bad_value_and_the_fix(tmp_path):
    import re

    f = tmp_path / "p.yaml"

    def refused(text: str) -> str:
        f.write_text(text)
        with pytest.raises(DTLError) as e:
            load_policy(f)
        return str(e.value)

    with pytest.raises(DTLError, match=f"^promotion policy {re.escape(str(tmp_path / 'nope.yaml'))} does not exist$"):
        load_policy(tmp_path / "nope.yaml")
    assert refused("metric: test_macro_f1\n") == (
        f"{f}: metric='test_macro_f1' is not a validation metric. Promotion selects on validation "
        "(val_macro_f1, val_balanced_accuracy, val_loss, ...); selecting on test would make the "
        "test figures of the champion optimistic.")
    assert refused("metric: val_loss\ndirection: maximize\n") == (
        f"{f}: direction=maximize contradicts metric val_loss (lower is better); use direction: minimize or leave it out")
    assert refused("metric: val_accuracy\ndirection: minimize\n") == (
        f"{f}: direction=minimize contradicts metric val_accuracy (higher is better); "
        "use direction: maximize or leave it out")
    assert refused("tie_breaks: [val_accuracy, test_accuracy, loss]\n") == (
        f"{f}: tie_breaks ['test_accuracy', 'loss'] are not validation metrics")
    f.write_text("metric: val_loss\nmin_value: 0.3\ntie_breaks: [val_ece]\n")
    assert load_policy(f, "other") == Policy("other", "val_loss", "minimize", 0.3, ("val_ece",))

def test_the_repository_policy_file_is_read(tmp_path, monkeypatch):
    """registry/policy.yaml sets min_value 0.0 where the built-in default is None: only a policy
    read from the file has it. The default path is relative to the working directory."""
    from tests.conftest import ROOT

    assert Policy().min_value is None
    assert load_policy(ROOT / "registry" / "policy.yaml") == Policy(
        "all-dtl", "val_macro_f1", "maximize", 0.0, ("val_balanced_accuracy", "val_accuracy"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "policy.yaml").write_text("metric: val_loss\nmin_value: 0.25\ntie_breaks: []\n")
    assert load_policy("registry/policy.yaml") == Policy("all-dtl", "val_loss", "minimize", 0.25, ())


def test_comparison_pairs_and_paired_gains():
    import numpy as np
    import pandas as pd

    from dtl.report.results import comparison_pairs, paired_gains, seed_table

    df = pd.DataFrame([
        {"backbone": "r", "strategy": "double", "split_protocol": "near-duplicate-groups", "masked": "on"},
        {"backbone": "r", "strategy": "scratch", "split_protocol": "near-duplicate-groups", "masked": "on"},
        {"backbone": "r", "strategy": "double", "split_protocol": "image-level", "masked": "on"},
        {"backbone": "r", "strategy": "double", "split_protocol": "near-duplicate-groups", "masked": "off"},
        {"backbone": "e", "strategy": "scratch", "split_protocol": "near-duplicate-groups", "masked": "on"},
    ])
    assert sorted((w, i, j) for w, i, j in comparison_pairs(df)) == [
        ("double − scratch", 0, 1), ("masked − unmasked", 0, 3), ("near-duplicate-groups − image-level", 0, 2)]
    stain = pd.concat([df.assign(preprocessing="default"),
                       df.iloc[[0]].assign(preprocessing="hed=0.05")], ignore_index=True)
    assert ("hed=0.05 − default", 5, 0) in comparison_pairs(stain)
    assert not [p for p in comparison_pairs(stain) if p[1] == 5 and p[0] != "hed=0.05 − default"]
    rng = np.random.default_rng(0)
    n = 200
    label = rng.choice(["x", "y"], n)
    good = np.where(label == "x", 0.9, 0.1)
    noisy = rng.uniform(0, 1, n)

    def table(p_x, paths):
        return pd.DataFrame({"path": paths, "label": label[:len(paths)], "bootstrap_unit": paths,
                             "p_x": p_x[:len(paths)], "p_y": 1 - p_x[:len(paths)]})

    paths = [f"img{i}.jpg" for i in range(n)]
    g = paired_gains([("double − scratch", {"backbone": "r"}, table(good, paths), table(noisy, paths)),
                      ("same", {"backbone": "r"}, table(good, paths), table(good, paths[:120]))], n_boot=200)
    acc = g[(g["comparison"] == "double − scratch") & (g["metric"] == "test_accuracy")].iloc[0]
    assert acc["gain"] > 0.3 and acc["ci_low"] > 0 and acc["ci_excludes_0"] == "yes" and acc["test_items"] == n
    same = g[g["comparison"] == "same"]
    assert (same["gain"] == 0).all() and (same["ci_excludes_0"] == "no").all() and (same["test_items"] == 120).all()
    full = df.assign(phase2_val_accuracy=0.5, test_accuracy=0.9, init="scratch", test_accuracy_ci="")
    assert list(seed_table(full).columns) == ["Model", "Phase-2 Accuracy", "Eval Acc", "Notes"]


def test_preprocessing_label_names_only_the_stain_settings_off_their_default():
    from dtl import config
    from dtl.train.phases import preprocessing_label

    assert preprocessing_label(config.load(["demo"]), "phase2") == "default"
    cfg = config.load(["demo"], ["phase2.data.colour=greyscale", "augment.hed=0.05"])
    assert preprocessing_label(cfg, "phase2") == "colour=greyscale, hed=0.05"
    assert preprocessing_label(cfg, "phase1") == "hed=0.05"


@pytest.mark.slow  # over 5 s on 2 cores: out of the fast tier (docs/testing.md)
def test_studies_that_differ_only_in_stain_settings_are_separate_rows(workspace):
    """Two phase-2 studies of one backbone, strategy, data and masking, one trained with stain
    augmentation: both are rows of the results table (the latest of each kind), and a study from
    before the tag existed reads as ``default``."""
    from dtl.report.results import collect
    from dtl.tracking import adapter, schema

    t = adapter.connect(f"sqlite:///{workspace}/mlflow.db", "rows")
    base = {schema.ROLE: schema.Role.STUDY, schema.PHASE: "phase2", schema.BACKBONE: "test_resnet",
            schema.STRATEGY: "double", schema.DATA_DIGEST: "d1", schema.ANNOTATION_MASK: "on"}
    for i, extra in enumerate(({}, {schema.PREPROCESSING: "hed=0.05"}, {schema.PREPROCESSING: "default"})):
        r = t.client.create_run(t.experiment_id, tags={**base, **extra})
        t.client.log_metric(r.info.run_id, "test_accuracy", 0.5 + i / 10)
        t.client.set_terminated(r.info.run_id)
    df = collect(t, "all-dtl")
    assert sorted(zip(df["preprocessing"], df["test_accuracy"])) == [("default", 0.7), ("hed=0.05", 0.6)]


def test_a_class_in_fewer_groups_than_folds_gives_fewer_folds_not_a_crash():
    import numpy as np

    from dtl.data.baselines import fit_baseline

    y = np.array([0] * 30 + [1] * 6)
    groups = np.array(list(range(30)) + [99] * 6)  # class 1: one near-duplicate cluster (or one patient)
    out = fit_baseline("colour", np.random.default_rng(0).normal(size=(36, 3)), y, groups, "group")
    assert [e["folds"] for e in out] == [1, 1] and all(e["accuracy"] == e["majority"] for e in out)


@pytest.mark.slow  # over 5 s on 2 cores: out of the fast tier (docs/testing.md)
def test_each_model_is_compared_with_the_baseline_of_its_own_data_and_input_and_flagged_only_below_it(workspace):
    """Two datasets and a greyscale input: each model row is paired with exactly the baseline of
    its digest, split, masking and input colour (stain augmentation is not input); a model that
    beats its baseline is not flagged, one that equals it is; a study from before the
    preprocessing tag reads its label from its params."""
    import numpy as np
    import pandas as pd

    from dtl.report.results import SHORTCUT_FLAG, baseline_gains, baseline_pairs, collect
    from dtl.tracking import adapter, schema

    t = adapter.connect(f"sqlite:///{workspace}/mlflow.db", "pairs")
    rng = np.random.default_rng(0)
    labels = rng.choice(["a", "b"], 300)
    paths = [f"x/{i}.png" for i in range(300)]

    def run(tags, correct, params=None):
        r = t.client.create_run(t.experiment_id, tags={schema.PHASE: "phase2", schema.ANNOTATION_MASK: "on",
                                                       schema.SPLIT_PROTOCOL: "near-duplicate-groups", **tags})
        ok = rng.random(300) < correct
        p_a = np.where((labels == "a") == ok, 0.9, 0.1)
        table = pd.DataFrame({"path": paths, "label": labels, "bootstrap_unit": paths, "p_a": p_a, "p_b": 1 - p_a})
        adapter.Run(t, r.info.run_id).log_table(table, "evaluation/predictions_test.csv")
        t.client.log_metric(r.info.run_id, "test_accuracy", float(ok.mean()))
        for k, v in (params or {}).items():
            t.client.log_param(r.info.run_id, k, v)
        t.client.set_terminated(r.info.run_id)
        return r.info.run_id

    study = {schema.ROLE: schema.Role.STUDY, schema.STRATEGY: "double"}
    base = {schema.ROLE: schema.Role.BASELINE, schema.STRATEGY: "linear", schema.BACKBONE: "baseline:colour"}
    b1 = run({**base, schema.DATA_DIGEST: "d1", schema.PREPROCESSING: "default"}, 0.7)
    run({**base, schema.DATA_DIGEST: "d2", schema.PREPROCESSING: "default"}, 0.99)
    bg = run({**base, schema.DATA_DIGEST: "d1", schema.PREPROCESSING: "colour=greyscale"}, 0.6)
    good = run({**study, schema.BACKBONE: "good", schema.DATA_DIGEST: "d1", schema.PREPROCESSING: "default"}, 0.97)
    same = run({**study, schema.BACKBONE: "same", schema.DATA_DIGEST: "d1"}, 0.7, {"augment.hed": "0.05"})
    grey = run({**study, schema.BACKBONE: "grey", schema.DATA_DIGEST: "d1",
                schema.PREPROCESSING: "colour=greyscale, hed=0.05"}, 0.97)
    df = collect(t, "all-dtl")
    assert df.set_index("backbone").loc["same", "preprocessing"] == "hed=0.05"  # from its params
    paired = {df.loc[i, "phase2_run"]: df.loc[j, "phase2_run"] for _, i, j in baseline_pairs(df)}
    assert paired == {good: b1, same: b1, grey: bg}
    gains, flagged = baseline_gains(df, n_boot=200)
    flags = flagged.set_index("backbone")["flags"].fillna("")
    assert SHORTCUT_FLAG in flags["same"] and SHORTCUT_FLAG not in flags["good"] and SHORTCUT_FLAG not in flags["grey"]
    assert len(gains[gains["metric"] == "test_accuracy"]) == 3


def _logged(t, name="test_resnet-double"):
    """A study run with a logged model of one file and its val/test metrics linked to it (no training)."""
    from dtl.tracking.adapter import start_run
    from dtl.tracking.registry import model_description, new_logged_model

    run = start_run(t, "phase2-double-test_resnet", {"dtl.role": "study", "backbone": "test_resnet", "strategy": "double",
                                                      "phase": "phase2", "init": "phase1:abc", "split_protocol": "group",
                                                      "annotation_mask": "on", "data_digest": "d1", "best.lr_head": "0.003"})
    run.log_metrics({"best_value": 0.7, "n_complete": 2})  # study bookkeeping: never the model's
    params, tags = model_description(t.client.get_run(run.id).data.tags)
    model_id = new_logged_model(run, name, params, tags)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "MLmodel").write_text("flavors: {}\n")
        t.client.log_model_artifacts(model_id, d)
    t.client.finalize_logged_model(model_id, "READY")
    run.log_metrics({"val_macro_f1": 0.8, "val_accuracy": 0.8}, model_id=model_id, dataset=("phase2-val", "dv"))
    run.log_metrics({"test_accuracy": 0.75}, model_id=model_id, dataset=("phase2-test", "dt"))
    run.log_metrics({"cpu_utilization_percentage": 50.0})  # as the system-metrics thread does, after a model load
    return run, model_id


def test_a_logged_model_is_named_described_and_linked_to_its_version(workspace):
    """The Models page: name, params, tags, only evaluation metrics, and MLflow's own link to the version."""
    import json

    from dtl.tracking.adapter import connect
    from dtl.tracking.registry import register

    t = connect(experiment="ui")
    run, model_id = _logged(t)
    v = register(t, "all-dtl", f"models:/{model_id}", run.id, {"metric.val_macro_f1": 0.8})
    m = t.client.get_logged_model(model_id)
    assert m.name == "test_resnet-double" and m.experiment_id == t.experiment_id and m.source_run_id == run.id
    assert m.params["lr_head"] == "0.003" and m.params["strategy"] == "double" and m.params["split_protocol"] == "group"
    for k in ("strategy", "init", "split_protocol", "annotation_mask", "data_digest"):
        assert k in m.tags, k
    assert {x.key for x in m.metrics} == {"val_macro_f1", "val_accuracy", "test_accuracy"}
    assert {x.dataset_name for x in m.metrics} == {"phase2-val", "phase2-test"}
    assert json.loads(m.tags["mlflow.modelVersions"]) == [{"name": "all-dtl", "version": int(v)}]
    mv = t.client.get_model_version("all-dtl", v)
    assert mv.source == f"models:/{model_id}" and mv.run_id == run.id
    assert model_id in {o.model_id for o in t.client.get_run(run.id).outputs.model_outputs}


def test_a_calibrated_model_is_a_new_version_and_the_aliases_move_by_policy(workspace):
    """A registered version never changes: the temperature goes into a new logged model and version."""
    from pathlib import Path

    import mlflow

    from dtl.tracking.adapter import connect
    from dtl.tracking.promotion import promote
    from dtl.tracking.registry import register, register_calibrated

    t = connect(experiment="ui")
    run, model_id = _logged(t)
    v1 = register(t, "all-dtl", f"models:/{model_id}", run.id, {"metric.val_macro_f1": 0.8, "data_digest": "d1"})
    assert promote(t, Policy(), cards_dir=None).champion == v1
    before = t.client.get_model_version("all-dtl", v1)
    mv = t.client.get_model_version_by_alias("all-dtl", "champion")
    v2 = register_calibrated(t, mv, model_id, {"dtl/calibration.json": '{"temperature": 1.5}'}, 1.5)
    assert v2 != v1 and register_calibrated(t, mv, model_id, {"dtl/calibration.json": "{}"}, 1.5) == v2  # once
    new = t.client.get_model_version("all-dtl", v2)
    assert new.tags["calibrated_from"] == v1 and new.tags["calibration.temperature"] == "1.5"
    assert new.tags["metric.val_macro_f1"] == "0.8" and new.source != before.source
    after = t.client.get_model_version("all-dtl", v1)
    assert (after.source, after.tags, after.last_updated_timestamp) == (before.source, before.tags,
                                                                         before.last_updated_timestamp)
    files = lambda uri: {a.path for a in mlflow.artifacts.list_artifacts(uri)}  # noqa: E731
    assert "dtl" not in files(f"models:/{model_id}")  # the explained model is left as registered
    cal_id = new.source.removeprefix("models:/")
    cal = t.client.get_logged_model(cal_id)
    assert cal.name == "test_resnet-double-calibrated" and cal.experiment_id == t.experiment_id
    assert cal.tags["calibrated_from"] == f"all-dtl/{v1}" and cal.params == t.client.get_logged_model(model_id).params
    assert {x.key for x in cal.metrics} == {"val_macro_f1", "val_accuracy", "test_accuracy"}
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{cal_id}"))
    assert (local / "dtl" / "calibration.json").read_text() == '{"temperature": 1.5}' and (local / "MLmodel").is_file()
    d = promote(t, Policy(), cards_dir=None)  # same val metrics: the newest version (calibrated) by the tie rule
    assert d.champion == v2 and str(t.client.get_model_version_by_alias("all-dtl", "champion").version) == v2


def test_a_job_opens_its_experiment_on_training_runs_with_the_comparison_view(workspace):
    import json

    from dtl.tracking.adapter import connect
    from dtl.tracking.ui import prepare_experiment, view_url

    t = connect(experiment="ui")
    prepare_experiment(t)
    tags = t.client.get_experiment(t.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.comparison"])
    assert {"tags.`backbone`", "tags.`strategy`", "metrics.`test_accuracy`", "attributes.`Models`"} <= set(view["selectedColumns"])
    assert view_url(t) == f"#/experiments/{t.experiment_id}/runs?viewStateShareKey=comparison"


def test_a_calibrated_copy_supersedes_its_source_and_leaves_the_challenger_alone():
    """The copy has its source's metrics: it replaces the source in the ranking (champion), and the
    runner-up stays the other model, not the champion's uncalibrated twin."""
    cands = [Candidate("1", {"val_macro_f1": 0.8}), Candidate("2", {"val_macro_f1": 0.7}),
             Candidate("3", {"val_macro_f1": 0.8}, calibrated_from="1")]
    d = select(cands, P, current=cands[0])
    assert (d.champion, d.challenger, d.ranked) == ("3", "2", ["3", "2"]) and d.moved
    assert d.reason == "the temperature-scaled copy of champion v1"
    # a copy that cannot compete (no policy metric) leaves its source in
    d = select([cands[0], cands[1], Candidate("3", {}, calibrated_from="1")], P, current=cands[0])
    assert (d.champion, d.challenger, d.moved) == ("1", "2", False)


def test_explain_calibrates_once_promotes_within_the_explained_data_and_relinks_only_scale_free_metrics(workspace):
    """store_temperature: one calibrated copy per version (a rerun fitting another T finds it); the
    aliases move among versions of the explained version's own data (a better model trained without
    the annotation mask stays out, as under `dtl main`); ECE and AUC are the calibrated model's own."""
    import dataclasses
    import tempfile
    from pathlib import Path
    from types import SimpleNamespace

    from dtl.config import Config
    from dtl.explain.job import store_temperature
    from dtl.tracking.adapter import connect
    from dtl.tracking.promotion import promote
    from dtl.tracking.registry import register

    t = connect(experiment="ui")
    run, model_id = _logged(t)
    run.log_metrics({"test_ece": 0.2, "test_roc_auc": 0.9}, model_id=model_id, dataset=("phase2-test", "dt"))
    with tempfile.TemporaryDirectory() as d:  # a pyfunc that applies a stored temperature
        (Path(d) / "MLmodel").write_text(f"flavors:\n  python_function:\n    config: {{apply_temperature: true}}\n"
                                         f"model_id: {model_id}\n")
        t.client.log_model_artifacts(model_id, d)
    same = {"data_digest": "d1", "split_protocol": "group", "annotation_mask": "on"}
    v1 = register(t, "all-dtl", f"models:/{model_id}", run.id, {**same, "metric.val_macro_f1": 0.8, "metric.test_ece": 0.2})
    run2, other = _logged(t, "test_resnet-double-unmasked")
    v2 = register(t, "all-dtl", f"models:/{other}", run2.id, {**same, "annotation_mask": "off", "metric.val_macro_f1": 0.9})
    assert promote(t, Policy(), filter_tags=same, cards_dir=None).champion == v1
    mv = t.client.get_model_version_by_alias("all-dtl", "champion")
    calib = {"temperature": 1.5, "val_errors": 5, "val_ece_before": 0.3, "val_ece_after": 0.05,
             "test_ece_before": 0.2, "test_ece_after": 0.04, "test_ece_after_ci_low": 0.02, "test_ece_after_ci_high": 0.07}
    cfg = Config()
    cfg = dataclasses.replace(cfg, cards_dir=str(workspace / "cards"),
                              explain=dataclasses.replace(cfg.explain, store_temperature="on"))
    target = SimpleNamespace(version=mv, model_id=model_id)
    stored, where = store_temperature(t, cfg, target, calib, "test")
    assert stored, where
    champ = t.client.get_model_version_by_alias("all-dtl", "champion")
    assert champ.tags["calibrated_from"] == v1 and champ.version != v2, where  # not the unmasked v2
    assert champ.tags["metric.test_ece"] == "0.04" and champ.tags["metric.val_macro_f1"] == "0.8"
    cal = t.client.get_logged_model(champ.source.removeprefix("models:/"))
    got = {m.key: m.value for m in cal.metrics}
    assert got["test_ece"] == 0.04 and got["test_ece_ci_low"] == 0.02 and "test_roc_auc" not in got
    assert got["test_accuracy"] == 0.75
    import mlflow
    import yaml

    mlmodel = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(f"{cal.artifact_location}/MLmodel")).read_text())
    assert mlmodel["model_id"] == cal.model_id != model_id  # loading the copy makes the copy the active model
    again = store_temperature(t, cfg, SimpleNamespace(version=t.client.get_model_version("all-dtl", v1), model_id=model_id),
                              {**calib, "temperature": 1.7}, "test")
    n = [v for v in t.client.search_model_versions("name='all-dtl'") if v.tags.get("calibrated_from") == v1]
    assert again[0] and len(n) == 1  # one copy per version, whatever T the rerun fits


def test_the_variants_of_one_backbone_have_their_own_model_names():
    """On the real table's Models page the mask-off, HED and greyscale variants of test_resnet were
    all called 'test_resnet-double'; each now says what sets it apart, the recipe's row stays short."""
    from dtl.tracking import schema
    from dtl.tracking.registry import model_name

    row = {schema.BACKBONE: "test_resnet", schema.STRATEGY: "double", schema.ANNOTATION_MASK: "on",
           schema.PREPROCESSING: "default"}
    assert model_name(row) == "test_resnet-double"
    assert model_name({**row, schema.ANNOTATION_MASK: "off"}) == "test_resnet-double-unmasked"
    assert model_name({**row, schema.PREPROCESSING: "hed=0.2"}) == "test_resnet-double-hed_0.2"
    assert model_name({**row, schema.PREPROCESSING: "colour=greyscale, hed=0.05"}) == \
        "test_resnet-double-colour_greyscale-hed_0.05"
    assert model_name({schema.BACKBONE: "test_resnet", schema.STRATEGY: "scratch"}) == "test_resnet-scratch"


def test_the_workspace_store_is_what_mlflow_creates_in_that_folder(workspace, tmp_path_factory, monkeypatch):
    """``workspace`` copies one migrated store instead of migrating each (tests/conftest.py): the copy
    must be the store MLflow itself makes in that folder, at the same schema, its Default experiment
    writing under the folder, not under the template's."""
    import sqlite3

    import mlflow

    other = tmp_path_factory.mktemp("made-by-mlflow")
    monkeypatch.chdir(other)
    made = mlflow.MlflowClient(f"sqlite:///{other}/mlflow.db").search_experiments()
    monkeypatch.chdir(workspace)
    copied = mlflow.MlflowClient(f"sqlite:///{workspace}/mlflow.db").search_experiments()
    assert [(e.experiment_id, e.name) for e in copied] == [(e.experiment_id, e.name) for e in made] == [("0", "Default")]
    assert made[0].artifact_location == str(other.resolve() / "mlruns" / "0")
    assert copied[0].artifact_location == str(workspace.resolve() / "mlruns" / "0")

    def schema(db):
        # MLflow's own migrations write a table's constraints in a per-process order (two fresh stores
        # differ there), so each statement is compared as its set of lines
        con = sqlite3.connect(db)
        try:
            return (con.execute("SELECT version_num FROM alembic_version").fetchall(),
                    {(name, frozenset(line.strip().rstrip(",") for line in (sql or "").splitlines()))
                     for name, sql in con.execute("SELECT name, sql FROM sqlite_master")})
        finally:
            con.close()

    (v_copy, t_copy), (v_made, t_made) = schema(workspace / "mlflow.db"), schema(other / "mlflow.db")
    assert v_copy == v_made and len(v_copy) == 1
    assert t_copy == t_made and len(t_copy) > 20
    with mlflow.start_run(experiment_id="0") as run:
        mlflow.log_text("x", "a.txt")
    assert (workspace / "mlruns" / "0" / run.info.run_id / "artifacts" / "a.txt").is_file()
