"""The logged model: one MLflow model with two flavors.

* ``pytorch``: ``mlflow.pytorch.load_model(uri)`` returns the ``nn.Module`` (raw logits).
* ``python_function`` (loader ``dtl.serving``): takes images of any size — uint8 RGB arrays,
  raw bytes or base64 strings (file paths only when the caller loads it with
  ``model_config={"allow_paths": True}``), in a column named ``image`` — applies the
  backbone's own preprocessing and returns the class name and per-class probabilities.
  It rebuilds the network from ``dtl/spec.json`` and ``dtl/weights.safetensors``: nothing
  is unpickled on that path, and user input is only ever decoded as an image, within
  bounds on bytes and pixels. A bad row raises :class:`InvalidInput` naming the row, which
  ``mlflow models serve`` answers with HTTP 400.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image
from safetensors.torch import load_file, save_file

from dtl import DTLError
from dtl.data.cache import resize_rgb, to_rgb
from dtl.data.transforms import InputSpec, eval_transform

DATA_DIR = "dtl"
INPUT_COLUMN = "image"


# Bounds on what one row may make the server decode; a model_config can change them at load time.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # ~6300×6300; Pillow's own bomb check only starts at 89 MP
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP")  # decoders reachable from user input


def truthy(value) -> bool:
    """A model_config switch: booleans as they are; the strings false/0/no/off (any case) are False."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)


@dataclass(frozen=True)
class InputPolicy:
    """What :func:`image_from_value` accepts. ``allow_paths`` is off by default, so a model
    server never reads a file a client names; local Python use turns it on at load time with
    ``mlflow.pyfunc.load_model(uri, model_config={"allow_paths": True})``."""

    allow_paths: bool = False
    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS

    @classmethod
    def from_config(cls, config: dict | None) -> InputPolicy:
        c = config or {}
        return cls(truthy(c.get("allow_paths", False)), int(c.get("max_image_bytes", MAX_IMAGE_BYTES)),
                   int(c.get("max_image_pixels", MAX_IMAGE_PIXELS)))

    def model_config(self) -> dict:
        return {"allow_paths": self.allow_paths, "max_image_bytes": self.max_bytes,
                "max_image_pixels": self.max_pixels}


class InvalidInput(MlflowException, DTLError):
    """A bad input row: the scoring server answers it with HTTP 400 and this message (an
    ``MlflowException`` with ``INVALID_PARAMETER_VALUE``), the CLI prints it (a ``DTLError``)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def image_from_value(value, policy: InputPolicy = InputPolicy()) -> np.ndarray:
    """An RGB uint8 H×W×3 array from raw bytes, a base64 string, an array or, only when
    ``policy.allow_paths``, the path of a regular file. Sizes are checked before decoding."""
    if isinstance(value, (np.ndarray, list)):
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError):
            raise InvalidInput("an image array must be a rectangular H×W×3 array of numbers") from None
        return _array_image(arr, policy)
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        data = _read_path(value, policy) if policy.allow_paths else None
        if data is None:
            data = _b64(value, policy)
    else:
        raise InvalidInput(f"cannot read an image from a {type(value).__name__}")
    return decode_image_bytes(data, policy)


def _array_image(arr: np.ndarray, policy: InputPolicy) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise InvalidInput(f"an image array must be H×W×3 (RGB), got shape {arr.shape}")
    if arr.shape[0] * arr.shape[1] > policy.max_pixels:
        raise InvalidInput(f"image of {arr.shape[1]}×{arr.shape[0]} pixels exceeds the limit of {policy.max_pixels}")
    if arr.dtype.kind not in "uifb":
        raise InvalidInput(f"an image array must hold numbers, not {arr.dtype}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def _read_path(value: str, policy: InputPolicy) -> bytes | None:
    """The bytes of a regular file named by ``value``; None when it names no file (then it is
    read as base64). FIFOs, devices and directories are refused without opening them."""
    if len(value) > 4096:
        return None
    try:
        st = os.stat(value)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(f"{value!r} is not a regular file")
    if st.st_size > policy.max_bytes:
        raise InvalidInput(f"{value!r} has {st.st_size} bytes, over the limit of {policy.max_bytes}")
    with open(value, "rb") as f:
        return f.read(policy.max_bytes + 1)


def _b64(value: str, policy: InputPolicy) -> bytes:
    if len(value) > (policy.max_bytes + 2) // 3 * 4 + 4:
        raise InvalidInput(f"base64 input of {len(value)} characters decodes to more than {policy.max_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        hint = "neither an existing file nor" if policy.allow_paths else "not"
        paths = "" if policy.allow_paths else " (file paths are not read: send the file's bytes base64-encoded)"
        raise InvalidInput(f"{value[:60]!r} is {hint} base64 image bytes{paths}") from None


def decode_image_bytes(data: bytes, policy: InputPolicy = InputPolicy()) -> np.ndarray:
    """Decode image bytes into RGB uint8, refusing more than ``policy.max_bytes`` bytes or
    ``policy.max_pixels`` pixels (checked from the header, before the pixels are decoded)."""
    if len(data) > policy.max_bytes:
        raise InvalidInput(f"{len(data)} bytes of image data exceed the limit of {policy.max_bytes}")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            w, h = im.size
            if w * h > policy.max_pixels:
                raise InvalidInput(f"image of {w}×{h} pixels exceeds the limit of {policy.max_pixels}")
            return to_rgb(im)
    except InvalidInput:
        raise
    except Exception:  # noqa: BLE001 - any decoder error means the same thing to the client
        raise InvalidInput("the input is not a readable image (expected " + "/".join(IMAGE_FORMATS) + " bytes)") from None


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


def read_images(data, policy: InputPolicy = InputPolicy()) -> list[np.ndarray]:
    """Every input row as an RGB uint8 array; a bad row fails with :class:`InvalidInput` naming its
    index (the scoring server answers it with HTTP 400)."""
    images = []
    for i, v in enumerate(_rows(data)):
        try:
            images.append(image_from_value(v, policy))
        except InvalidInput as e:
            raise InvalidInput(f"input row {i}: {e.message}") from None
    return images


CALIBRATION_FILE = "calibration.json"  # beside spec.json: {"temperature": T, ...}, written by `dtl explain`


class ImageClassifier:
    """What ``mlflow.pyfunc.load_model`` returns under the hood (see module docstring). With a
    ``temperature`` other than 1 the probabilities are ``softmax(logits / temperature)``."""

    def __init__(self, net: torch.nn.Module, classes: list[str], spec: InputSpec, segment: bool = False,
                 batch_size: int = 32, policy: InputPolicy = InputPolicy(), temperature: float = 1.0):
        self.net = net.eval()
        self.policy = policy
        self.classes, self.spec, self.segment, self.batch_size = classes, spec, segment, batch_size
        self.temperature = float(temperature)
        self.device = next(net.parameters()).device

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        arr = np.stack([resize_rgb(im, self.spec.cache_size, self.spec.interpolation, self.segment, self.spec.mask)
                        for im in images])
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

    def predict(self, data, params=None) -> pd.DataFrame:
        probs = self.predict_proba(read_images(data, self.policy)).astype(np.float32)
        df = pd.DataFrame(probs, columns=[f"p_{c}" for c in self.classes])
        df.insert(0, "class", [self.classes[j] for j in probs.argmax(1)] if len(probs) else [])
        return df


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
                    apply_temperature: bool = True) -> ImageClassifier:
    """The classifier of a logged model's ``dtl/`` folder; its stored temperature applied unless
    ``apply_temperature`` is False."""
    from dtl.models import DTLNet, ModelSpec  # deferred: timm (and torch._dynamo) load with the weights, not on import

    d = Path(model_dir)
    meta = json.loads((d / "spec.json").read_text())
    net = DTLNet(ModelSpec.from_dict(meta["spec"]))
    net.load_state_dict(load_file(str(d / "weights.safetensors")))
    net.to(device)
    temperature = (stored_temperature(d) or 1.0) if apply_temperature else 1.0
    return ImageClassifier(net, list(meta["spec"]["classes"]), InputSpec.from_dict(meta["input"]),
                           bool(meta.get("hsv_segment", False)), policy=policy, temperature=temperature)


def _load_pyfunc(path: str, model_config: dict | None = None) -> ImageClassifier:
    """MLflow's pyfunc entry point for this flavor (``loader_module: dtl.serving``);
    ``model_config`` (keys of :meth:`InputPolicy.model_config` and ``apply_temperature``) is the
    caller's, at load time."""
    dev = os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    apply_t = truthy((model_config or {}).get("apply_temperature", True))
    return load_classifier(path, dev, InputPolicy.from_config(model_config), apply_temperature=apply_t)


def signature_and_example(example_image: np.ndarray, classes: list[str]):
    """The output schema (class + one probability per class) and a base64-PNG input example.

    The signature deliberately has no input schema: MLflow would coerce a bare N×H×W×3 array
    into a 2-D DataFrame before the model sees it, and images of any size fit no tensor spec.
    The input example documents the format; ``ImageClassifier.predict`` validates every row."""
    from mlflow.models import ModelSignature  # deferred: logging code; pulls SciPy into serving
    from mlflow.types.schema import ColSpec, Schema  # deferred: as above

    buf = io.BytesIO()
    Image.fromarray(example_image).save(buf, format="PNG")
    example = pd.DataFrame({INPUT_COLUMN: [base64.b64encode(buf.getvalue()).decode()]})
    outputs = Schema([ColSpec("string", "class")] + [ColSpec("float", f"p_{c}") for c in classes])
    return ModelSignature(inputs=None, outputs=outputs), example


# What the copied ``dtl`` package imports on the loading paths (pyfunc and mlflow.pytorch):
# pinned to the versions the model was saved with. MLflow's own inference would pin the
# training checkout (``dtl``/``all-dtl``) instead, which no index serves.
SERVING_DISTRIBUTIONS = ("mlflow", "torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas",
                         "pyyaml")


def pip_requirements() -> list[str]:
    """Exact pins of :data:`SERVING_DISTRIBUTIONS` as installed here (the model's requirements.txt)."""
    return [f"{d}=={importlib.metadata.version(d)}" for d in SERVING_DISTRIBUTIONS]


def save_model(path, net, meta: dict, example_image: np.ndarray, mlflow_model=None, **_ignored):
    """Write the two-flavor model to ``path`` (called by ``mlflow.models.Model.log``)."""
    import mlflow.pytorch  # deferred: logging code; pulls SciPy into serving
    from mlflow.models import Model  # deferred: as above
    from mlflow.models.utils import _save_example  # deferred: as above
    from mlflow.pyfunc import add_to_model  # deferred: as above

    path = Path(path)
    if mlflow_model is None:
        mlflow_model = Model()
    net = net.cpu().eval()
    # The pickled module serves mlflow.pytorch.load_model; the pyfunc path below never unpickles.
    # (MLflow warns about pickle on every save; the warning is about loading, which is the user's call.)

    log = logging.getLogger("mlflow.pytorch")
    level = log.level
    log.setLevel(logging.ERROR)
    try:  # the package travels with the model (code/dtl): no checkout or dtl install is needed to load it
        mlflow.pytorch.save_model(net, str(path), mlflow_model=mlflow_model, serialization_format="pickle",
                                  code_paths=[str(Path(__file__).resolve().parent)],
                                  pip_requirements=pip_requirements())
    finally:
        log.setLevel(level)
    data = path / DATA_DIR
    data.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(data / "weights.safetensors"))
    (data / "spec.json").write_text(json.dumps(meta, indent=2, default=str))
    add_to_model(mlflow_model, loader_module="dtl.serving", data=DATA_DIR, code="code", conda_env="conda.yaml",
                 python_env="python_env.yaml",
                 # apply_temperature: a temperature that `dtl explain` stores later is used unless a caller says False
                 model_config={**InputPolicy().model_config(), "apply_temperature": True})
    signature, example = signature_and_example(example_image, list(meta["spec"]["classes"]))
    mlflow_model.signature = signature
    _save_example(mlflow_model, example, str(path))
    mlflow_model.save(str(path / "MLmodel"))
