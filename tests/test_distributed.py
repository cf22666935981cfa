"""One trial trained data-parallel by torchrun with 2 processes on CPU (gloo)."""

import os
import subprocess
from pathlib import Path

import mlflow
import pytest

from dtl.models import load_checkpoint
from tests.conftest import PYTHON, demo_overrides

pytestmark = pytest.mark.slow


def test_torchrun_two_processes_train_one_study(workspace, cache_dir):
    o = demo_overrides(cache_dir, workspace, **{"phase1.n_trials": 2, "phase1.epochs": 2, "device": "cpu"})
    torchrun = str(Path(PYTHON).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "dtl", "phase1"] + \
        [x for kv in o for x in ("-o", kv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=workspace, env=env, timeout=900)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    exp = mlflow.get_experiment_by_name("all-dtl-demo")
    trials = mlflow.search_runs([exp.experiment_id], "tags.`dtl.role` = 'trial'", output_format="list")
    assert len(trials) == 2 and all(r.data.tags["world_size"] == "2" for r in trials)  # logged by rank 0 only
    studies = mlflow.search_runs([exp.experiment_id], "tags.`dtl.role` = 'study'", output_format="list")
    assert len(studies) == 1 and "test_accuracy" in studies[0].data.metrics
    ckpts = list((workspace / "runs").glob("*/trial-*/best.pt"))
    assert len(ckpts) == 1 and load_checkpoint(ckpts[0])["meta"]["backbone"] == "test_resnet"
    assert not [r for r in mlflow.search_runs([exp.experiment_id], output_format="list") if r.info.status == "RUNNING"]
