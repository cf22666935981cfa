"""Writing the logged models (called by ``mlflow.models.Model.log``): the softmax model with two
flavors (``pytorch`` and ``python_function``, loader :mod:`dtl.model.pyfunc`) and the fuzzy-head
model (loader :mod:`dtl.model.fuzzy`).

Each model carries its serving code in ``code/dtl``: exactly the :mod:`dtl.model` package, the
package's ``__init__`` and the re-export modules that models logged before the package redesign
name (``dtl.serving``, ``dtl.fuzzy_serving``, ``dtl.models``), and exact pins of what that code
imports (:data:`dtl.model.pyfunc.SERVING_DISTRIBUTIONS`). No checkout or ``dtl`` install is
needed to load it, and no training code travels with it.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.models.utils import _save_example
from mlflow.pyfunc import add_to_model
from mlflow.types.schema import ColSpec, Schema
from PIL import Image
from safetensors.torch import save_file

from dtl.model.decode import INPUT_COLUMN, InputPolicy
from dtl.model.fuzzy import SYSTEM_FILE, FuzzySystem
from dtl.model.pyfunc import DATA_DIR, OUTPUTS, pip_requirements

PACKAGE = Path(__file__).resolve().parent.parent  # the dtl/ folder
# What travels in code/dtl: the serving package and the modules older models' MLmodel files name.
SHIPPED = ("__init__.py", "model", "serving.py", "fuzzy_serving.py", "models.py")


@contextmanager
def serving_code():
    """A temporary ``dtl/`` folder holding only :data:`SHIPPED`, for ``code_paths``."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "dtl"
        root.mkdir()
        for name in SHIPPED:
            src = PACKAGE / name
            if src.is_dir():
                shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, root / name)
        yield str(root)


def signature_and_example(example_image: np.ndarray, classes: list[str]):
    """The output schema (class + one probability per class) and a base64-PNG input example.

    The signature deliberately has no input schema: MLflow would coerce a bare N×H×W×3 array
    into a 2-D DataFrame before the model sees it, and images of any size fit no tensor spec.
    The input example documents the format; ``ImageClassifier.predict`` validates every row."""

    buf = io.BytesIO()
    Image.fromarray(example_image).save(buf, format="PNG")
    example = pd.DataFrame({INPUT_COLUMN: [base64.b64encode(buf.getvalue()).decode()]})
    outputs = Schema([ColSpec("string", "class")] + [ColSpec("float", f"p_{c}") for c in classes])
    return ModelSignature(inputs=None, outputs=outputs), example


def save_model(path, net, meta: dict, example_image: np.ndarray, mlflow_model=None, **_ignored):
    """Write the two-flavor model to ``path`` (called by ``mlflow.models.Model.log``)."""
    path = Path(path)
    if mlflow_model is None:
        mlflow_model = Model()
    net = net.cpu().eval()
    # The pickled module serves mlflow.pytorch.load_model; the pyfunc path below never unpickles.
    # (MLflow warns about pickle on every save; the warning is about loading, which is the user's call.)

    log = logging.getLogger("mlflow.pytorch")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with serving_code() as code:  # the serving package travels with the model (code/dtl)
            mlflow.pytorch.save_model(net, str(path), mlflow_model=mlflow_model, serialization_format="pickle",
                                      code_paths=[code], pip_requirements=pip_requirements())
    finally:
        log.setLevel(level)
    data = path / DATA_DIR
    data.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(data / "weights.safetensors"))
    (data / "spec.json").write_text(json.dumps(meta, indent=2, default=str))
    add_to_model(mlflow_model, loader_module="dtl.model.pyfunc", data=DATA_DIR, code="code", conda_env="conda.yaml",
                 python_env="python_env.yaml",
                 # apply_temperature: a temperature that `dtl explain` stores later is used unless a caller says False
                 model_config={**InputPolicy().model_config(), "apply_temperature": True, "output": OUTPUTS[0]})
    signature, example = signature_and_example(example_image, list(meta["spec"]["classes"]))
    mlflow_model.signature = signature
    _save_example(mlflow_model, example, str(path))
    mlflow_model.save(str(path / "MLmodel"))


def save_fuzzy_model(path, net, meta: dict, system: FuzzySystem, example_image: np.ndarray, card: str,
               mlflow_model=None, **_ignored):
    """Write the pyfunc model to ``path`` (called by ``mlflow.models.Model.log``)."""
    with tempfile.TemporaryDirectory() as tmp, serving_code() as code:
        data = Path(tmp) / DATA_DIR
        data.mkdir()
        save_file({k: v.contiguous() for k, v in net.cpu().state_dict().items()}, str(data / "weights.safetensors"))
        (data / "spec.json").write_text(json.dumps(meta, indent=2, default=str))
        (data / SYSTEM_FILE).write_text(json.dumps(system.to_dict()))
        (data / "rules.txt").write_text(system.rules_text() + "\n")
        (data / "MODEL_CARD.md").write_text(card)
        signature, example = signature_and_example(example_image, list(system.classes))
        signature.outputs = Schema(signature.outputs.inputs + [ColSpec("float", "firing_strength")])
        # self-contained like the softmax model: its own copy of dtl and exact pins (scikit-fuzzy too)
        reqs = pip_requirements() + [f"scikit-fuzzy=={version('scikit-fuzzy')}"]
        mlflow.pyfunc.save_model(str(path), loader_module="dtl.model.fuzzy", data_path=str(data),
                                 mlflow_model=mlflow_model, signature=signature, input_example=example,
                                 code_paths=[code], pip_requirements=reqs,
                                 # MLflow lets a caller override only keys the model was saved with
                                 model_config={**InputPolicy().model_config(), "output": OUTPUTS[0]})


# What ``Model.log(flavor=...)`` calls; the name is what MLflow records as the logged model's flavor.
SOFTMAX_FLAVOR = SimpleNamespace(__name__="dtl.model.pyfunc", save_model=save_model)
FUZZY_FLAVOR = SimpleNamespace(__name__="dtl.model.fuzzy", save_model=save_fuzzy_model)
