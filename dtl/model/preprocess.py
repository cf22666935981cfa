"""The preprocessing of training, evaluation and serving alike: decode any image to RGB uint8,
mask the annotation, apply the colour setting (:mod:`dtl.model.colour`), HSV-segment if asked,
resize to the cache size, then centre-crop and
normalise as timm's data config for the backbone says (:class:`InputSpec`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dtl.model import colour as colour_ops
from dtl.model.mask import AnnotationMask, apply_mask


def hsv_foreground(rgb: np.ndarray, sat_min: float = 0.18, val_max: float = 0.97) -> np.ndarray:
    """Boolean H×W map of the stained cells: HSV saturation high enough (stain) and not near-white."""
    x = rgb.astype(np.float32) / 255.0
    mx, mn = x.max(axis=2), x.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    return (sat >= sat_min) & (mx <= val_max)


def hsv_segment(rgb: np.ndarray, sat_min: float = 0.18, val_max: float = 0.97) -> np.ndarray:
    """Keep stained cells, blank the background (:func:`hsv_foreground`). Mirrors how Aria's
    ``Segmented`` set was made."""
    out = rgb.copy()
    out[~hsv_foreground(rgb, sat_min, val_max)] = 0
    return out


@dataclass(frozen=True)
class InputSpec:
    """What the model expects: square input size, the cached size it is cropped from, and the
    normalisation, resolved from timm's data config for the backbone; the annotation mask
    applied to the raw image first (None = none) and the colour setting (``data.colour``, one of
    :data:`dtl.model.colour.METHODS`), so a served model preprocesses as training did.
    ``pretrained`` names the timm pretrained tag whose preprocessing this is (``resnet50.tv_in1k``)."""

    size: int
    cache_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    mask: AnnotationMask | None = None
    colour: str = "raw"
    pretrained: str = ""

    def describe(self) -> str:
        """One line for runs and logs: size, crop, interpolation, mean/std and the tag they come from."""
        mean, std = (", ".join(f"{v:.3f}" for v in t) for t in (self.mean, self.std))
        return (f"{self.size} px centre crop of {self.cache_size} (crop {self.size / self.cache_size:.3f}), "
                f"{self.interpolation}, mean ({mean}), std ({std})"
                + (f", from timm {self.pretrained}" if self.pretrained else ""))

    def to_dict(self) -> dict:
        return {"size": self.size, "cache_size": self.cache_size, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation,
                "mask": self.mask.to_dict() if self.mask else None, "colour": self.colour,
                "pretrained": self.pretrained}

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        # specs written before masking (or colour) existed have no "mask" ("colour") key: those
        # models never masked (saw raw colours)
        return cls(int(d["size"]), int(d["cache_size"]), tuple(d["mean"]), tuple(d["std"]),
                   d.get("interpolation", "bicubic"), AnnotationMask.from_dict(d.get("mask")),
                   colour_ops.check_method(d.get("colour", "raw")), d.get("pretrained", ""))


def _normalize(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def to_float(batch_u8: torch.Tensor) -> torch.Tensor:
    """N×H×W×3 uint8 -> N×3×H×W float in [0, 1]."""
    return batch_u8.permute(0, 3, 1, 2).float().div_(255.0)


def eval_transform(batch_u8: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Centre crop of the cached image (= timm's resize + centre crop) and normalisation."""
    x = to_float(batch_u8)
    h, w = x.shape[-2:]
    if (h, w) != (spec.cache_size, spec.cache_size):
        x = F.interpolate(x, size=(spec.cache_size, spec.cache_size), mode="bilinear",
                          align_corners=False, antialias=True)
    off = (spec.cache_size - spec.size) // 2
    x = x[..., off:off + spec.size, off:off + spec.size]
    return _normalize(x, spec)


_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def decode(path: Path, size: int, interpolation: str = "bicubic", segment: bool = False,
           mask: AnnotationMask | None = None, colour: str = "raw") -> np.ndarray:
    """One image file -> RGB uint8 ``size×size×3`` (the shared decode of training, cache and serving)."""
    with Image.open(path) as im:
        rgb = to_rgb(im)
    return resize_rgb(rgb, size, interpolation, segment, mask, colour)


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL image -> RGB uint8 H×W×3, the same way for training and serving.

    16-bit and 32-bit greyscale are scaled to 8 bits (``convert("RGB")`` would clip them to
    white); transparent images are composited over white, the background of a smear; palette,
    CMYK, YCbCr and bilevel images go through Pillow's own conversion."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        grey = np.asarray(im, dtype=np.float64)
        top = grey.max(initial=0.0)
        scale = 255.0 if top <= 255 else (65535.0 if top <= 65535 else top)
        grey = np.clip(np.rint(grey * (255.0 / scale)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.stack([grey] * 3, -1))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def resize_rgb(rgb: np.ndarray, size: int, interpolation: str = "bicubic", segment: bool = False,
               mask: AnnotationMask | None = None, colour: str = "raw") -> np.ndarray:
    """Mask the annotation (raw pixels), apply ``colour`` (:func:`colour_masked`), HSV-segment if
    asked (the foreground decided on the colours before the colour step, which may leave no
    saturation to threshold), then resize to ``size``×``size``."""
    rgb = apply_mask(rgb, mask)
    keep = hsv_foreground(rgb) if segment else None
    rgb = colour_masked(rgb, colour, mask)
    if keep is not None:
        rgb = np.where(keep[..., None], rgb, np.uint8(0))
    if rgb.shape[:2] != (size, size):
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), _RESAMPLE.get(interpolation, Image.BICUBIC)))
    return rgb


def prepare(rgb: np.ndarray, spec: InputSpec, segment: bool = False) -> np.ndarray:
    """:func:`resize_rgb` with everything ``spec`` says (cache size, interpolation, mask, colour):
    a user's RGB image as the model's image cache would hold it."""
    return resize_rgb(rgb, spec.cache_size, spec.interpolation, segment, spec.mask, spec.colour)


def colour_masked(rgb: np.ndarray, colour: str, mask: AnnotationMask | None = None) -> np.ndarray:
    """The colour step on an image whose annotation ``mask`` is applied: the Reinhard statistics
    leave the masked box out, and the box is filled again afterwards, so it keeps its constant
    colour (normalised, it would carry the image's own colour statistics: a shortcut)."""
    if colour == "raw" or mask is None:
        return colour_ops.apply(rgb, colour)
    where = np.ones(rgb.shape[:2], bool)
    y0, x0 = mask.box(*rgb.shape[:2])
    where[y0:, x0:] = False
    return apply_mask(colour_ops.apply(rgb, colour, where), mask)
