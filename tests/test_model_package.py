"""The served package (issue 21): models logged before the package redesign still load and give
the same probabilities, and a model logged today carries only ``dtl/model`` and the shims."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from dtl.model.net import DTLNet, ModelSpec
from dtl.tracking.logged import SHIPPED, save_fuzzy_model, save_model
from dtl.train.weights import resolve_input_spec

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "models-before-21.tar.gz"
CLASSES = ("Benign", "Early", "Pre", "Pro")


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    """The archive written by tests/fixtures/make_models_before_21.py with the code of 8f95605."""
    root = tmp_path_factory.mktemp("old")
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(root, filter="data")
    return root / "models-before-21"


def _expected(old: Path) -> tuple[np.ndarray, dict]:
    exp = json.loads((old / "expected.json").read_text())
    return np.load(old / "images.npy"), exp


def test_the_fixture_was_logged_by_the_old_layout(old):
    """A check on the fixture itself: the MLmodel files name the old loader modules, and the
    pickled network names the old class path; so the tests below exercise the shims."""
    assert "loader_module: dtl.serving" in (old / "softmax" / "MLmodel").read_text()
    assert "loader_module: dtl.fuzzy_serving" in (old / "fuzzy" / "MLmodel").read_text()
    assert (old / "softmax" / "code" / "dtl" / "registry.py").is_file()  # the whole old package travelled
    raw = (old / "softmax" / "data" / "model.pth").read_bytes()
    assert b"dtl.models" in raw and b"dtl.model.net" not in raw


def test_an_old_softmax_model_loads_and_predicts_as_it_did(old):
    imgs, exp = _expected(old)
    m = mlflow.pyfunc.load_model(str(old / "softmax"))
    out = m.predict({"image": list(imgs)})
    np.testing.assert_allclose(out[[f"p_{c}" for c in CLASSES]].to_numpy(), exp["softmax_probs"], rtol=1e-4, atol=1e-6)
    net = mlflow.pytorch.load_model(str(old / "softmax"))  # unpickles dtl.models.DTLNet: the shim
    assert isinstance(net, DTLNet) and net.spec.classes == CLASSES


def test_an_old_fuzzy_model_loads_and_predicts_as_it_did(old):
    imgs, exp = _expected(old)
    out = mlflow.pyfunc.load_model(str(old / "fuzzy")).predict({"image": list(imgs)})
    assert list(out["class"]) == exp["fuzzy"]["class"]
    np.testing.assert_allclose(out["firing_strength"], exp["fuzzy"]["firing_strength"], rtol=1e-3, atol=1e-12)  # float32: the sums' order follows the thread count


@pytest.mark.slow
def test_an_old_model_loads_in_a_fresh_process_from_its_own_code(old):
    """Outside this checkout (no dtl on the path) the old model imports the package it carries."""
    imgs, exp = _expected(old)
    script = ("import mlflow, numpy as np\n"
              f"m = mlflow.pyfunc.load_model({str(old / 'softmax')!r})\n"
              f"out = m.predict({{'image': list(np.load({str(old / 'images.npy')!r}))}})\n"
              "import dtl\nprint(out.iloc[:, 1:].to_numpy().tolist()); print(dtl.__file__)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=old, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(old)})
    assert p.returncode == 0, p.stderr[-3000:]
    probs, where = p.stdout.strip().splitlines()[-2:]
    np.testing.assert_allclose(json.loads(probs), exp["softmax_probs"], rtol=1e-4, atol=1e-6)
    assert where.startswith(str(old / "softmax" / "code" / "dtl"))


def _shipped(model_dir: Path) -> set[str]:
    code = model_dir / "code" / "dtl"
    return {p.relative_to(code).parts[0] for p in code.rglob("*") if "__pycache__" not in p.parts}


def test_a_model_logged_today_carries_only_the_served_package(tmp_path):
    torch.manual_seed(0)
    net = DTLNet(ModelSpec("test_efficientnet", CLASSES)).eval()
    meta = {"spec": net.spec.to_dict(), "input": resolve_input_spec("test_efficientnet", 32).to_dict()}
    save_model(tmp_path / "softmax", net, meta, np.zeros((32, 32, 3), np.uint8))
    assert _shipped(tmp_path / "softmax") == set(SHIPPED) == {"__init__.py", "model", "serving.py",
                                                               "fuzzy_serving.py", "models.py"}
    assert "loader_module: dtl.model.pyfunc" in (tmp_path / "softmax" / "MLmodel").read_text()
    lines = sum(len(p.read_text().splitlines()) for p in (tmp_path / "softmax" / "code").rglob("*.py"))
    assert lines < 1500, f"the served code grew to {lines} lines"
    reqs = (tmp_path / "softmax" / "requirements.txt").read_text()
    assert "tqdm" not in reqs and "scikit-fuzzy" not in reqs and "timm==" in reqs

    from dtl.fuzzy.core import fit

    rng = np.random.default_rng(0)
    fs = fit(rng.normal(size=(40, net.head.fc.in_features)), rng.integers(0, 4, 40), list(CLASSES), k=2,
             n_clusters=3, seed=0)
    save_fuzzy_model(tmp_path / "fuzzy", net, meta, fs, np.zeros((32, 32, 3), np.uint8), "# card\n")
    assert _shipped(tmp_path / "fuzzy") == set(SHIPPED)
    assert "scikit-fuzzy==" in (tmp_path / "fuzzy" / "requirements.txt").read_text()
    out = mlflow.pyfunc.load_model(str(tmp_path / "fuzzy")).predict(pd.DataFrame({"image": [np.zeros((20, 20, 3), np.uint8)]}))
    assert list(out.columns) == ["class", *[f"p_{c}" for c in CLASSES], "firing_strength"]
