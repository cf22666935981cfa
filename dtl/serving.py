"""The logged model: one MLflow model with two flavors.

* ``pytorch``: ``mlflow.pytorch.load_model(uri)`` returns the ``nn.Module`` (raw logits).
* ``python_function`` (loader ``dtl.serving``): takes images of any size — uint8 RGB arrays,
  file paths, raw bytes or base64 strings, in a column named ``image`` — applies the
  backbone's own preprocessing and returns the class name and per-class probabilities.
  It rebuilds the network from ``dtl/spec.json`` and ``dtl/weights.safetensors``: nothing
  is unpickled on that path, and user input is only ever decoded as an image.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from dtl import DTLError
from dtl.data.cache import resize_rgb
from dtl.data.transforms import InputSpec, eval_transform

DATA_DIR = "dtl"
INPUT_COLUMN = "image"


def image_from_value(value) -> np.ndarray:
    """An RGB uint8 H×W×3 array from a path, bytes, a base64 string, or an array."""
    if isinstance(value, np.ndarray) or isinstance(value, list):
        arr = np.asarray(value)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise DTLError(f"an image array must be H×W×3 (RGB), got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr[..., :3])
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        if len(value) < 4096 and os.path.exists(value):
            data = Path(value).read_bytes()
        else:
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise DTLError(f"{value[:80]!r} is neither an existing file nor base64 image bytes") from None
    else:
        raise DTLError(f"cannot read an image from a {type(value).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception:
        raise DTLError("the input is not a readable image (expected JPEG/PNG/BMP/TIFF bytes)") from None


def _rows(data) -> list:
    if isinstance(data, pd.DataFrame):
        col = INPUT_COLUMN if INPUT_COLUMN in data.columns else data.columns[0]
        return list(data[col])
    if isinstance(data, dict):
        v = data.get(INPUT_COLUMN, next(iter(data.values())))
        return list(v) if not (isinstance(v, np.ndarray) and v.ndim == 3) else [v]
    if isinstance(data, np.ndarray):
        return list(data) if data.ndim == 4 else [data]
    if isinstance(data, (list, tuple)):
        return list(data)
    return [data]


class ImageClassifier:
    """What ``mlflow.pyfunc.load_model`` returns under the hood (see module docstring)."""

    def __init__(self, net: torch.nn.Module, classes: list[str], spec: InputSpec, segment: bool = False,
                 batch_size: int = 32):
        self.net = net.eval()
        self.classes, self.spec, self.segment, self.batch_size = classes, spec, segment, batch_size
        self.device = next(net.parameters()).device

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        arr = np.stack([resize_rgb(im, self.spec.cache_size, self.spec.interpolation, self.segment, self.spec.mask)
                        for im in images])
        return eval_transform(torch.from_numpy(arr).to(self.device), self.spec)

    @torch.no_grad()
    def predict_proba(self, images: list[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = self.preprocess(images[i:i + self.batch_size])
            out.append(torch.softmax(self.net(x).float(), 1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, data, params=None) -> pd.DataFrame:
        images = []
        for i, v in enumerate(_rows(data)):
            try:
                images.append(image_from_value(v))
            except DTLError as e:
                raise DTLError(f"input row {i}: {e}") from None
        probs = self.predict_proba(images).astype(np.float32)
        df = pd.DataFrame(probs, columns=[f"p_{c}" for c in self.classes])
        df.insert(0, "class", [self.classes[j] for j in probs.argmax(1)] if len(probs) else [])
        return df


def load_classifier(model_dir: str | Path, device: str = "cpu") -> ImageClassifier:
    from safetensors.torch import load_file

    from dtl.models import DTLNet, ModelSpec

    d = Path(model_dir)
    meta = json.loads((d / "spec.json").read_text())
    net = DTLNet(ModelSpec.from_dict(meta["spec"]))
    net.load_state_dict(load_file(str(d / "weights.safetensors")))
    net.to(device)
    return ImageClassifier(net, list(meta["spec"]["classes"]), InputSpec.from_dict(meta["input"]),
                           bool(meta.get("hsv_segment", False)))


def _load_pyfunc(path: str) -> ImageClassifier:
    """MLflow's pyfunc entry point for this flavor (``loader_module: dtl.serving``)."""
    dev = os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_classifier(path, dev)


def signature_and_example(example_image: np.ndarray, classes: list[str]):
    """The output schema (class + one probability per class) and a base64-PNG input example.

    The signature deliberately has no input schema: MLflow would coerce a bare N×H×W×3 array
    into a 2-D DataFrame before the model sees it, and images of any size fit no tensor spec.
    The input example documents the format; ``ImageClassifier.predict`` validates every row."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    buf = io.BytesIO()
    Image.fromarray(example_image).save(buf, format="PNG")
    example = pd.DataFrame({INPUT_COLUMN: [base64.b64encode(buf.getvalue()).decode()]})
    outputs = Schema([ColSpec("string", "class")] + [ColSpec("float", f"p_{c}") for c in classes])
    return ModelSignature(inputs=None, outputs=outputs), example


def save_model(path, net, meta: dict, example_image: np.ndarray, mlflow_model=None, **_ignored):
    """Write the two-flavor model to ``path`` (called by ``mlflow.models.Model.log``)."""
    import mlflow.pytorch
    from mlflow.models import Model
    from mlflow.models.utils import _save_example
    from mlflow.pyfunc import add_to_model
    from safetensors.torch import save_file

    path = Path(path)
    if mlflow_model is None:
        mlflow_model = Model()
    net = net.cpu().eval()
    # The pickled module serves mlflow.pytorch.load_model; the pyfunc path below never unpickles.
    # (MLflow warns about pickle on every save; the warning is about loading, which is the user's call.)
    import logging

    log = logging.getLogger("mlflow.pytorch")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        mlflow.pytorch.save_model(net, str(path), mlflow_model=mlflow_model, serialization_format="pickle")
    finally:
        log.setLevel(level)
    data = path / DATA_DIR
    data.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(data / "weights.safetensors"))
    (data / "spec.json").write_text(json.dumps(meta, indent=2, default=str))
    add_to_model(mlflow_model, loader_module="dtl.serving", data=DATA_DIR, conda_env="conda.yaml",
                 python_env="python_env.yaml")
    signature, example = signature_and_example(example_image, list(meta["spec"]["classes"]))
    mlflow_model.signature = signature
    _save_example(mlflow_model, example, str(path))
    mlflow_model.save(str(path / "MLmodel"))
