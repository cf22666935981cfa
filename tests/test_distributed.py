"""One trial trained data-parallel by torchrun with 2 processes on CPU (gloo); compile before the DDP wrap."""

import os
import subprocess
from pathlib import Path

import mlflow
import pytest

from dtl.models import load_checkpoint
from tests.conftest import PYTHON, demo_overrides


@pytest.mark.slow
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


def test_compile_is_applied_before_the_ddp_wrap(tmp_path, monkeypatch):
    """`compile: true` under DDP: the wrapped module is the compiled net, not a plain copy."""
    import torch
    import torch.distributed as dist

    from dtl.models import DTLNet, ModelSpec
    from dtl.phases import training_module

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; one process group member is enough here
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        net = DTLNet(ModelSpec("test_resnet", ("a", "b")))
        model = training_module(net, True, torch.device("cpu"))
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel) and model.module is net
        assert net._compiled_call_impl is not None  # nn.Module.compile() in place
        assert list(net.state_dict()) == list(DTLNet(ModelSpec("test_resnet", ("a", "b"))).state_dict())
        plain = training_module(DTLNet(ModelSpec("test_resnet", ("a", "b"))), False, torch.device("cpu"))
        assert plain._compiled_call_impl is None
    finally:
        dist.destroy_process_group()
