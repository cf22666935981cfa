"""User input to RGB arrays, within bounds: what a served model accepts in its ``image`` column
(uint8 arrays, raw bytes, base64 strings; file paths only when the caller allows them). A bad
row raises :class:`InvalidInput` naming the row, which ``mlflow models serve`` answers with
HTTP 400."""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
from dataclasses import dataclass

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

from dtl.model.errors import DTLError
from dtl.model.preprocess import to_rgb

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
