"""The softmax model's pyfunc flavor (``loader_module: dtl.model.pyfunc``; models logged
before the package redesign say ``dtl.serving``, which re-exports this).

It rebuilds the network from ``dtl/spec.json`` and ``dtl/weights.safetensors``: nothing is
unpickled on that path, and user input is only ever decoded as an image, within bounds
(:mod:`dtl.model.decode`). With a stored temperature (``dtl/calibration.json``, written by
``dtl explain``) the probabilities are ``softmax(logits / T)``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from dtl.model.decode import InputPolicy, read_images, truthy
from dtl.model.errors import DTLError
from dtl.model.preprocess import InputSpec, eval_transform, prepare

DATA_DIR = "dtl"


CALIBRATION_FILE = "calibration.json"  # beside spec.json: {"temperature": T, ...}, written by `dtl explain`

# ``model_config={"output": ...}``: "table" (default) is the class and one p_<class> column per
# class; "class" is the class column alone (a Series), the single column of predictions that
# ``mlflow.models.evaluate(..., model_type="classifier")`` compares with the targets.
OUTPUTS = ("table", "class")


def output_mode(model_config: dict | None) -> str:
    """The ``output`` key of a caller's model_config (default "table"), checked against :data:`OUTPUTS`."""
    mode = str((model_config or {}).get("output", "table"))
    if mode not in OUTPUTS:
        raise DTLError(f"model_config output={mode!r}: valid choices are {', '.join(OUTPUTS)}")
    return mode


class ImageClassifier:
    """What ``mlflow.pyfunc.load_model`` returns under the hood (see module docstring). With a
    ``temperature`` other than 1 the probabilities are ``softmax(logits / temperature)``."""

    def __init__(self, net: torch.nn.Module, classes: list[str], spec: InputSpec, segment: bool = False,
                 batch_size: int = 32, policy: InputPolicy = InputPolicy(), temperature: float = 1.0,
                 output: str = "table"):
        self.net = net.eval()
        self.policy, self.output = policy, output
        self.classes, self.spec, self.segment, self.batch_size = classes, spec, segment, batch_size
        self.temperature = float(temperature)
        self.device = next(net.parameters()).device

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        arr = np.stack([prepare(im, self.spec, self.segment) for im in images])
        return eval_transform(torch.from_numpy(arr).to(self.device), self.spec)

    @torch.no_grad()
    def logits(self, images: list[np.ndarray]) -> np.ndarray:
        """Raw logits (no temperature) of RGB uint8 images of any size."""
        out = []
        for i in range(0, len(images), self.batch_size):
            out.append(self.net(self.preprocess(images[i:i + self.batch_size])).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict_proba(self, images: list[np.ndarray]) -> np.ndarray:
        z = torch.from_numpy(self.logits(images)) / self.temperature
        return torch.softmax(z, 1).numpy()

    def predict(self, data, params=None) -> pd.DataFrame | pd.Series:
        probs = self.predict_proba(read_images(data, self.policy)).astype(np.float32)
        df = pd.DataFrame(probs, columns=[f"p_{c}" for c in self.classes])
        df.insert(0, "class", [self.classes[j] for j in probs.argmax(1)] if len(probs) else [])
        return self.shaped(df)

    def shaped(self, table: pd.DataFrame) -> pd.DataFrame | pd.Series:
        """The prediction table in the caller's :data:`OUTPUTS` mode: all columns, or the ``class``
        column alone as a Series (MLflow's evaluators take a Series, not a one-column frame)."""
        return table["class"] if self.output == "class" else table


def stored_temperature(model_dir: str | Path) -> float | None:
    """The temperature stored with a logged model (``dtl/calibration.json``), or None (models
    logged or kept without one serve raw softmax probabilities, as before)."""
    f = Path(model_dir) / CALIBRATION_FILE
    if not f.is_file():
        return None
    t = float(json.loads(f.read_text())["temperature"])
    if not t > 0:
        raise DTLError(f"{f}: temperature must be > 0, got {t}")
    return t


def load_classifier(model_dir: str | Path, device: str = "cpu", policy: InputPolicy = InputPolicy(),
                    apply_temperature: bool = True, output: str = "table") -> ImageClassifier:
    """The classifier of a logged model's ``dtl/`` folder; its stored temperature applied unless
    ``apply_temperature`` is False."""
    from dtl.model.net import (  # deferred: timm (and torch._dynamo) load with the weights, not on import
        DTLNet,
        ModelSpec,
    )

    d = Path(model_dir)
    meta = json.loads((d / "spec.json").read_text())
    net = DTLNet(ModelSpec.from_dict(meta["spec"]))
    net.load_state_dict(load_file(str(d / "weights.safetensors")))
    net.to(device)
    temperature = (stored_temperature(d) or 1.0) if apply_temperature else 1.0
    return ImageClassifier(net, list(meta["spec"]["classes"]), InputSpec.from_dict(meta["input"]),
                           bool(meta.get("hsv_segment", False)), policy=policy, temperature=temperature,
                           output=output)


def _load_pyfunc(path: str, model_config: dict | None = None) -> ImageClassifier:
    """MLflow's pyfunc entry point for this flavor (``loader_module: dtl.model.pyfunc``;
    older models name ``dtl.serving``, which re-exports it);
    ``model_config`` (keys of :meth:`InputPolicy.model_config`, ``apply_temperature`` and
    ``output``, one of :data:`OUTPUTS`) is the caller's, at load time."""
    dev = os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    apply_t = truthy((model_config or {}).get("apply_temperature", True))
    return load_classifier(path, dev, InputPolicy.from_config(model_config), apply_temperature=apply_t,
                           output=output_mode(model_config))


# What the copied ``dtl`` package imports on the loading paths (pyfunc and mlflow.pytorch):
# pinned to the versions the model was saved with. MLflow's own inference would pin the
# training checkout (``dtl``/``all-dtl``) instead, which no index serves.
SERVING_DISTRIBUTIONS = ("mlflow", "torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas",
                         "pyyaml")


def pip_requirements() -> list[str]:
    """Exact pins of :data:`SERVING_DISTRIBUTIONS` as installed here (the model's requirements.txt)."""
    return [f"{d}=={importlib.metadata.version(d)}" for d in SERVING_DISTRIBUTIONS]
