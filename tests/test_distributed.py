"""One trial trained data-parallel by torchrun with 2 processes on CPU (gloo); compile before the DDP wrap;
ranks draw disjoint shards (fast: the loader; slow: torchrun) and keep equal weights."""

import os
import subprocess
from pathlib import Path

import mlflow
import pytest

from dtl.train.weights import load_checkpoint
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

    from dtl.model.net import DTLNet, ModelSpec
    from dtl.train.phases import training_module

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


def _ids(loader) -> list[int]:
    return [int(v) for x, _ in loader for v in x[:, 0]]


@pytest.mark.parametrize("n, batch, drop_last", [(23, 4, False), (40, 8, True), (7, 16, False)])
def test_ranks_draw_disjoint_equal_shards_covering_the_epoch(n, batch, drop_last):
    """Item ids stored in the images: under world size 2 each rank's epoch is its own half of
    the same seeded permutation (same length, no item on both ranks), new every epoch."""
    import torch

    from dtl.data.cache import BatchLoader

    images = torch.arange(n).reshape(n, 1).repeat(1, 3)
    labels = torch.zeros(n, dtype=torch.long)

    def epoch(rank, world, e):
        loader = BatchLoader(images, labels, batch, torch.device("cpu"), True, seed=5, drop_last=drop_last,
                             shard=(rank, world))
        loader.set_epoch(e)
        return _ids(loader)

    for e in (0, 1):
        whole = epoch(0, 1, e)
        a, b = epoch(0, 2, e), epoch(1, 2, e)
        full = n // 2 // batch * batch if drop_last else n // 2
        assert len(a) == len(b) == full and not set(a) & set(b)
        if not drop_last:  # the two halves interleave the single-process order
            assert sorted(a + b) == sorted(whole[:2 * (n // 2)]) and a == whole[0:2 * (n // 2):2]
    assert epoch(0, 2, 0) != epoch(0, 2, 1)


def test_training_loaders_are_sharded_only_under_an_active_process_group(tmp_path, monkeypatch):
    import torch.distributed as dist

    from dtl.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.shard(True) == (0, 1)  # no process group yet: one process sees everything
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert distributed.active() and distributed.shard(True) == (1, 2) and distributed.shard(False) == (0, 1)
    finally:
        dist.destroy_process_group()


RANK_SCRIPT = """
import json, os, sys
import torch
from dtl.train import distributed
from dtl.data.cache import BatchLoader
from dtl.model.net import DTLNet, ModelSpec
from dtl.train.phases import training_module

distributed.init()
torch.manual_seed(distributed.rank())  # different initial weights per rank: DDP must broadcast rank 0's
net = DTLNet(ModelSpec("test_resnet", ("a", "b")))
model = training_module(net, False, torch.device("cpu"))
n = 48
images = torch.rand(n, 3, 32, 32)
images[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)  # the item id rides in one pixel
labels = torch.arange(n) % 2
loader = BatchLoader(images, labels, 8, torch.device("cpu"), True, seed=1, shard=distributed.shard(True))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
seen = []
for epoch in range(2):
    loader.set_epoch(epoch)
    for x, y in loader:
        seen += [int(v) for v in x[:, 0, 0, 0]]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
flat = torch.cat([p.detach().flatten() for p in net.parameters()])
json.dump({"seen": seen, "weights": flat[::97].tolist()}, open(sys.argv[1] + f"/rank{distributed.rank()}.json", "w"))
"""


@pytest.mark.slow
def test_ddp_ranks_train_disjoint_shards_and_keep_equal_weights(tmp_path):
    """torchrun with 2 CPU processes through the project's init, shard, BatchLoader and DDP wrap:
    each epoch the ranks see disjoint halves of the data, and after training their weights are
    the same (gradients averaged, rank 0's initial weights broadcast)."""
    import json

    import numpy as np

    (tmp_path / "rank_job.py").write_text(RANK_SCRIPT)
    torchrun = str(Path(PYTHON).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(tmp_path / "rank_job.py"), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for e in (0, 1):  # 24 items per rank per epoch
        a, b = r0["seen"][24 * e:24 * (e + 1)], r1["seen"][24 * e:24 * (e + 1)]
        assert len(a) == len(b) == 24 and not set(a) & set(b) and sorted(a + b) == list(range(48))
    assert np.allclose(r0["weights"], r1["weights"], atol=1e-6)
