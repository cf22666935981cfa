"""Images that differ from the training set: deterministic corruptions and the other variant.

Corruptions act on the raw uint8 RGB images, before the model's own preprocessing (annotation
mask, segmentation, resize, crop, normalisation), as a different microscope, camera or stain
would. Each has three severities; every one is deterministic (the noise is drawn from a
generator seeded by ``(seed, image index)``), so a rerun scores the same images. Sizes are
relative to a 224-pixel image (Aria's), so a 450-pixel C-NMC cell gets the same blur in
proportion to what it shows.

Cross-variant: Aria ships every field twice, ``Original`` and HSV-``Segmented``, under the same
relative paths. A model trained on one variant is scored on the other variant's images of the
very same test items.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from dtl.evaluation.metrics import accuracy_macro_f1
from dtl.evaluation.stats import bootstrap_ci, paired_bootstrap
from dtl.model.preprocess import to_rgb

KINDS = ("blur", "jpeg", "brightness_contrast", "stain", "noise")
SEVERITIES = (1, 2, 3)
# Parameters per severity 1, 2, 3 (ImageNet-C style: visible, strong, severe).
BLUR_RADIUS = (1.0, 2.0, 3.0)  # Gaussian blur radius in pixels of a 224-px image (defocus)
JPEG_QUALITY = (40, 20, 8)  # re-compression quality
CONTRAST_BRIGHTNESS = ((0.8, 0.08), (0.65, 0.16), (0.5, 0.24))  # contrast factor, brightness shift (0-1 units)
STAIN_HUE_SAT = ((0.03, 0.85), (0.06, 0.7), (0.10, 0.5))  # hue rotation (share of the circle), saturation factor
NOISE_SIGMA = (0.04, 0.08, 0.12)  # Gaussian noise standard deviation (0-1 units)
LABELS = {"blur": "Gaussian blur (defocus)", "jpeg": "JPEG re-compression", "brightness_contrast":
          "brightness/contrast", "stain": "stain shift (hue/saturation)", "noise": "Gaussian noise"}


def describe(kind: str, severity: int) -> str:
    """A short name of one corruption with its parameter, e.g. ``Gaussian blur r=2``."""
    s = severity - 1
    return {"blur": lambda: f"Gaussian blur r={BLUR_RADIUS[s]:g}", "jpeg": lambda: f"JPEG q={JPEG_QUALITY[s]}",
            "brightness_contrast": lambda: "contrast x{:g}, brightness +{:g}".format(*CONTRAST_BRIGHTNESS[s]),
            "stain": lambda: "hue +{:g}, saturation x{:g}".format(*STAIN_HUE_SAT[s]),
            "noise": lambda: f"Gaussian noise sd={NOISE_SIGMA[s]:g}"}[kind]()


def gaussian_blur(img: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of one uint8 RGB image with ``radius`` in its own pixels."""
    return np.asarray(Image.fromarray(np.asarray(img)).filter(ImageFilter.GaussianBlur(radius)))


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """One JPEG encode/decode round trip at ``quality``."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img)).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(buf).convert("RGB"))


def _brightness_contrast(img: np.ndarray, contrast: float, shift: float) -> np.ndarray:
    x = img.astype(np.float32) / 255.0
    x = (x - x.mean()) * contrast + x.mean() + shift
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def _stain(img: np.ndarray, hue: float, sat: float) -> np.ndarray:
    hsv = np.asarray(Image.fromarray(img).convert("HSV")).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(round(hue * 256))) % 256  # PIL hue wraps at 256
    hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))


def _noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float32) / 255.0 + rng.normal(0, sigma, img.shape).astype(np.float32)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def corrupt_one(img: np.ndarray, kind: str, severity: int, seed: int = 0, index: int = 0) -> np.ndarray:
    """One uint8 RGB image corrupted by ``kind`` at ``severity`` (1-3); deterministic in
    (``seed``, ``index``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown corruption {kind!r}; valid: {', '.join(KINDS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    img = np.ascontiguousarray(img[..., :3], dtype=np.uint8)
    s = severity - 1
    scale = min(img.shape[:2]) / 224.0
    if kind == "blur":
        return gaussian_blur(img, BLUR_RADIUS[s] * scale)
    if kind == "jpeg":
        return jpeg(img, JPEG_QUALITY[s])
    if kind == "brightness_contrast":
        return _brightness_contrast(img, *CONTRAST_BRIGHTNESS[s])
    if kind == "stain":
        return _stain(img, *STAIN_HUE_SAT[s])
    return _noise(img, NOISE_SIGMA[s], np.random.default_rng([seed, index, severity]))


def corrupt_all(images: list[np.ndarray], kind: str, severity: int, seed: int = 0) -> list[np.ndarray]:
    """:func:`corrupt_one` of every image (index = position in the list)."""
    return [corrupt_one(im, kind, severity, seed, i) for i, im in enumerate(images)]


def read_images(root: Path, paths) -> list[np.ndarray]:
    """The raw RGB uint8 pixels of ``root / p`` for each path, at their own size."""
    out = []
    for p in paths:
        with Image.open(Path(root) / p) as im:
            out.append(to_rgb(im))
    return out


@dataclass(frozen=True)
class OtherVariant:
    """The other Aria variant's images of a split's items: ``index`` into the split, or why none."""

    variant: str
    root: Path | None
    index: np.ndarray
    reason: str = ""


VARIANT_FOLDERS = {"original": "Original", "segmented": "Segmented"}


def other_variant(ds, split: str) -> OtherVariant:
    """Where the other variant (Original <-> Segmented) of ``split``'s items lies, matched by the
    same relative path; with a reason instead when the data has no such sibling folder."""
    here = Path(ds.root).name
    names = {v: k for k, v in VARIANT_FOLDERS.items()}
    if here not in names:
        return OtherVariant("", None, np.zeros(0, int), f"{ds.kind} data at {ds.root} is not an Aria variant "
                                                        "folder (Original/ or Segmented/): no other variant")
    other = "segmented" if names[here] == "original" else "original"
    root = Path(ds.root).parent / VARIANT_FOLDERS[other]
    if not root.is_dir():
        return OtherVariant(other, None, np.zeros(0, int), f"{root} does not exist on disk")
    paths = list(ds.split(split)["path"])
    keep = np.asarray([i for i, p in enumerate(paths) if (root / p).is_file()], dtype=int)
    if not len(keep):
        return OtherVariant(other, root, keep, f"none of the {len(paths)} {split} items exist under {root}")
    return OtherVariant(other, root, keep)


def subsample(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` of ``n`` indices (sorted, seeded), or all of them when ``k`` is 0 or at least ``n``."""
    if not k or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def score_row(name: str, y: np.ndarray, probs: np.ndarray, ref: np.ndarray, groups, n_boot: int, seed: int,
              **info) -> dict:
    """One robustness-table row: accuracy and macro-F1 with bootstrap CIs, and the paired difference
    to ``ref`` (the predictions it is compared with, on the same items) with a paired bootstrap CI."""
    point, base = accuracy_macro_f1(y, probs), accuracy_macro_f1(y, ref)
    ci = bootstrap_ci(y, probs, accuracy_macro_f1, n_boot, seed, groups)
    diff = paired_bootstrap(y, probs, ref, accuracy_macro_f1, ("accuracy", "macro_f1"), n_boot, seed, groups)
    row = {"set": name, **info, "n": int(len(y))}
    for m in ("accuracy", "macro_f1"):
        row[m], (row[f"{m}_ci_low"], row[f"{m}_ci_high"]) = point[m], ci[m]
        row[f"d_{m}"], row[f"d_{m}_ci_low"], row[f"d_{m}_ci_high"] = (diff[m]["diff"], diff[m]["ci_low"],
                                                                      diff[m]["ci_high"])
    row["relative_accuracy"] = point["accuracy"] / base["accuracy"] if base["accuracy"] > 0 else float("nan")
    row["agreement"] = float((probs.argmax(1) == ref.argmax(1)).mean())
    return row


def mean_relative(rows: list[dict]) -> dict[str, float]:
    """ImageNet-C style summary: mean relative accuracy (corrupted / clean on the same items) per
    corruption over its severities, and ``mean`` over the corruptions."""
    by = {k: [r["relative_accuracy"] for r in rows if r.get("kind") == k and r.get("severity")] for k in KINDS}
    out = {k: float(np.mean(v)) for k, v in by.items() if v}
    if out:
        out["mean"] = float(np.mean(list(out.values())))
    return out
