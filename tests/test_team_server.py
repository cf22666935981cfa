"""Team setup: an MLflow tracking server with a PostgreSQL backend store and a local artifact
root, Optuna's RDB storage on the same PostgreSQL, two workers on one study.

Needs DTL_PG_URL=postgresql://user:pass@127.0.0.1:port (databases `mlflow` and `optuna`);
skips without a reachable server, fails instead when DTL_REQUIRE_POSTGRES=1 (.ci/run)."""

import os
import subprocess
from urllib.parse import urlparse

import mlflow
import pytest

from tests.conftest import PYTHON, clean_databases, demo_overrides, mlflow_server, postgres_url
from tests.test_concurrency import check_two_jobs, run_two_jobs, two_job_overrides

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture()
def server(workspace):
    pg = postgres_url()
    clean_databases(pg)
    with mlflow_server(workspace, f"{pg}/mlflow") as url:
        yield url, pg


def test_two_workers_on_one_postgres_study_through_the_tracking_server(server, workspace, cache_dir):
    url, pg = server
    password = urlparse(pg).password
    assert password, "DTL_PG_URL needs a password: this test checks that it never reaches a log or a param"
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    o = demo_overrides(cache_dir, workspace, **{"phase1.n_trials": 4, "phase2.n_trials": 2,
                                                "tune.storage": f"{pg}/optuna"})
    args = [PYTHON, "-m", "dtl", "phase1"] + [x for kv in o for x in ("-o", kv)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workspace, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert password not in err  # no password in the logs (the URL is in every worker's -o tune.storage)
    mlflow.set_tracking_uri(url)
    exp = mlflow.get_experiment_by_name("all-dtl-demo")
    trials = mlflow.search_runs([exp.experiment_id], "tags.`dtl.role` = 'trial'", output_format="list")
    numbers = sorted(int(r.data.tags["optuna.trial"]) for r in trials)
    assert numbers == list(range(len(numbers))) and 4 <= len(numbers) <= 5  # each trial run once, logged once
    studies = mlflow.search_runs([exp.experiment_id], "tags.`dtl.role` = 'study'", output_format="list")
    assert len(studies) == 1
    assert studies[0].data.params["tune.storage"] == pg.replace(f":{password}@", ":***@") + "/optuna"
    assert password not in str(studies[0].data.params) and password not in str(studies[0].data.tags)
    # the registry is shared: a main run through the same server registers and promotes
    main = subprocess.run([PYTHON, "-m", "dtl", "main"] + [x for kv in o for x in ("-o", kv)], capture_output=True,
                          text=True, cwd=workspace, env=env, timeout=900)
    assert main.returncode == 0, main.stderr[-3000:]
    assert password not in main.stdout + main.stderr
    client = mlflow.MlflowClient(url)
    assert client.get_model_version_by_alias("all-dtl", "champion").tags["backbone"] == "test_resnet"
    assert len(mlflow.search_runs([exp.experiment_id], "tags.`dtl.role` = 'trial' and tags.phase = 'phase1'",
                                  output_format="list")) == len(numbers)  # main resumed the finished study


def test_two_main_jobs_through_the_postgres_tracking_server(server, workspace, cache_dir):
    """tests/test_concurrency.py's two jobs, the second started while the first trains, on the team
    setup: MLflow behind the tracking server, Optuna on PostgreSQL."""
    url, pg = server
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    run_two_jobs(workspace, two_job_overrides(cache_dir, workspace, **{"tune.storage": f"{pg}/optuna"}), env, url)
    check_two_jobs(url, f"{pg}/optuna")


def test_jobs_starting_together_on_one_server_all_prepare_the_experiment(server):
    """Clean-clone CI: two phase-1 workers started together on the PostgreSQL server, one died in
    prepare_experiment with a unique-key error (both inserted the shared-view tag). Here 6 threads
    per fresh experiment prepare it at once, 4 experiments; every call returns and the tags hold
    the view."""
    import json
    import threading

    from mlflow import MlflowClient

    from dtl.tracking import schema
    from dtl.tracking.adapter import Tracking
    from dtl.tracking.ui import VIEW, prepare_experiment, view_state

    url, _ = server
    errors = []
    for k in range(4):
        exp_id = MlflowClient(url).create_experiment(f"race-{k}")
        gate = threading.Barrier(6)

        def job(exp_id=exp_id, gate=gate):
            t = Tracking(uri=url, client=MlflowClient(url), experiment_id=exp_id)
            gate.wait()
            try:
                prepare_experiment(t)
            except Exception as e:  # noqa: BLE001 - collected and reported below
                errors.append(repr(e)[:300])

        threads = [threading.Thread(target=job) for _ in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        tags = MlflowClient(url).get_experiment(exp_id).tags
        assert json.loads(tags[schema.SHARED_VIEW_PREFIX + VIEW]) == view_state()
        assert tags[schema.EXPERIMENT_KIND] == "custom_model_development"
    assert not errors, errors
