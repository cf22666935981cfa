"""Kill `main` with SIGKILL at several points, rerun the same command each time: nothing lost,
nothing redone, nothing left RUNNING, no duplicate versions, a valid champion."""

import os
import subprocess
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from dtl.train.tune import make_storage
from tests.conftest import PYTHON, assert_champion_serves_its_test_predictions, demo_overrides, free_port, wait_for_http

pytestmark = pytest.mark.slow

KILL_POINTS = ["phase1:trial1:epoch0", "between_phases", "phase2:trial0:epoch1", "registration", "report"]


def test_main_survives_sigkill_at_every_stage(workspace, cache_dir):
    storage = f"sqlite:///{workspace}/optuna.db"
    o = demo_overrides(cache_dir, workspace, **{"tune.heartbeat_s": 1, "cards_dir": str(workspace / "cards")})
    cmd = [PYTHON, "-m", "dtl", "main"] + [x for kv in o for x in ("-o", kv)]
    values = {}
    for point in KILL_POINTS:
        env = {**os.environ, "DTL_KILL_AT": point, "DTL_KILL_MARKER": str(workspace / f"killed-{point}")}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=workspace, timeout=600)
        assert p.returncode == -9, (point, p.stderr[-2000:])
        for name in optuna.get_all_study_names(make_storage(storage, 1)):
            study = optuna.load_study(study_name=name, storage=make_storage(storage, 1))
            for t in study.trials:
                if t.state == TrialState.COMPLETE:
                    assert values.setdefault((name, t.number), t.value) == t.value  # never redone
        time.sleep(3.5)  # the killed trial's heartbeat goes stale (grace 3 s)
    final = subprocess.run(cmd, capture_output=True, text=True, cwd=workspace, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]

    for name in optuna.get_all_study_names(make_storage(storage, 1)):
        study = optuna.load_study(study_name=name, storage=make_storage(storage, 1))
        finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(finished) == 2, name
        assert not [t for t in study.trials if t.state == TrialState.RUNNING]
        for t in study.trials:
            if (name, t.number) in values:
                assert t.value == values[(name, t.number)]
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    exp = mlflow.get_experiment_by_name("all-dtl-demo")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    trials = [r for r in runs if r.data.tags.get("dtl.role") == "trial"]
    keys = [(r.data.tags["dtl.study"], r.data.tags["optuna.trial"]) for r in trials]
    assert len(keys) == len(set(keys))  # each trial logged once
    assert sum(r.info.status == "KILLED" for r in trials) == 2  # the two trials killed mid-way
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='all-dtl'")
    assert len(versions) == 1
    champ = client.get_model_version_by_alias("all-dtl", "champion")
    assert str(champ.version) == str(versions[0].version)
    assert_champion_serves_its_test_predictions(client, cache_dir / "demo" / "aria" / "Original")
    assert (workspace / "report" / "results.md").exists()


def test_nan_loss_fails_the_trial_cleanly_with_its_reason(workspace, cache_dir):
    from dtl import DTLError, config
    from dtl.tracking.adapter import connect
    from dtl.train.tune import run_study

    cfg = config.load(["demo"], demo_overrides(cache_dir, workspace, **{
        "phase1.n_trials": 1, "phase1.search": "[unfreeze]", "phase1.lr_head": 1e12, "phase1.lr_backbone": 1e12,
        "phase1.grad_clip": 0}))
    t = connect(cfg.tracking_uri, cfg.experiment)
    with pytest.raises(DTLError, match="no trial completed"):
        run_study(cfg, "phase1", "test_resnet", t)
    trials = mlflow.search_runs([t.experiment_id], "tags.`dtl.role` = 'trial'", output_format="list")
    assert trials and all(r.info.status == "FAILED" for r in trials)
    assert "NonFiniteLoss: training loss is nan" in trials[0].data.tags["dtl.fail_reason"]
    assert trials[0].data.tags["optuna.state"] == "FAIL"


def test_out_of_memory_fails_one_trial_and_the_study_continues(workspace, cache_dir, monkeypatch):
    from dtl import config
    from dtl.tracking.adapter import connect
    from dtl.train.tune import run_study

    monkeypatch.setenv("DTL_OOM_AT", "phase1:trial0")
    cfg = config.load(["demo"], demo_overrides(cache_dir, workspace))
    t = connect(cfg.tracking_uri, cfg.experiment)
    res = run_study(cfg, "phase1", "test_resnet", t)
    assert res.counts["fail"] == 1 and res.counts["complete"] + res.counts["pruned"] == 2
    failed = mlflow.search_runs([t.experiment_id], "tags.`optuna.state` = 'FAIL'", output_format="list")
    assert len(failed) == 1 and "OutOfMemoryError" in failed[0].data.tags["dtl.fail_reason"]
    assert res.best_trial != 0


def test_tracking_server_going_away_mid_run_then_rerun_resumes(workspace, cache_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_bin = os.path.join(os.path.dirname(PYTHON), "mlflow")

    def start_server():
        proc = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{workspace}/server.db",
                                 "--artifacts-destination", str(workspace / "art"), "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workspace)
        wait_for_http(url + "/health", proc)
        return proc

    server = start_server()
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    o = demo_overrides(cache_dir, workspace, **{"phase1.n_trials": 3, "phase1.epochs": 3})
    cmd = [PYTHON, "-m", "dtl", "phase1"] + [x for kv in o for x in ("-o", kv)]
    worker = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workspace, env=env)
    client = mlflow.MlflowClient(url)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until the second trial is under way, then take the server away
        exp = client.get_experiment_by_name("all-dtl-demo")
        if exp and len(client.search_runs([exp.experiment_id], "tags.`dtl.role` = 'trial'")) >= 2:
            break
        time.sleep(0.5)
    server.terminate()
    server.wait(timeout=30)
    out, err = worker.communicate(timeout=600)
    assert worker.returncode == 3, err[-3000:]
    assert "lost the MLflow tracking server" in err and "rerun the same command" in err
    assert list((workspace / "runs").glob("*/trial-*/last.pt"))  # local checkpoints kept
    server = start_server()
    try:
        again = subprocess.run(cmd, capture_output=True, text=True, cwd=workspace, env=env, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        storage = make_storage(f"sqlite:///{workspace}/optuna.db", 10)
        study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
        assert len([t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 3
        exp = client.get_experiment_by_name("all-dtl-demo")
        assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_command_run_ends_failed_with_its_reason_and_leaves_mlflow_runs_own_run_to_mlflow(tmp_path):
    """dtl evaluate / report / explain end their run FAILED (with dtl.fail_reason) when they fail,
    FINISHED when they do not; under `mlflow run` they tag MLflow's own run and leave ending it to MLflow."""
    from dataclasses import replace

    from dtl.tracking.adapter import command_run, connect, start_run

    t = connect(f"sqlite:///{tmp_path}/mlflow.db", "ends")
    with pytest.raises(ValueError), command_run(t, "evaluate-phase1", {"dtl.role": "evaluate"}) as run:
        raise ValueError("no such split")
    info = t.client.get_run(run.id)
    assert info.info.status == "FAILED" and info.data.tags["dtl.fail_reason"] == "ValueError: no such split"
    with command_run(t, "report", {"dtl.role": "report"}) as ok:
        pass
    assert t.client.get_run(ok.id).info.status == "FINISHED"
    outer = start_run(t, "mlflow-run", {})
    inside = replace(t, outer_run_id=outer.id)
    with pytest.raises(RuntimeError), command_run(inside, "report", {"dtl.role": "report"}) as run:
        raise RuntimeError("disk full")
    got = t.client.get_run(outer.id)
    assert run.id == outer.id and got.info.status == "RUNNING" and got.data.tags["dtl.role"] == "report"
    assert got.data.tags["dtl.fail_reason"] == "RuntimeError: disk full"
