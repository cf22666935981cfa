"""Batched augmentation for training (the shared preprocessing is :mod:`dtl.model.preprocess`).

Augmentation runs on whole uint8 batches, on whatever device the batch lives on, with
per-sample randomness: one ``affine_grid`` + ``grid_sample`` warp does rotation, flips and
random-resized crop (zoom) with a matrix per sample, and colour jitter is broadcast
arithmetic. The CPU and GPU paths are the same code, so they draw augmentations from the
same distribution (and, given the same generator state, the same augmentations).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dtl.config import AugmentConfig
from dtl.model.preprocess import InputSpec, _normalize, to_float


def sample_affine(n: int, aug: AugmentConfig, gen: torch.Generator, device) -> torch.Tensor:
    """Per-sample 2×3 matrices mapping output to input coordinates (``affine_grid`` convention):
    rotation, horizontal/vertical flip and a random resized crop (area fraction, aspect ratio,
    position inside the image)."""
    def u(lo, hi):
        return torch.rand(n, generator=gen) * (hi - lo) + lo

    theta = u(-aug.rotation, aug.rotation) * (math.pi / 180.0)
    area = u(aug.scale_min, 1.0)
    log_r = u(-aug.ratio, aug.ratio)
    sx = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
    sy = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    fx = torch.where(torch.rand(n, generator=gen) < aug.hflip, -1.0, 1.0)
    fy = torch.where(torch.rand(n, generator=gen) < aug.vflip, -1.0, 1.0)
    tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx)
    ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy)
    cos, sin = torch.cos(theta), torch.sin(theta)
    a = torch.stack([
        torch.stack([cos * sx * fx, -sin * sy * fy, tx], 1),
        torch.stack([sin * sx * fx, cos * sy * fy, ty], 1),
    ], 1)
    return a.to(device)


def sample_jitter(n: int, aug: AugmentConfig, gen: torch.Generator, device) -> torch.Tensor:
    """Per-sample (brightness, contrast, saturation, hue) factors, N×4."""
    def u(amount, center=1.0):
        return (torch.rand(n, generator=gen) * 2 - 1) * amount + center

    return torch.stack([u(aug.brightness), u(aug.contrast), u(aug.saturation), u(aug.hue, 0.0)], 1).to(device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def apply_jitter(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    b, c, s, h = (f[:, i].view(-1, 1, 1, 1) for i in range(4))
    x = x * b
    m = _gray(x).mean(dim=(2, 3), keepdim=True)
    x = (x - m) * c + m
    g = _gray(x)
    x = (x - g) * s + g
    if torch.any(h != 0):
        x = _hue_shift(x, h)
    return x.clamp_(0.0, 1.0)


def _hue_shift(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # Rotation of the chroma plane in YIQ space: a cheap, differentiable hue shift.
    ang = h * 2 * math.pi
    cos, sin = torch.cos(ang), torch.sin(ang)
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                       device=x.device, dtype=x.dtype)
    rgb = torch.linalg.inv(yiq)
    t = torch.einsum("ij,njhw->nihw", yiq, x)
    i2 = t[:, 1:2] * cos - t[:, 2:3] * sin
    q2 = t[:, 1:2] * sin + t[:, 2:3] * cos
    t = torch.cat([t[:, :1], i2, q2], 1)
    return torch.einsum("ij,njhw->nihw", rgb, t)


# Ruifrok & Johnston's stain vectors (haematoxylin, eosin, DAB), as scikit-image's ``rgb_from_hed``.
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
_OD_FLOOR = 1e-6  # scikit-image's: the optical density of a black pixel is -log(1e-6)


def sample_hed(n: int, aug: AugmentConfig, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-stain scale ``U(1-hed, 1+hed)`` and shift ``U(-hed, hed)`` in optical-density
    units (Tellez et al.: stains from ``-log(rgb)``, as scikit-image's ``rgb2hed`` before 0.19), each
    N×3, the shift returned in the units :func:`hed_jitter` works in (today's ``rgb2hed``, which
    divides the optical density by ``-log(1e-6)`` = 13.8). Shifting today's units by ``hed``
    instead was 13.8 times too strong: at 0.2, Aria images came out white, black or red, and both
    models trained on them predicted one class (reports/aria-cpu-tiny, first rebuild)."""
    scale = 1 + (torch.rand(n, 3, generator=gen) * 2 - 1) * aug.hed
    shift = (torch.rand(n, 3, generator=gen) * 2 - 1) * aug.hed / -math.log(_OD_FLOOR)
    return scale.to(device), shift.to(device)


def hed_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] (N×3×H×W) -> stain concentrations (scikit-image's ``rgb2hed``) -> each stain
    ``s * scale + shift`` -> RGB (``hed2rgb``), clipped to [0, 1]. At scale 1 and shift 0 it is
    the plain round trip: the identity for colours the three stains can make."""
    m = torch.tensor(RGB_FROM_HED, device=x.device, dtype=torch.float32)
    inv = torch.linalg.inv(m)
    log_floor = math.log(_OD_FLOOR)
    od = torch.log(x.float().clamp(min=_OD_FLOOR)) / log_floor  # N×3×H×W, >= 0
    stains = torch.einsum("nchw,cs->nshw", od, inv).clamp(min=0)
    stains = stains * scale[:, :, None, None] + shift[:, :, None, None]
    rgb = torch.exp(torch.einsum("nshw,sc->nchw", stains, m) * log_floor)
    return rgb.clamp(0.0, 1.0).to(x.dtype)


def train_transform(batch_u8: torch.Tensor, spec: InputSpec, aug: AugmentConfig,
                    gen: torch.Generator) -> torch.Tensor:
    """Augment a uint8 N×H×W×3 batch into a normalised N×3×size×size float batch."""
    x = to_float(batch_u8)
    n = x.shape[0]
    theta = sample_affine(n, aug, gen, x.device).to(x.dtype)
    grid = F.affine_grid(theta, [n, 3, spec.size, spec.size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    x = apply_jitter(x, sample_jitter(n, aug, gen, x.device).to(x.dtype))
    if aug.hed > 0:
        x = hed_jitter(x, *sample_hed(n, aug, gen, x.device))
    if aug.grey > 0:
        grey = (torch.rand(n, generator=gen) < aug.grey).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(grey, _gray(x).expand_as(x), x)
    return _normalize(x, spec)
