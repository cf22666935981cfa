"""The fuzzy head: the maths against hand computations and scikit-fuzzy's control system,
and (slow) the tracked job end to end: nested resumable study, registered pyfunc model."""

import math
from pathlib import Path

import numpy as np
import pytest

from dtl.evaluation.stats import paired_difference
from dtl.fuzzy import core as fuzzy


def blobs(n=600, classes=4, dim=48, seed=0):
    """Features shaped like a trained network's: one well separated cloud per class."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim))
    y = rng.integers(0, classes, n)
    return rng.normal(size=(n, dim)) + means[y], y


def two_rule_system(tnorm="min", n_points=20001):
    """One input (identity projection), rules R1 centred at 0 and R2 at 2, both sigma 1;
    R1: class a HIGH (1), class b LOW (1); R2: a HIGH 0.5 / LOW 0.5, b HIGH (1)."""
    return fuzzy.FuzzySystem(["a", "b"], mean=np.zeros(1), projection=np.eye(1), centres=np.array([[0.0], [2.0]]),
                             sigmas=np.ones((2, 1)), weights=np.array([[1.0, 0.0], [0.5, 1.0]]), tnorm=tnorm,
                             n_points=n_points)


def centroid_by_hand(a, b):
    """Centroid of max(min(u, a), min(1 - u, b)) on [0, 1] for b <= a, b <= 1/2: the output is
    b on [0, b], u on [b, a] and a on [a, 1]; integrate each piece."""
    area = b * b + (a * a - b * b) / 2 + a * (1 - a)
    moment = b * b * b / 2 + (a ** 3 - b ** 3) / 3 + a * (1 - a * a) / 2
    return moment / area


def test_mamdani_output_equals_a_hand_computed_two_rule_example():
    fs = two_rule_system()
    z = 0.5
    mu1, mu2 = math.exp(-(z - 0) ** 2 / 2), math.exp(-(z - 2) ** 2 / 2)  # 0.8825, 0.3247
    # class a: HIGH clipped at max(mu1 * 1, mu2 * 0.5) = mu1, LOW at max(mu1 * 0, mu2 * 0.5)
    expected_a = centroid_by_hand(mu1, 0.5 * mu2)
    # class b: HIGH at max(0, mu2) = mu2, LOW at max(mu1, 0) = mu1: the mirror image of the same shape
    expected_b = 1 - centroid_by_hand(mu1, mu2)
    out, strength = fs.infer(np.array([[z]]))
    assert out[0] == pytest.approx([expected_a, expected_b], abs=1e-4)
    assert strength[0] == pytest.approx(mu1)
    assert out[0, 0] > 0.5 > out[0, 1]  # near R1's centre: a wins


def test_product_tnorm_multiplies_the_memberships():
    fs = fuzzy.FuzzySystem(["a"], np.zeros(2), np.eye(2), np.array([[0.0, 0.0]]), np.ones((1, 2)),
                           np.array([[1.0]]), tnorm="product")
    act = fs.rule_activations(np.array([[1.0, 2.0]]))
    assert act[0, 0] == pytest.approx(math.exp(-0.5) * math.exp(-2.0))
    fs.tnorm = "min"
    assert fs.rule_activations(np.array([[1.0, 2.0]]))[0, 0] == pytest.approx(math.exp(-2.0))


def test_no_firing_gives_zero_outputs_and_uniform_probabilities():
    fs = two_rule_system(n_points=101)
    probs, strength = fs.predict_proba(np.array([[1e6]]))
    assert strength[0] == 0.0 and probs[0] == pytest.approx([0.5, 0.5])


def test_membership_functions_from_cmeans_centres_cover_the_train_features():
    x, y = blobs()
    for tnorm in fuzzy.TNORMS:
        fs = fuzzy.fit(x, y, list("abcd"), k=4, n_clusters=6, m=1.5, tnorm=tnorm, seed=0)
        z = fs.project(x)
        per_dim = fuzzy.fuzz.gaussmf(z[:, None, :], fs.centres[None], fs.sigmas[None])  # (n, J, k)
        # every train point, in every dimension, lies inside some cluster's membership function
        assert per_dim.max(1).min() >= fuzzy.COVER * (1 - 1e-9)
        # and fires some rule (the whole antecedent) above the floor: its own cluster's
        assert fs.cover_floor == (fuzzy.COVER if tnorm == "min" else fuzzy.COVER ** 4)
        assert fs.infer(x)[1].min() >= fs.cover_floor * (1 - 1e-9)
        assert fs.centres.shape == (6, 4) and (fs.sigmas >= fuzzy.SIGMA_FLOOR).all()


def test_projection_is_fitted_on_train_only_and_keeps_the_components_in_proportion():
    x, y = blobs()
    fs = fuzzy.fit(x, y, list("abcd"), k=5, n_clusters=4)
    z = fs.project(x)
    assert z.mean(0) == pytest.approx(np.zeros(5), abs=1e-9)
    sd = z.std(0, ddof=1)
    assert sd[0] == pytest.approx(1.0) and (np.diff(sd) <= 1e-12).all()  # not whitened: minor components stay small
    assert not np.allclose(fs.project(x + 100.0).mean(0), 0)  # new data: the train statistics, not refitted


def test_consequents_follow_cluster_class_cooccurrence():
    x, y = blobs(classes=3)
    fs = fuzzy.fit(x, y, list("abc"), k=3, n_clusters=3, m=1.5)
    assert fs.weights.max(1) == pytest.approx(np.ones(3))
    dominant = fs.weights.argmax(1)
    assert sorted(dominant) == [0, 1, 2]  # one cluster per well separated class
    probs, _ = fs.predict_proba(x)
    assert (probs.argmax(1) == y).mean() > 0.95


def test_batch_inference_equals_per_sample_inference():
    x, y = blobs(n=300)
    for tnorm in fuzzy.TNORMS:
        fs = fuzzy.fit(x, y, list("abcd"), k=4, n_clusters=5, m=1.6, tnorm=tnorm, seed=1)
        batch, strength = fs.infer(x[:60])
        single = [fs.infer(x[i:i + 1]) for i in range(60)]
        # equal up to float rounding (BLAS sums a batch matmul in another order than a single row)
        np.testing.assert_allclose(batch, np.concatenate([s[0] for s in single]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(strength, np.concatenate([s[1] for s in single]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tnorm", fuzzy.TNORMS)
def test_vectorised_inference_matches_the_skfuzzy_control_system(tnorm):
    x, y = blobs(n=300)
    fs = fuzzy.fit(x, y, list("abcd"), k=3, n_clusters=4, m=1.5, tnorm=tnorm)
    ours, _ = fs.infer(x[:40])
    ref = fuzzy.control_infer(fuzzy.control_system(fs), fs, fs.project(x[:40]))
    assert np.abs(ours - ref).max() < 5e-3  # both discretise: the output universe, skfuzzy also the inputs
    assert (ours.argmax(1) == ref.argmax(1)).all()


def test_system_round_trips_through_json():
    x, y = blobs(n=200)
    fs = fuzzy.fit(x, y, list("abcd"), k=3, n_clusters=4, tnorm="product")
    back = fuzzy.FuzzySystem.from_dict(__import__("json").loads(__import__("json").dumps(fs.to_dict())))
    assert np.array_equal(back.infer(x)[0], fs.infer(x)[0]) and back.tnorm == "product"
    assert fs.rules_text().count("\n") == 3 and "THEN a is HIGH" in fs.rules_text()


def test_risk_coverage_and_abstention_metrics():
    correct = np.array([1, 1, 0, 1, 0], bool)
    conf = np.array([0.9, 0.8, 0.1, 0.7, 0.2])  # the two errors are the least confident
    cov, risk = fuzzy.risk_coverage(correct, conf)
    assert cov == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert risk == pytest.approx([0, 0, 0, 0.25, 0.4])
    m = fuzzy.abstention_metrics(correct, conf, "x")
    assert m["x_abstain_auroc"] == 1.0 and m["x_selective_accuracy_50"] == 1.0
    assert m["x_aurc"] == pytest.approx(np.mean([0, 0, 0, 0.25, 0.4]))
    assert fuzzy.abstention_metrics(correct, -conf, "x")["x_abstain_auroc"] == 0.0


def test_paired_bootstrap_difference_and_interval():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    good = np.where(rng.random(400) < 0.9, y, 1 - y)
    bad = np.where(rng.random(400) < 0.6, y, 1 - y)

    def acc(t, p):
        return float((t == p).mean())

    r = paired_difference(y, good, bad, acc, n=300, seed=0)
    assert r["diff"] == pytest.approx(acc(y, good) - acc(y, bad))
    assert 0 < r["ci_low"] < r["diff"] < r["ci_high"] and r["p_le_0"] == 0.0
    same = paired_difference(y, good, good, acc, n=50)
    assert same["diff"] == same["ci_low"] == same["ci_high"] == 0.0
    grouped = paired_difference(y, good, bad, acc, n=300, seed=0, groups=np.arange(400) // 4)
    assert grouped["diff"] == r["diff"] and grouped["ci_low"] != r["ci_low"]
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference(y, good[:10], bad, acc)


# ----------------------------------------------------------------------------- end to end (slow)

@pytest.fixture(scope="module")
def fuzzy_done(tmp_path_factory, cache_dir):
    """A tiny demo `main` with the fuzzy head switched on (test_resnet, 1 trial per phase, 2 epochs, 3 fuzzy
    trials); then the fuzzy job called again on its phase-2 model, as `dtl fuzzy` would (a resume)."""
    from dtl import config, pipeline
    from dtl.fuzzy.job import run_fuzzy
    from dtl.tracking.adapter import connect
    from tests.conftest import demo_overrides, module_workspace

    with module_workspace(tmp_path_factory.mktemp("fuzzy")) as tmp:
        cfg = config.load(["demo"], demo_overrides(cache_dir, tmp, cards_dir=str(tmp / "cards"), **{
            "phase1.n_trials": 1, "phase2.n_trials": 1, "fuzzy.n_trials": 3, "fuzzy.enabled": "true"}))
        res = pipeline.main(cfg, report=False)
        t = connect(cfg.tracking_uri, cfg.experiment)
        p2 = res.studies[("phase2", "double", "test_resnet")]
        yield tmp, cfg, t, p2, run_fuzzy(cfg, t, p2.run_id)


@pytest.mark.slow
def test_fuzzy_study_is_nested_under_the_phase2_study_and_resumes(fuzzy_done):
    import optuna

    from dtl.fuzzy.job import run_fuzzy
    from dtl.tracking.adapter import find_runs

    tmp, cfg, t, p2, out = fuzzy_done
    run = t.client.get_run(out.run_id)
    assert run.data.tags["mlflow.parentRunId"] == p2.run_id and run.info.status == "FINISHED"
    assert run.data.tags["dtl.study"] == f"{p2.study_name}.fuzzy.t{p2.best_trial}"
    trials = find_runs(t, f"tags.`mlflow.parentRunId` = '{out.run_id}'")
    assert len(trials) == 3 and {r.data.tags["dtl.role"] for r in trials} == {"fuzzy-trial"}
    assert all("val_macro_f1" in r.data.metrics for r in trials)
    for k in ("test_fuzzy_accuracy", "test_softmax_accuracy", "test_diff_macro_f1_ci_low", "segmented_fuzzy_macro_f1",
              "blur_2_diff_accuracy", "jpeg_1_fuzzy_abstain_auroc", "test_softmax_ece", "train_coverage"):
        assert k in run.data.metrics, k
    assert run.data.metrics["train_coverage"] == 1.0  # every train image fires its own cluster's rule (cover_floor)
    # rerun, this time from the registered softmax model: same phase-2 run, so the same study; nothing new
    again = run_fuzzy(cfg, t, "models:/all-dtl@champion")
    assert again.run_id == out.run_id and again.registered == out.registered == "all-dtl-fuzzy/1"
    assert len(find_runs(t, f"tags.`mlflow.parentRunId` = '{out.run_id}'")) == 3
    study = optuna.load_study(study_name=again.study, storage=cfg.tune.storage)
    assert len(study.trials) == 3
    assert len(find_runs(t, "tags.`dtl.role` = 'fuzzy-study'")) == 1


@pytest.mark.slow
def test_fuzzy_pyfunc_round_trip_through_the_registry(fuzzy_done):
    import mlflow
    import pandas as pd

    from dtl.train.phases import dataset

    tmp, cfg, t, p2, out = fuzzy_done
    mv = t.client.get_model_version("all-dtl-fuzzy", "1")
    assert mv.tags["head"] == "fuzzy" and mv.tags["phase2_run"] == p2.run_id
    assert "fuzzy Mamdani head" in mv.description and "NOT for diagnosis" in mv.description
    model = mlflow.pyfunc.load_model("models:/all-dtl-fuzzy/1", model_config={"allow_paths": True})
    ds = dataset(cfg, "phase2")
    test = ds.split("test")
    pred = model.predict(pd.DataFrame({"image": [str(ds.root / p) for p in test["path"]]}))
    assert list(pred.columns) == ["class", "p_Benign", "p_Early", "p_Pre", "p_Pro", "firing_strength"]
    assert np.allclose(pred.filter(like="p_").sum(1), 1.0, atol=1e-5)
    assert ((pred["firing_strength"] >= 0) & (pred["firing_strength"] <= 1)).all()
    # the served model decodes the files itself, yet scores exactly what the job measured on the test split
    acc = float((pred["class"].to_numpy() == test["label"].to_numpy()).mean())
    assert acc == pytest.approx(t.client.get_run(out.run_id).data.metrics["test_fuzzy_accuracy"], abs=1e-9)
    one = model.predict({"image": [np.asarray(__import__("PIL").Image.open(ds.root / test["path"][0]).convert("RGB"))]})
    assert one["class"][0] == pred["class"][0]


@pytest.mark.slow
def test_report_has_the_fuzzy_vs_softmax_section(fuzzy_done):
    from dtl.report import results as report

    tmp, cfg, t, p2, out = fuzzy_done
    d = report.build(t, tmp / "report", cfg.registered_model)
    md = (d / "results.md").read_text()
    assert "## Fuzzy vs softmax" in md and "cross-variant (Segmented)" in md and "JPEG q=20" in md  # robustness severity 2
    assert "95% CI" in md and "acc at 80% coverage" in md and ("does not beat softmax" in md or "see the table" in md)
    assert (d / "fuzzy_risk_coverage.png").stat().st_size > 5000 and "Fuzzy vs softmax" in (d / "report.html").read_text()


@pytest.mark.slow
def test_dtl_fuzzy_cli_resumes_the_finished_study(fuzzy_done):
    import os
    import subprocess

    from tests.conftest import PYTHON, demo_overrides

    tmp, cfg, t, p2, out = fuzzy_done
    o = [a for x in demo_overrides(cfg.cache_dir, tmp, **{"fuzzy.n_trials": 3}) for a in ("-o", x)]
    p = subprocess.run([PYTHON, "-m", "dtl", "fuzzy", "--config", "demo", *o], capture_output=True, text=True,
                       env={**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking_uri or os.environ["MLFLOW_TRACKING_URI"]},
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"run {out.run_id}" in p.stdout and "-> all-dtl-fuzzy/1" in p.stdout


@pytest.mark.slow
def test_fuzzy_model_behind_mlflow_models_serve(fuzzy_done):
    """The registered fuzzy model behind the real `mlflow models serve`: class, probabilities, firing strength."""
    import base64

    import mlflow
    import requests

    from tests.conftest import mlflow_serve

    tmp, cfg, t, p2, out = fuzzy_done
    img = sorted((Path(cfg.cache_dir) / "demo" / "aria" / "Original" / "Pro").glob("*.jpg"))[0]
    local = mlflow.pyfunc.load_model("models:/all-dtl-fuzzy/1", model_config={"allow_paths": True}).predict(
        {"image": [str(img)]}).iloc[0]
    with mlflow_serve("models:/all-dtl-fuzzy/1", tmp) as url:
        r = requests.post(f"{url}/invocations", timeout=60,
                          json={"dataframe_records": [{"image": base64.b64encode(img.read_bytes()).decode()}]})
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        assert pred["class"] == local["class"] and pred["firing_strength"] == pytest.approx(local["firing_strength"])
        assert sum(pred[f"p_{c}"] for c in ("Benign", "Early", "Pre", "Pro")) == pytest.approx(1, abs=1e-4)
        bad = requests.post(f"{url}/invocations", json={"dataframe_records": [{"image": "bm90IGFuIGltYWdl"}]}, timeout=60)
        assert bad.status_code == 400 and "not a readable image" in bad.text
        path = requests.post(f"{url}/invocations", json={"dataframe_records": [{"image": str(img)}]}, timeout=60)
        assert path.status_code == 400 and "file paths are not read" in path.text  # same input policy as softmax


@pytest.mark.slow
def test_fuzzy_refuses_a_source_that_is_not_a_matching_phase2_model(fuzzy_done):
    from dtl import DTLError
    from dtl.fuzzy.job import run_fuzzy
    from dtl.tracking.adapter import find_run

    tmp, cfg, t, p2, out = fuzzy_done
    p1 = find_run(t, {"dtl.role": "study", "phase": "phase1"})
    for source in (p1.id, out.run_id, "models:/all-dtl-fuzzy/1"):  # phase-1 study, fuzzy study, fuzzy model
        with pytest.raises(DTLError, match="does not lead to a phase-2 study run"):
            run_fuzzy(cfg, t, source)
    with pytest.raises(DTLError, match="is not a run of"):
        run_fuzzy(cfg, t, "0123456789abcdef")


@pytest.mark.slow
def test_dtl_fuzzy_without_phase2_runs_says_what_to_run_first(workspace, cache_dir):
    import subprocess

    from tests.conftest import PYTHON, demo_overrides

    o = [a for x in demo_overrides(cache_dir, workspace) for a in ("-o", x)]
    p = subprocess.run([PYTHON, "-m", "dtl", "fuzzy", "--config", "demo", *o], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "no finished double-transfer phase-2 study" in p.stderr and "dtl main" in p.stderr


@pytest.mark.slow
def test_the_fuzzy_model_is_a_named_logged_model_of_the_jobs_experiment(fuzzy_done):
    """`Model.log` without a model id put the fuzzy model in MLflow's active (Default) experiment."""
    tmp, cfg, t, p2, out = fuzzy_done
    models = {m.name: m for m in t.client.search_logged_models([t.experiment_id])}
    assert set(models) == {"test_resnet-double", "test_resnet-fuzzy"}, set(models)
    fz = models["test_resnet-fuzzy"]
    assert fz.source_run_id == out.run_id and fz.tags["head"] == "fuzzy" and fz.tags["data_digest"]
    # the settings of its row, as the CNN's logged model has them (masking was missing)
    cnn = models["test_resnet-double"]
    for k in ("strategy", "init", "split_protocol", "annotation_mask", "data_digest"):
        assert fz.tags.get(k) == cnn.tags.get(k) and fz.tags.get(k), k
    best = {k: str(v) for k, v in out.best_params.items()}
    assert best and all(fz.params[k] == v for k, v in best.items()) and fz.params["strategy"] == "double", fz.params
    assert not t.client.search_logged_models(["0"]), "a logged model in MLflow's Default experiment"
    mv = t.client.get_model_version(out.registered.split("/")[0], out.registered.split("/")[1])
    assert mv.source == f"models:/{fz.model_id}"
