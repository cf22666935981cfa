"""Colour preprocessing (``data.colour``): ``raw``, ``greyscale`` or Reinhard stain
normalisation to one fixed reference, applied the same way in training (the decode into the
image cache), serving (the model's :class:`~dtl.model.preprocess.InputSpec` names it) and the
audit's colour baseline. numpy only: it travels inside every logged model.

Where in the preprocessing: after the annotation mask, before HSV segmentation and resizing
(:func:`dtl.model.preprocess.resize_rgb`). The Reinhard statistics leave the masked box out and
the box is filled again afterwards, so it keeps its constant colour (normalised, it would
carry the image's own colour statistics). HSV segmentation decides the foreground on the
colours before this step (a greyscale image has no saturation left to threshold) and blanks
the background after it.

* ``greyscale``: ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (as Pillow's ``L`` mode and
  the ``augment.grey`` augmentation), rounded, in all three channels.
* ``reinhard``: Reinhard et al. 2001, "Color transfer between images" (IEEE CG&A 21(5)), in
  CIELAB (D65, 2° observer; the conversion is scikit-image's ``rgb2lab`` / ``lab2rgb``, which
  the tests use as an oracle): each LAB channel of the image is shifted and scaled so that its
  mean and standard deviation over the image's pixels become :data:`REINHARD_MEAN` and
  :data:`REINHARD_STD`; colours that leave the sRGB gamut are clipped.
"""

from __future__ import annotations

import numpy as np

from dtl.model.errors import DTLError

METHODS = ("raw", "greyscale", "reinhard")

# The fixed Reinhard reference, computed once (2026-12-02, with this module's rgb_to_lab) from the
# 1,200 JPEGs of the PBC normal peripheral-blood-cell subset (Acevedo et al. 2020, Data in Brief
# 30:105474, doi:10.17632/snkd93bnjr.1; the files of shared/datasets/manifests/pbc-acevedo-2020-subset.csv):
# the mean over the images of each image's per-channel LAB mean and standard deviation over all its
# pixels. A peripheral blood smear (May-Grünwald-Giemsa) from another lab than Aria's, none of whose
# images is in Aria or C-NMC (the real-cpu-tiny recipe uses it as its phase-1 stand-in).
REINHARD_MEAN = (79.7295, 10.7564, 7.4531)  # L, a, b
REINHARD_STD = (15.4883, 9.0140, 14.0365)

# sRGB (D65) <-> CIE XYZ, the matrices and white point of scikit-image (skimage.color.colorconv)
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_LUMA = np.array([0.299, 0.587, 0.114])


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else a DTLError naming them."""
    if method not in METHODS:
        raise DTLError(f"colour method {method!r} is not valid; choose one of: {', '.join(METHODS)}")
    return method


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 (or [0, 1] float) RGB ``...×3`` -> CIELAB float64 (L in [0, 100])."""
    x = rgb / 255.0 if rgb.dtype == np.uint8 else np.asarray(rgb, np.float64)
    lin = np.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = (lin @ _XYZ_FROM_RGB.T) / _WHITE_D65
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], -1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB -> RGB float64 in [0, 1] (out-of-gamut colours clipped)."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([lab[..., 1] / 500.0 + fy, fy, np.maximum(fy - lab[..., 2] / 200.0, 0.0)], -1)
    xyz = np.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787) * _WHITE_D65
    lin = xyz @ _RGB_FROM_XYZ.T
    x = np.where(lin > 0.0031308, 1.055 * np.maximum(lin, 0.0031308) ** (1 / 2.4) - 0.055, 12.92 * lin)
    return np.clip(x, 0.0, 1.0)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def greyscale(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma in all three channels (uint8, R = G = B)."""
    grey = _to_uint8(rgb.astype(np.float64) @ _LUMA)
    return np.repeat(grey[..., None], 3, axis=-1)


def reinhard(rgb: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Reinhard normalisation to :data:`REINHARD_MEAN` / :data:`REINHARD_STD`, the image's
    statistics taken over the pixels where ``where`` (H×W bool) is True (all by default)."""
    lab = rgb_to_lab(rgb)
    px = lab.reshape(-1, 3) if where is None else lab[where]
    if len(px) == 0:
        px = lab.reshape(-1, 3)
    mean, std = px.mean(0), px.std(0)
    scale = np.asarray(REINHARD_STD) / np.maximum(std, 1e-6)
    return _to_uint8(lab_to_rgb((lab - mean) * scale + np.asarray(REINHARD_MEAN)) * 255.0)


def apply(rgb: np.ndarray, method: str, where: np.ndarray | None = None) -> np.ndarray:
    """``rgb`` (uint8 H×W×3) through the colour ``method`` (one of :data:`METHODS`): a uint8
    array of the same shape (``raw``: ``rgb`` itself). ``where`` (H×W bool) selects the pixels
    the Reinhard statistics come from (all by default; the other methods ignore it)."""
    check_method(method)
    if method == "raw":
        return rgb
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise DTLError(f"colour.apply needs a uint8 H×W×3 image, got {rgb.dtype} {rgb.shape}")
    return greyscale(rgb) if method == "greyscale" else reinhard(rgb, where)
