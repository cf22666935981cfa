"""The network a logged model rebuilds: a timm backbone (no classifier, feature map out) and a
phase head. Phase 1 uses a linear head; phase 2 a small conv block for peripheral-blood-smear
features, then pooling and the classifier. Building, initialising and transferring weights is
training code (:mod:`dtl.train.weights`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import timm
from timm.models import group_parameters
from timm.models.inception_v3 import InceptionAux
from torch import nn

from dtl.model.errors import DTLError


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network: stored with every checkpoint and logged model."""

    backbone: str
    classes: tuple[str, ...]
    head: str = "linear"
    head_channels: int = 256
    head_dropout: float = 0.2
    aux: bool = False  # InceptionV3 auxiliary classifier (training only)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(d["backbone"], tuple(d["classes"]), d.get("head", "linear"),
                   int(d.get("head_channels", 256)), float(d.get("head_dropout", 0.2)), bool(d.get("aux", False)))


class PBSHead(nn.Module):
    """conv3×3-BN-ReLU on the backbone feature map, dropout, global average pool, linear."""

    def __init__(self, in_ch: int, n_classes: int, channels: int, dropout: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, n_classes)

    def features(self, x):
        """The pooled output of the conv block: what the last linear layer sees."""
        return self.pool(self.block(x)).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))


class LinearHead(nn.Module):
    def __init__(self, in_ch: int, n_classes: int, dropout: float):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_ch, n_classes)

    def features(self, x):
        """The pooled backbone features: what the last linear layer sees."""
        return self.drop(self.pool(x).flatten(1))

    def forward(self, x):
        return self.fc(self.features(x))


class DTLNet(nn.Module):
    """Backbone + head. ``forward`` returns the logits (with an auxiliary head in training mode,
    ``(logits, aux_logits)``: see :meth:`forward`)."""

    def __init__(self, spec: ModelSpec, pretrained: bool = False):
        super().__init__()
        self.spec = spec
        self.backbone = timm.create_model(spec.backbone, pretrained=pretrained, num_classes=0, global_pool="")
        n = len(spec.classes)
        feats = self.backbone.num_features
        self.head = (PBSHead(feats, n, spec.head_channels, spec.head_dropout) if spec.head == "pbs"
                     else LinearHead(feats, n, spec.head_dropout))
        self._frozen_bn: list[nn.Module] = []
        self.aux_head = None
        if spec.aux:
            if not hasattr(self.backbone, "forward_preaux"):
                raise DTLError(f"aux_weight > 0 needs a backbone with auxiliary logits (inception_v3), "
                               f"not {spec.backbone}")

            self.aux_head = InceptionAux(768, n)

    def forward(self, x):
        """Logits; while training with an auxiliary head, ``(logits, aux_logits)``. In eval mode
        (and so in every logged model) always one tensor."""
        if self.aux_head is not None and self.training:
            mid = self.backbone.forward_preaux(x)
            aux = self.aux_head(mid)
            return self.head(self.backbone.forward_postaux(mid)), aux
        return self.head(self.backbone.forward_features(x))

    def features(self, x):
        """Penultimate features: the head's pooled output before its last linear layer
        (``head.fc``), for models that sit on top of the network (the fuzzy head)."""
        return self.head.features(self.backbone.forward_features(x))

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen_bn:  # BatchNorm statistics of frozen stages stay frozen
            m.eval()
        return self

    def stage_groups(self) -> list[list[str]]:
        """Backbone parameter names grouped by timm's coarse ``group_matcher``, stem first."""
        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=True))
        return [names for _, names in sorted(groups.items(), key=lambda kv: kv[0])]

    def set_unfreeze(self, k: int) -> None:
        """Train the top ``k`` backbone stages and the head; ``k=-1`` trains everything."""
        groups = self.stage_groups()
        if k > len(groups) or k < -1:
            raise DTLError(f"unfreeze={k} is out of range for {self.spec.backbone}: it has {len(groups)} stage "
                           f"groups; valid values are 0 (head only) to {len(groups)}, or -1 (all)")
        trainable = {n for g in (groups if k < 0 else groups[len(groups) - k:] if k > 0 else []) for n in g}
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(name in trainable)
        for p in self.head.parameters():
            p.requires_grad_(True)
        if self.aux_head is not None:
            for p in self.aux_head.parameters():
                p.requires_grad_(True)
        self._frozen_bn = [m for m in self.backbone.modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm)
                           and not any(p.requires_grad for p in m.parameters(recurse=False))]
        self.train(self.training)
