"""The loop: ``train_one_epoch`` and ``evaluate`` return plain dicts.

No MLflow, no Optuna, no argparse here. Device-agnostic: ``torch.autocast(device_type=...)``;
``fp16`` uses a GradScaler (steps it skips for inf/NaN gradients are counted), ``bf16``
needs none. A non-finite loss stops training with :class:`NonFiniteLoss`: never train on.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dtl import DTLError
from dtl.config import AugmentConfig
from dtl.evaluation.metrics import point_metrics
from dtl.model.preprocess import InputSpec, eval_transform
from dtl.train.augment import train_transform


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf; the run must end as failed."""


@dataclass(frozen=True)
class Precision:
    """Resolved AMP setting: what autocast runs in and whether a GradScaler is used."""

    name: str  # fp32 | fp16 | bf16
    device_type: str

    @property
    def dtype(self):
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.name)

    @property
    def enabled(self) -> bool:
        return self.name != "fp32"

    def autocast(self):
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.enabled)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DTLError(f"device={name!r} but CUDA is not available here; use device=cpu or auto")
    return dev


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto`` = bf16 where the GPU supports it (else fp16), fp32 on the CPU."""
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    return Precision(name, device.type)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier: linear warm-up over ``warmup`` steps, then cosine annealing to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def weighted_smoothed_ce(logits: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor | None = None,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against the smoothed target, each sample weighted by ``w[y]`` (weighted mean).

    PyTorch's ``cross_entropy(weight=w, label_smoothing=e)`` also weights the smoothing term of
    each class by ``w[c]``, which skews the target itself (weights [0.75, 1.5], e=0.1: the optimum
    p(y|y) is 0.905 instead of 0.95). Here the target stays ``(1-e)·onehot + e/K`` for every class
    weighting, so the weights change how much a sample counts, never what it is pulled towards."""
    logp = F.log_softmax(logits.float(), dim=1)
    k = logits.shape[1]
    per_sample = -(1.0 - label_smoothing) * logp.gather(1, y[:, None]).squeeze(1) \
        - label_smoothing / k * logp.sum(1)
    if class_weights is None:
        return per_sample.mean()
    w = class_weights[y]
    return (w * per_sample).sum() / w.sum()


def train_one_epoch(model, loader, optimizer, scheduler, scaler, precision: Precision, spec: InputSpec,
                    aug: AugmentConfig, gen: torch.Generator, class_weights=None, label_smoothing=0.0,
                    grad_clip: float = 0.0, channels_last: bool = False, aux_weight: float = 0.0) -> dict:
    model.train()
    total, n, skipped = 0.0, 0, 0
    t0 = time.perf_counter()
    for step, (x_u8, y) in enumerate(loader):
        x = train_transform(x_u8, spec, aug, gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            out = model(x)
            logits, aux = out if isinstance(out, tuple) else (out, None)
            loss = weighted_smoothed_ce(logits, y, class_weights, label_smoothing)
            if aux is not None:  # InceptionV3 auxiliary logits: training only, weighted
                loss = loss + aux_weight * weighted_smoothed_ce(aux, y, class_weights, label_smoothing)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"training loss is {loss.item()} at step {step} of the epoch: "
                                "lower the learning rate or use fp32/bf16")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scale_before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped += int(scaler.get_scale() < scale_before)  # the scaler backs off when it skips
        else:
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        scheduler.step()
        total += loss.item() * len(y)
        n += len(y)
    dt = time.perf_counter() - t0
    return {"train_loss": total / max(n, 1), "skipped_steps": skipped, "train_images_per_s": n / max(dt, 1e-9),
            "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def predict(model, loader, precision: Precision, spec: InputSpec, tta: bool = False,
            channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels over a loader (optionally averaged over flips)."""
    model.eval()
    probs, labels = [], []
    for x_u8, y in loader:
        x = eval_transform(x_u8, spec)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        views = [x, x.flip(-1), x.flip(-2)] if tta else [x]
        with precision.autocast():
            p = sum(torch.softmax(model(v).float(), 1) for v in views) / len(views)
        probs.append(p.cpu())
        labels.append(y.cpu())
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def evaluate(model, loader, precision: Precision, spec: InputSpec, split: str = "val",
             channels_last: bool = False, tta: bool = False) -> dict:
    """Loss, accuracy and macro-F1 of a split, plus the raw probabilities for later use."""
    probs, y = predict(model, loader, precision, spec, tta=tta, channels_last=channels_last)
    loss = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(y)))
    m = point_metrics(y, probs)
    return {f"{split}_loss": loss, f"{split}_accuracy": m["accuracy"], f"{split}_macro_f1": m["macro_f1"],
            f"{split}_balanced_accuracy": m["balanced_accuracy"], "probs": probs, "labels": y}
