"""Annotation masking: blank the microscope software's scale-bar stamp before anything else.

Every Aria image carries a scale-bar stamp in its bottom-right corner whose style differs by
class (a large black "200 pixels" bar on a white box in some Benign and Early images, a small
box with red or black text in the others), so the corner alone predicts the class. Looked at
on the 224×224 ``Original`` and ``Segmented`` images: the large box spans rows 194-221 and
columns 193-223, the small one rows 205-216 and columns 191-218; no other corner carries a
stamp. The mask covers the bottom 32 rows and right 44 columns (it also covers the 16×40
corner that the issue measured), as shares of the image so that it applies at any size.

The box is filled with one constant colour, the same for every image: filling with the local
background would copy the field's stain colour into the box, and that colour alone predicts
the class (see :mod:`dtl.data.probe`), so only a constant carries no label at all. The mask
is applied to the raw RGB before segmentation and resizing, in training, evaluation and the
served model alike; it travels in the :class:`~dtl.model.preprocess.InputSpec` of every
checkpoint and logged model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dtl.model.errors import DTLError

ARIA_BOX = (32 / 224, 44 / 224)  # (height, width) share of the bottom-right corner
LIGHT_FILL = (230, 230, 230)  # a neutral version of the bright-field background
DARK_FILL = (0, 0, 0)  # the background of segmented images


@dataclass(frozen=True)
class AnnotationMask:
    """A bottom-right box (shares of the image height and width) filled with a constant RGB."""

    height: float = ARIA_BOX[0]
    width: float = ARIA_BOX[1]
    fill: tuple[int, int, int] = LIGHT_FILL

    def to_dict(self) -> dict:
        return {"corner": "bottom-right", "height": self.height, "width": self.width, "fill": list(self.fill)}

    @classmethod
    def from_dict(cls, d: dict | None) -> AnnotationMask | None:
        """The mask of a spec dict, or None when the dict is empty (models logged before masking)."""
        if not d:
            return None
        if d.get("corner", "bottom-right") != "bottom-right":
            raise DTLError(f"unknown annotation-mask corner {d.get('corner')!r}; only bottom-right is known")
        return cls(float(d["height"]), float(d["width"]), tuple(int(v) for v in d["fill"]))

    def box(self, h: int, w: int) -> tuple[int, int]:
        """(first row, first column) of the masked box in an ``h``×``w`` image."""
        return h - int(round(self.height * h)), w - int(round(self.width * w))


def apply_mask(rgb: np.ndarray, mask: AnnotationMask | None) -> np.ndarray:
    """``rgb`` with the annotation box filled (a copy), or ``rgb`` itself when there is no mask."""
    if mask is None:
        return rgb
    out = np.array(rgb, copy=True)
    y0, x0 = mask.box(*out.shape[:2])
    out[y0:, x0:] = np.asarray(mask.fill, dtype=out.dtype)
    return out


def annotation_mask(mode: str, kind: str, variant: str = "original") -> AnnotationMask | None:
    """The mask a phase's data gets: ``on``/``off``, or ``auto`` = on for Aria (and its demo),
    whose stamp leaks the label, off for sets without such a stamp."""
    if mode == "off" or (mode == "auto" and kind not in ("aria", "demo-aria")):
        return None
    return AnnotationMask(fill=DARK_FILL if variant == "segmented" else LIGHT_FILL)


def mask_state(mode: str, kind: str, variant: str = "original") -> str:
    """``on`` or ``off``: what :func:`annotation_mask` decides, as logged in tags, cards and reports."""
    return "on" if annotation_mask(mode, kind, variant) else "off"
