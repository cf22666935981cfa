"""The whole pipeline, tiny, on CPU: tune both phases, evaluate, register, promote, report;
then load the champion back and predict as a user would."""

import os
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image

from dtl import config, pipeline
from dtl.tracking.adapter import connect
from tests.conftest import (
    PYTHON,
    ROOT,
    assert_champion_serves_its_test_predictions,
    demo_overrides,
    mlflow_serve,
    module_workspace,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def done(tmp_path_factory, cache_dir):
    with module_workspace(tmp_path_factory.mktemp("pipeline")) as tmp:
        cfg = config.load(["demo"], demo_overrides(cache_dir, tmp, cards_dir=str(tmp / "cards")))
        yield tmp, cfg, pipeline.main(cfg)


def test_main_registers_promotes_and_reports(done):
    tmp, cfg, res = done
    t = connect(cfg.tracking_uri, cfg.experiment)
    assert res.versions == {"test_resnet": "1"} and res.champion == "1"
    mv = t.client.get_model_version_by_alias("all-dtl", "champion")
    for tag in ("phase1_run", "phase2_run", "data_digest", "metric.val_macro_f1", "metric.test_accuracy"):
        assert mv.tags.get(tag), tag
    # study parent runs + nested trial runs, per-epoch curves, tags, AMP setting on every run
    runs = mlflow.search_runs([t.experiment_id], output_format="list")
    studies = [r for r in runs if r.data.tags.get("dtl.role") == "study"]
    trials = [r for r in runs if r.data.tags.get("dtl.role") == "trial"]
    assert {r.data.tags["phase"] for r in studies} == {"phase1", "phase2"}
    # studies are top-level rows of the runs table (a nested run shows only under an expanded parent),
    # linked to their pipeline run by a tag and the run description
    pipeline_runs = [r.info.run_id for r in runs if r.data.tags.get("dtl.role") == "pipeline"]
    for s in studies:
        assert "mlflow.parentRunId" not in s.data.tags and s.data.tags["dtl.pipeline_run"] in pipeline_runs
        assert s.data.tags["dtl.pipeline_run"] in s.data.tags["mlflow.note.content"]
    # the Optuna studies name their objective and link back to their MLflow run
    for s in studies:
        st = optuna.load_study(study_name=s.data.tags["dtl.study"], storage=cfg.tune.storage)
        assert st.metric_names == [s.data.tags["monitor"]]
        assert st.user_attrs["mlflow_run_id"] == s.info.run_id and st.user_attrs["backbone"] == "test_resnet"
        assert st.user_attrs["phase"] == s.data.tags["phase"] and st.user_attrs["data_digest"] == s.data.tags["data_digest"]
    assert len(trials) == 4 and all(r.data.tags.get("mlflow.parentRunId") in {s.info.run_id for s in studies} for r in trials)
    for r in studies + trials:
        for tag in ("phase", "backbone", "precision", "init", "data_digest", "mlflow.source.git.commit"):
            assert tag in r.data.tags, (tag, r.data.tags.get("mlflow.runName"))
        assert r.data.params["precision"] == "auto"
    complete = [r for r in trials if r.data.tags["optuna.state"] == "COMPLETE"]
    hist = t.client.get_metric_history(complete[0].info.run_id, "val_macro_f1")
    assert [h.step for h in hist] == [0, 1]
    for k in ("train_loss", "val_loss", "val_accuracy", "lr"):
        assert k in complete[0].data.metrics
    p2 = next(r for r in studies if r.data.tags["phase"] == "phase2")
    assert p2.data.tags["split_protocol"] == "near-duplicate-groups" and p2.data.tags["init"].startswith("phase1:")
    for k in ("test_accuracy", "test_macro_f1_ci_low", "test_macro_f1_ci_high", "val_macro_f1", "n_complete"):
        assert k in p2.data.metrics
    arts = {a.path for a in t.client.list_artifacts(p2.info.run_id, "evaluation")}
    assert {"evaluation/confusion_test.png", "evaluation/confusion_test.json", "evaluation/confusion_val.png",
            "evaluation/predictions_test.csv"} <= arts
    assert {"data/phase2_manifest.csv", "data/phase2_audit.json"} <= {a.path for a in t.client.list_artifacts(p2.info.run_id, "data")}
    assert len(t.client.get_run(p2.info.run_id).inputs.dataset_inputs) == 3
    assert not [r for r in runs if r.info.status == "RUNNING"]
    # model card written for the champion
    card_md = (tmp / "cards" / "all-dtl-v1.md").read_text()
    assert card_md.count("NOT for diagnosis") == 1
    assert "| annotation mask | bottom-right" in card_md and "never over REST" in card_md
    card = __import__("json").loads((tmp / "cards" / "all-dtl-v1.json").read_text())
    assert card["classes"] == ["Benign", "Early", "Pre", "Pro"] and card["input"]["size"] == 64
    assert card["data"]["phase2"]["split_protocol"] == "near-duplicate-groups" and card["lineage"]["phase1_run"]
    assert mv.tags["annotation_mask"] == "on" and card["input"]["mask"]["corner"] == "bottom-right"
    # report: markdown + csv with one row per backbone
    df = pd.read_csv(tmp / "report" / "results.csv")
    assert [b for b in df["backbone"] if not b.startswith("baseline:")] == ["test_resnet"]
    for col in ("phase1_val_macro_f1", "phase2_val_accuracy", "test_accuracy", "test_macro_f1", "trials", "pruned",
                "best_params", "registered_version", "alias"):
        assert col in df.columns
    assert df.loc[df["backbone"] == "test_resnet", "alias"].item() == "champion" and (tmp / "report" / "report.html").stat().st_size > 10_000


def test_rerun_resumes_without_new_trials_or_versions(done, cache_dir):
    tmp, cfg, res = done
    again = pipeline.main(cfg)
    t = connect(cfg.tracking_uri, cfg.experiment)
    trials = mlflow.search_runs([t.experiment_id], "tags.`dtl.role` = 'trial'", output_format="list")
    assert len(trials) == 4
    assert again.versions == res.versions
    assert len(t.client.search_model_versions("name='all-dtl'")) == 1
    assert len(mlflow.search_runs([t.experiment_id], "tags.`dtl.role` = 'baseline'", output_format="list")) == 1


def test_the_shortcut_baseline_is_a_run_a_row_a_gain_and_a_flag(done):
    """The strongest shortcut baseline is fitted on train and scored on the models' own test items,
    logged as a top-level ``baseline`` run; it is a row of the table; each model gets its paired gap
    to it, and is flagged exactly where that gap's CI is not above 0 (table, report text, card)."""
    from dtl.report.results import SHORTCUT_FLAG
    from dtl.tracking import schema

    tmp, cfg, res = done
    t = connect(cfg.tracking_uri, cfg.experiment)
    (base,) = mlflow.search_runs([t.experiment_id], "tags.`dtl.role` = 'baseline'", output_format="list")
    assert base.info.status == "FINISHED" and base.data.tags["backbone"].startswith("baseline:")
    assert "mlflow.parentRunId" not in base.data.tags and base.data.tags["dtl.pipeline_run"] == res.run_id
    study = next(r for r in mlflow.search_runs([t.experiment_id], "tags.`dtl.role` = 'study' and tags.phase = 'phase2'",
                                               output_format="list"))
    load = lambda rid: pd.read_csv(mlflow.artifacts.download_artifacts(  # noqa: E731
        artifact_uri=f"runs:/{rid}/evaluation/predictions_test.csv"))
    pb, pm = load(base.info.run_id), load(study.info.run_id)
    assert sorted(pb["path"]) == sorted(pm["path"])  # the same test items
    assert base.data.metrics["test_accuracy"] == pytest.approx((pb["predicted"] == pb["label"]).mean())
    df = pd.read_csv(tmp / "report" / "results.csv").fillna("")
    row = df[df["backbone"] == base.data.tags["backbone"]].iloc[0]
    assert row["init"].startswith("none") and row["test_accuracy"] == pytest.approx(base.data.metrics["test_accuracy"])
    mv = t.client.get_model_version_by_alias("all-dtl", "champion")
    assert mv.tags[schema.BASELINE_RUN] == base.info.run_id
    gap, lo, hi = (float(x) for x in mv.tags[schema.BASELINE_GAP].replace("[", "").replace("]", "").replace(",", "").split())
    assert lo <= gap <= hi and gap == pytest.approx(((pm["predicted"] == pm["label"]).mean() - (pb["predicted"] == pb["label"]).mean()), abs=1e-4)
    flagged = lo <= 0
    assert flagged  # the demo's 2-epoch model is far below the colour cast the demo paints per class
    assert mv.tags[schema.BASELINE_FLAG] == str(flagged).lower()
    model_row = df[df["backbone"] == "test_resnet"].iloc[0]
    assert (SHORTCUT_FLAG in model_row["flags"]) is flagged
    md = (tmp / "report" / "results.md").read_text()
    assert "## Beside the shortcut baseline" in md and (f"are {SHORTCUT_FLAG}" in md) is flagged
    card = (tmp / "cards" / "all-dtl-v1.md").read_text()
    assert mv.tags[schema.BASELINE_GAP] in card and ("FLAGGED: not shown" in card) is flagged


def test_registered_model_round_trip(done):
    tmp, cfg, res = done
    model = mlflow.pyfunc.load_model("models:/all-dtl@champion")
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 255, (3, 90, 70, 3), dtype=np.uint8)  # any size
    out = model.predict(batch)  # a bare N×H×W×3 uint8 array
    assert list(out.columns) == ["class", "p_Benign", "p_Early", "p_Pre", "p_Pro"] and len(out) == 3
    assert model.predict({"image": batch}).equals(out)
    sig = model.metadata.signature
    assert [c.name for c in sig.outputs.inputs] == ["class", "p_Benign", "p_Early", "p_Pre", "p_Pro"]
    assert model.metadata.saved_input_example_info is not None
    assert np.allclose(out.filter(like="p_").sum(1), 1.0, atol=1e-4)
    files = sorted((Path(cfg.cache_dir) / "demo" / "aria" / "Original" / "Pro").glob("*.jpg"))[:2]
    local = mlflow.pyfunc.load_model("models:/all-dtl@champion", model_config={"allow_paths": True})
    by_path = local.predict(pd.DataFrame({"image": [str(f) for f in files]}))
    arrays = model.predict(pd.DataFrame({"image": [np.asarray(Image.open(f).convert("RGB")) for f in files]}))
    assert np.allclose(by_path.filter(like="p_"), arrays.filter(like="p_"), atol=1e-5)
    # the logged input spec carries the annotation mask: images that differ only in the stamp agree
    a = rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)
    b = a.copy()
    b[64:, 60:] = (220, 20, 20)
    p = model.predict({"image": [a, b]}).filter(like="p_").to_numpy()
    assert np.allclose(p[0], p[1], atol=1e-6)
    net = mlflow.pytorch.load_model("models:/all-dtl@champion")
    import torch

    assert isinstance(net, torch.nn.Module) and net(torch.zeros(1, 3, 64, 64)).shape == (1, 4)
    assert_champion_serves_its_test_predictions(mlflow.MlflowClient(), Path(cfg.cache_dir) / "demo" / "aria" / "Original")


def test_predict_cli_names_bad_files_and_predicts_the_rest(done):
    tmp, cfg, res = done
    good = sorted((Path(cfg.cache_dir) / "demo" / "aria" / "Original" / "Early").glob("*.jpg"))[0]
    bad = tmp / "notes.txt"
    bad.write_text("not an image")
    p = subprocess.run([PYTHON, "-m", "dtl", "predict", str(good), str(bad), "--model", "models:/all-dtl@champion"],
                       capture_output=True, text=True, cwd=tmp, env={**os.environ})
    assert p.returncode == 1
    assert f"{good}: " in p.stdout and '"Benign"' in p.stdout
    assert str(bad) in p.stderr and "not a readable image" in p.stderr


def test_mlflow_models_serve_answers_a_rest_request_with_an_image(done):
    """The champion behind the real `mlflow models serve` process on 127.0.0.1."""
    import base64

    import requests

    tmp, cfg, res = done
    with mlflow_serve("models:/all-dtl@champion", tmp) as url:
        img = sorted((Path(cfg.cache_dir) / "demo" / "aria" / "Original" / "Pre").glob("*.jpg"))[0]
        body = {"dataframe_records": [{"image": base64.b64encode(img.read_bytes()).decode()}]}
        r = requests.post(f"{url}/invocations", json=body, timeout=60)
        assert r.status_code == 200, r.text
        pred = r.json()["predictions"][0]
        assert pred["class"] in ("Benign", "Early", "Pre", "Pro")
        assert abs(sum(pred[f"p_{c}"] for c in ("Benign", "Early", "Pre", "Pro")) - 1) < 1e-4
        bad = requests.post(f"{url}/invocations", json={"dataframe_records": [{"image": "bm90IGFuIGltYWdl"}]},
                            timeout=60)
        assert bad.status_code == 400 and "not a readable image" in bad.text


def test_promotion_never_downgrades_unless_forced_and_records_the_previous_champion(done):
    """On a registered model of its own (a copy of the champion, then a worse version on the same
    data): the module's `all-dtl` registry, which the other tests read, is never touched."""
    from dtl.tracking.policy import load_policy
    from dtl.tracking.promotion import promote

    tmp, cfg, res = done
    t = connect(cfg.tracking_uri, cfg.experiment)
    real = t.client.get_model_version_by_alias("all-dtl", "champion")
    name = "promotion-test"
    t.client.create_registered_model(name)
    champ = t.client.create_model_version(name, real.source, run_id=real.run_id, tags=real.tags)
    champ_v = str(champ.version)
    t.client.set_registered_model_alias(name, "champion", champ_v)
    same_data = {k: real.tags[k] for k in ("data_digest", "split_protocol", "annotation_mask")}
    worse = t.client.create_model_version(name, real.source, run_id=real.run_id, tags={
        "metric.val_macro_f1": "0.0001", **same_data, "pipeline_run": "other"})
    policy = load_policy(ROOT / "registry" / "policy.yaml", name)
    cards = tmp / "promotion-cards"
    d = promote(t, policy, {"pipeline_run": "other"}, cards_dir=cards)
    assert not d.moved and d.champion == champ_v and "worse" in d.reason
    assert str(t.client.get_model_version_by_alias(name, "champion").version) == champ_v
    d = promote(t, policy, {"pipeline_run": "other"}, force=True, cards_dir=cards)
    now = t.client.get_model_version_by_alias(name, "champion")
    assert d.moved and str(now.version) == str(worse.version)
    assert now.tags["dtl.previous_champion"] == champ_v
    assert (cards / f"{name}-v{worse.version}.json").exists()


def test_report_command_rebuilds_the_table_from_mlflow_and_logs_it(done):
    tmp, cfg, res = done
    out = tmp / "again"
    p = subprocess.run([PYTHON, "-m", "dtl", "report", "--out", str(out)], capture_output=True, text=True, cwd=tmp,
                       env={**os.environ})
    assert p.returncode == 0, p.stderr[-2000:]
    backbones = pd.read_csv(out / "results.csv")["backbone"].tolist()
    assert len(backbones) == 2 and backbones[0].startswith("baseline:") and backbones[1] == "test_resnet"
    assert "| Model | Phase-2 Accuracy | Eval Acc | Notes |" in (out / "results.md").read_text()
    prov = __import__("json").loads((out / "provenance.json").read_text())
    t0 = connect(cfg.tracking_uri, cfg.experiment)
    mains = mlflow.search_runs([t0.experiment_id], "tags.`dtl.job` = 'main'", order_by=["attributes.start_time DESC"],
                               output_format="list")
    assert prov["pipeline_run"] == mains[0].info.run_id  # the provenance the latest main logged is kept
    assert prov["report_command"].startswith("dtl report")
    assert prov["data"]["phase2"]["split_protocol"] == "near-duplicate-groups" and prov["wall_time_s"] > 0
    t = connect(cfg.tracking_uri, cfg.experiment)
    runs = mlflow.search_runs([t.experiment_id], "tags.`dtl.role` = 'report'", output_format="list")
    assert len(runs) == 1
    assert {"report/results.md", "report/report.html"} <= {a.path for a in t.client.list_artifacts(runs[0].info.run_id, "report")}


def test_phase2_alone_from_a_registered_model_uri(done):
    """`dtl phase2 --phase1 models:/all-dtl@champion`: backbone weights from a logged model."""
    tmp, cfg, res = done
    cfg2 = config.load(["demo"], [f"cache_dir={cfg.cache_dir}", f"work_dir={tmp}/runs2", f"tune.storage=sqlite:///{tmp}/o2.db",
                                  "backbones=[test_resnet]", "phase2.n_trials=1", "phase2.epochs=1", "bootstrap=20",
                                  "experiment=from-uri", f"cards_dir={tmp}/cards2"])
    out = pipeline.single_phase(cfg2, "phase2", "models:/all-dtl@champion")
    s = out["test_resnet"]
    run = mlflow.MlflowClient().get_run(s.run_id)
    assert run.data.tags["init"] == "phase1:models:/all-dtl@champion" and "test_accuracy" in run.data.metrics


def test_phase1_retrained_on_other_data_starts_a_new_phase2_study(workspace, cache_dir):
    """The phase-2 study is keyed by the content hash of the checkpoint it starts from: phase 1
    retrained on other data (another split seed) trains phase 2 anew, and the new version's
    lineage names the phase-1 run its weights really started from."""
    base = demo_overrides(cache_dir, workspace, **{"phase1.n_trials": 1, "phase2.n_trials": 1,
                                                   "cards_dir": str(workspace / "cards")})
    first = pipeline.main(config.load(["demo"], base), report=False)
    second = pipeline.main(config.load(["demo"], base + ["phase1.data.split_seed=7"]), report=False)
    p1a, p1b = first.studies[("phase1", "", "test_resnet")], second.studies[("phase1", "", "test_resnet")]
    p2a, p2b = first.studies[("phase2", "double", "test_resnet")], second.studies[("phase2", "double", "test_resnet")]
    assert p1a.run_id != p1b.run_id
    assert p2a.study_name != p2b.study_name and p2a.run_id != p2b.run_id
    t = connect(f"sqlite:///{workspace}/mlflow.db", "all-dtl-demo")
    assert t.client.get_run(p2b.run_id).data.metrics["n_complete"] == 1  # trained, not reopened
    va = t.client.get_model_version("all-dtl", first.versions["test_resnet"])
    vb = t.client.get_model_version("all-dtl", second.versions["test_resnet"])
    assert va.version != vb.version
    assert va.tags["phase1_run"] == p1a.run_id and vb.tags["phase1_run"] == p1b.run_id
    assert vb.tags["phase1_data_digest"] != va.tags["phase1_data_digest"]
    # the same command again reopens both studies: nothing retrains, no new version
    again = pipeline.main(config.load(["demo"], base + ["phase1.data.split_seed=7"]), report=False)
    assert again.studies[("phase2", "double", "test_resnet")].run_id == p2b.run_id
    assert again.versions["test_resnet"] == str(vb.version)


def test_final_repeats_retrain_the_best_parameters_with_other_seeds(workspace, cache_dir):
    cfg = config.load(["demo"], demo_overrides(cache_dir, workspace, **{
        "phase1.n_trials": 1, "phase2.n_trials": 1, "final.repeats": 3, "strategies": "[scratch]", "register_strategy": "scratch",
        "cards_dir": str(workspace / "cards")}))
    res = pipeline.main(cfg)
    s = res.studies[("phase2", "scratch", "test_resnet")]
    t = connect(cfg.tracking_uri, cfg.experiment)
    reps = mlflow.search_runs([t.experiment_id], "tags.`dtl.role` = 'repeat'", output_format="list")
    assert sorted(r.data.tags["dtl.repeat_seed"] for r in reps) == ["1", "2"]
    assert all(r.data.tags["mlflow.parentRunId"] == s.run_id and "test_accuracy" in r.data.metrics for r in reps)
    m = t.client.get_run(s.run_id).data.metrics
    accs = [m["test_accuracy"]] + [r.data.metrics["test_accuracy"] for r in reps]
    assert m["seeds_n"] == 3 and m["seeds_test_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert m["seeds_test_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert not list((workspace / "runs" / s.study_name).glob("repeat-*"))  # only metrics are kept
    df = pd.read_csv(workspace / "report" / "results.csv")
    row = df[df["backbone"] == "test_resnet"].iloc[0]
    assert row["test_accuracy_seeds"].endswith("(n=3)")
    # rerun: the repeats are found again, not retrained
    pipeline.main(cfg, report=False)
    assert len(mlflow.search_runs([t.experiment_id], "tags.`dtl.role` = 'repeat'", output_format="list")) == 2


def test_the_logged_models_are_named_described_and_linked_to_their_versions(done):
    """What the experiment's Models page lists: `<backbone>-<strategy>`, the best params and the
    row's settings, the row's tags, only evaluation metrics linked to their dataset, and the version."""
    import json

    tmp, cfg, res = done
    t = connect(cfg.tracking_uri, cfg.experiment)
    models = t.client.search_logged_models([t.experiment_id])
    assert [m.name for m in models] == ["test_resnet-double"]
    m = models[0]
    study = t.client.get_run(m.source_run_id).data
    best = {k.removeprefix("best."): v for k, v in study.tags.items() if k.startswith("best.")}
    assert best and all(m.params[k] == v for k, v in best.items())
    for k in ("backbone", "strategy", "init", "split_protocol", "annotation_mask"):
        assert m.params[k] == study.tags[k] and m.tags[k] == study.tags[k], k
    assert m.tags["data_digest"] == study.tags["data_digest"]
    keys = {x.key for x in m.metrics}
    assert "test_accuracy" in keys and all(k.startswith(("val_", "test_")) for k in keys), sorted(keys)
    assert {x.dataset_name for x in m.metrics} == {"phase2-val", "phase2-test"}
    assert json.loads(m.tags["mlflow.modelVersions"]) == [{"name": "all-dtl", "version": 1}]
