"""Kill `main` with SIGKILL at several points, rerun the same command each time: nothing lost,
nothing redone, nothing left RUNNING, no duplicate versions, a valid champion."""

import os
import subprocess
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from dtl.tune import make_storage
from tests.conftest import PYTHON, demo_overrides

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
    assert mlflow.pyfunc.load_model("models:/all-dtl@champion") is not None
    assert (workspace / "report" / "results.md").exists()
