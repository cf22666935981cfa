"""Two `dtl main` jobs on one store, the second started while the first trains: one model version
per study run, the aliases where the policy puts them, nothing left RUNNING, trial budgets held.

The SQLite variant runs here; the same two jobs through a PostgreSQL-backed tracking server are
in tests/test_team_server.py (they reuse :func:`run_two_jobs` and :func:`check_two_jobs`)."""

from __future__ import annotations

import os
import subprocess
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from dtl.tracking.policy import Policy
from dtl.tracking.promotion import _candidate, select
from dtl.train.tune import make_storage
from tests.conftest import PYTHON, demo_overrides

pytestmark = pytest.mark.slow

N_TRIALS = 3


def two_job_overrides(cache_dir, workspace, **extra) -> list[str]:
    """The demo recipe, small: one backbone, 3 trials of 2 epochs per study."""
    return demo_overrides(cache_dir, workspace, **{"phase1.n_trials": N_TRIALS,
                                                   "phase2.n_trials": N_TRIALS, "tune.heartbeat_s": 2,
                                                   "cards_dir": str(workspace / "cards"), **extra})


def _trial_running(client: mlflow.MlflowClient) -> bool:
    exp = client.get_experiment_by_name("all-dtl-demo")
    return bool(exp and client.search_runs([exp.experiment_id], "tags.`dtl.role` = 'trial' and "
                                           "attributes.status = 'RUNNING'", max_results=1))


def run_two_jobs(workspace, overrides: list[str], env: dict, tracking_uri: str) -> list[subprocess.CompletedProcess]:
    """Start `dtl main`, wait until its first trial trains, start a second identical job; both to the end."""
    cmd = [PYTHON, "-m", "dtl", "main"] + [x for kv in overrides for x in ("-o", kv)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workspace, env=env)
    client = mlflow.MlflowClient(tracking_uri)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not _trial_running(client):
        time.sleep(0.5)
    assert first.poll() is None, "the first job ended before a trial was seen training"
    second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workspace, env=env)
    out = []
    for p in (first, second):
        o, e = p.communicate(timeout=1500)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    for i, p in enumerate(out):
        assert p.returncode == 0, (i, p.stderr[-3000:])
    return out


def check_two_jobs(tracking_uri: str, storage_url: str, workers: int = 2) -> None:
    """What two jobs on one store must leave: no duplicate version of a study run, the aliases on
    the policy's choice, no run or trial RUNNING, each study's COMPLETE trials within the budget."""
    client = mlflow.MlflowClient(tracking_uri)
    versions = client.search_model_versions("name='all-dtl'")
    sources = [v.tags["phase2_run"] for v in versions]
    assert len(sources) == len(set(sources)) == 1, sorted((v.version, v.tags["phase2_run"]) for v in versions)
    champ = client.get_model_version_by_alias("all-dtl", "champion")
    policy = Policy(min_value=0.0)
    d = select([_candidate(v) for v in versions], policy)
    assert str(champ.version) == d.champion, (champ.version, d)
    exp = client.get_experiment_by_name("all-dtl-demo")
    running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert not running, [(r.info.run_name, r.data.tags.get("dtl.role")) for r in running]
    storage = make_storage(storage_url, 2)
    names = optuna.get_all_study_names(storage)
    assert len(names) == 2  # phase 1 and phase 2, shared by both jobs
    for name in names:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        assert not [t.number for t in trials if t.state == TrialState.RUNNING], name
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        # docs/concurrency.md: exact, except two workers starting the last trial in the same instant
        assert N_TRIALS <= complete <= N_TRIALS + workers - 1, (name, complete)


def test_two_main_jobs_on_one_sqlite_store(workspace, cache_dir):
    env = {**os.environ, "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    jobs = run_two_jobs(workspace, two_job_overrides(cache_dir, workspace), env, env["MLFLOW_TRACKING_URI"])
    check_two_jobs(env["MLFLOW_TRACKING_URI"], f"sqlite:///{workspace}/optuna.db")
    assert all("Traceback" not in j.stderr for j in jobs)
