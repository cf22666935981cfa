"""What the model looks at: Grad-CAM maps, a shortcut score, and the CAM grid figure.

Grad-CAM (the ``grad-cam`` package) on the last feature stage of the timm backbone, for the
class the model predicts. The maps are what the package returns: ReLU of the weighted
activations, upsampled to the model's input and scaled to [0, 1] per image. At the backbone's
stride (32) a 96-px input gives a 3×3 map and a 224-px input 7×7: the maps locate regions, not
single cells.

The shortcut score splits each map's mass (its sum) between the stained cells (the foreground
found by the HSV rule of :func:`dtl.data.transforms.hsv_foreground`) and the background, and
measures the share on Aria's annotation box (bottom-right scale-bar stamp, whose style differs
by class) and on the four image corners, each beside its share of the image area: a map spread
evenly has mass share = area share.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dtl import DTLError
from dtl.model.mask import ARIA_BOX
from dtl.model.preprocess import InputSpec, hsv_foreground

# Flag when the annotation box holds more than this multiple of the CAM mass a uniform map would put
# there (its share of the pixels). A ratio, not an absolute share: at stride 32 a 96-px input has a
# 3×3 map, and even a map entirely on the bottom-right cell puts only ~13% of its mass on the box.
ANNOTATION_THRESHOLD = 3.0
REGIONS = ("foreground", "background", "annotation", "corners")


def target_layer(net: nn.Module) -> tuple[str, nn.Module]:
    """The Grad-CAM layer of a :class:`~dtl.models.DTLNet`: the backbone's last feature stage as
    timm's ``feature_info`` names it (ResNet ``layer4``, InceptionV3 ``Mixed_7c``, ConvNeXt
    ``stages.3``), except EfficientNets, whose 1×1 ``conv_head`` after the last stage produces the
    map the head sees (``bn2``, with its activation)."""
    bb = net.backbone
    if hasattr(bb, "conv_head") and hasattr(bb, "bn2"):
        name = "bn2"
    else:
        info = getattr(bb, "feature_info", None)
        if not info:
            raise DTLError(f"cannot find a Grad-CAM layer in backbone {type(bb).__name__}: it has no timm "
                           "feature_info (use a timm CNN: resnet50, efficientnet_b3, inception_v3, test_*)")
        name = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
    return f"backbone.{name}", net.get_submodule(f"backbone.{name}")


def grad_cams(net: nn.Module, x: torch.Tensor, classes, batch_size: int = 64) -> np.ndarray:
    """Grad-CAM maps (N×H×W, each in [0, 1]) of the normalised input batch ``x`` for ``classes``
    (one class index per image)."""
    from pytorch_grad_cam import GradCAM  # deferred: OpenCV and more (1.3 s after timm), only for Grad-CAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # deferred: as above

    _, layer = target_layer(net)
    params = list(net.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:  # the gradients reach the layer only through parameters that require them
        p.requires_grad_(True)
    out = []
    try:
        with GradCAM(model=net, target_layers=[layer]) as cam, torch.enable_grad():
            for i in range(0, len(x), batch_size):
                targets = [ClassifierOutputTarget(int(c)) for c in classes[i:i + batch_size]]
                out.append(cam(input_tensor=x[i:i + batch_size], targets=targets))
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)
        net.zero_grad(set_to_none=True)
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, *x.shape[-2:]), np.float32)


def region_maps(spec: InputSpec, box: tuple[float, float] = ARIA_BOX) -> dict[str, np.ndarray]:
    """Boolean size×size maps, in the model's input frame (the centre crop of the resized image),
    of the annotation box (bottom-right, ``box`` = height and width shares of the image) and of
    the four corner boxes of the same size."""
    c, s = spec.cache_size, spec.size
    off = (c - s) // 2
    bh, bw = int(round(box[0] * c)), int(round(box[1] * c))
    ann = np.zeros((c, c), bool)
    ann[c - bh:, c - bw:] = True
    corners = ann | ann[::-1] | ann[:, ::-1] | ann[::-1, ::-1]
    return {"annotation": ann[off:off + s, off:off + s], "corners": corners[off:off + s, off:off + s]}


def mass_shares(cams: np.ndarray, foreground: np.ndarray, regions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per image: the share of CAM mass on each region (foreground, background, annotation,
    corners) and, as ``<region>_area``, the region's share of the pixels. An all-zero map has no
    mass to share: NaN."""
    total = cams.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        fg = (cams * foreground).sum((1, 2)) / total
    out = {"foreground": fg, "background": 1 - fg, "foreground_area": foreground.mean((1, 2)),
           "background_area": 1 - foreground.mean((1, 2))}
    for name, m in regions.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = (cams * m).sum((1, 2)) / total
        out[f"{name}_area"] = np.full(len(cams), m.mean())
    return out


def foreground_maps(inputs_u8: np.ndarray) -> np.ndarray:
    """HSV foreground of each model-input image (N×size×size×3 uint8 -> N×size×size bool)."""
    return np.stack([hsv_foreground(im) for im in inputs_u8]) if len(inputs_u8) else np.zeros((0, 1, 1), bool)


def shortcut_table(shares: dict[str, np.ndarray], y: np.ndarray, classes: list[str],
                   threshold: float = ANNOTATION_THRESHOLD) -> list[dict]:
    """One row per true class and one for all images: mean mass share and area share of each
    region, ``annotation_ratio`` (mass share / area share) and whether it exceeds ``threshold`` (flagged)."""
    rows = []
    for name, sel in [(c, y == i) for i, c in enumerate(classes)] + [("all", np.ones(len(y), bool))]:
        row = {"class": name, "n": int(sel.sum())}
        for r in REGIONS:
            row[r] = float(np.nanmean(shares[r][sel])) if sel.any() else float("nan")
            row[f"{r}_area"] = float(np.nanmean(shares[f"{r}_area"][sel])) if sel.any() else float("nan")
        row["annotation_ratio"] = row["annotation"] / row["annotation_area"] if row["annotation_area"] else float("nan")
        row["flagged"] = bool(row["annotation_ratio"] > threshold)
        rows.append(row)
    return rows


def pick_examples(y: np.ndarray, pred: np.ndarray, n_classes: int, n: int) -> dict[int, dict[str, list[int]]]:
    """Up to ``n`` correctly and ``n`` wrongly classified item indices per true class (first in order)."""
    out = {}
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        out[c] = {"correct": idx[pred[idx] == c][:n].tolist(), "wrong": idx[pred[idx] != c][:n].tolist()}
    return out


def cam_grid_figure(inputs_u8: np.ndarray, cams: np.ndarray, y: np.ndarray, probs: np.ndarray, classes: list[str],
                    examples: dict, n: int, title: str, box: np.ndarray | None = None):
    """Rows = true classes; the first ``n`` columns correct, the last ``n`` wrong predictions; each
    tile the model's input with its Grad-CAM overlaid, titled true → predicted (probability); the
    annotation box outlined where ``box`` is given; one colour bar for the CAM scale."""
    import matplotlib  # deferred: plotting, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plotting, only when a figure is drawn
    from matplotlib.patches import Rectangle  # deferred: plotting, only when a figure is drawn

    k = len(classes)
    fig, axes = plt.subplots(k, 2 * n, figsize=(1.75 * 2 * n + 1.2, 1.95 * k + 0.9), squeeze=False)
    im = None
    for c in range(k):
        for j, (kind, col) in enumerate([("correct", i) for i in range(n)] + [("wrong", i) for i in range(n)]):
            ax = axes[c][j]
            ax.set_xticks([])
            ax.set_yticks([])
            picks = examples[c][kind]
            if j in (0, n):
                ax.set_ylabel(f"{classes[c]}\n({kind})", fontsize=8)
            if col >= len(picks):
                ax.text(0.5, 0.5, f"no {'more ' if col else ''}{kind}\nprediction", ha="center", va="center",
                        fontsize=7, color="0.4", transform=ax.transAxes)
                continue
            i = picks[col]
            ax.imshow(inputs_u8[i])
            im = ax.imshow(cams[i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if box is not None and box.any():
                rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
                ax.add_patch(Rectangle((cols[0] - 0.5, rows[0] - 0.5), len(cols), len(rows), fill=False,
                                       ec="white", ls="--", lw=0.8))
            p = int(probs[i].argmax())
            ax.set_title(f"{classes[y[i]]}→{classes[p]} ({probs[i, p]:.2f})", fontsize=7,
                         color="black" if p == y[i] else "crimson")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.93, 0.97))
    if im is not None:
        cax = fig.add_axes((0.945, 0.15, 0.012, 0.7))
        fig.colorbar(im, cax=cax, label="Grad-CAM (0-1 per image)")
    return fig
