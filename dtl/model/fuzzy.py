"""The fuzzy-head model's pyfunc flavor (``loader_module: dtl.model.fuzzy``; older models say
``dtl.fuzzy_serving``, which re-exports this) and the fitted Mamdani system it serves.

Images in (the same input formats and preprocessing as :mod:`dtl.model.pyfunc`), out per
image: the fuzzy system's ``class``, ``p_<class>`` (normalised crisp outputs) and
``firing_strength`` (the strongest rule activation: low = the input is unlike the training
data, abstain). The backbone runs inside: ``dtl/weights.safetensors`` + ``dtl/spec.json`` as in
the softmax model, plus the rule base in ``dtl/fuzzy.json``. Nothing is unpickled on load.
Fitting the system is in :mod:`dtl.fuzzy.core`; the membership functions are scikit-fuzzy's,
which the fuzzy model pins.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import skfuzzy as fuzz
import torch

from dtl.model.decode import InputPolicy, read_images
from dtl.model.pyfunc import ImageClassifier, load_classifier, output_mode

TNORMS = ("min", "product")
COVER = 1e-3  # every train point has at least this membership, in every dimension, in its own cluster
UNIVERSE_POINTS = 201


@dataclass
class FuzzySystem:
    """A fitted system: the projection, the rule base and the output universe."""

    classes: list[str]
    mean: np.ndarray  # (d,) train feature mean
    projection: np.ndarray  # (d, k) standardise + PCA + scale, as one matrix
    centres: np.ndarray  # (J, k) cluster centres = Gaussian means
    sigmas: np.ndarray  # (J, k) fuzzy spreads = Gaussian sigmas
    weights: np.ndarray  # (J, C) consequent weight of "class c is HIGH" in rule j
    tnorm: str = "min"
    m: float = 2.0
    n_points: int = UNIVERSE_POINTS

    @property
    def universe(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.n_points)

    @property
    def cover_floor(self) -> float:
        """The firing strength that every training point reaches by construction (see
        :func:`fuzzy_spreads`): ``COVER`` with min, ``COVER ** k`` with the product t-norm."""
        return COVER if self.tnorm == "min" else COVER ** self.centres.shape[1]

    def project(self, features: np.ndarray) -> np.ndarray:
        """Features (n, d) -> PCA coordinates (n, k), first component at unit variance."""
        return (np.asarray(features, dtype=np.float64) - self.mean) @ self.projection

    def rule_activations(self, z: np.ndarray) -> np.ndarray:
        """(n, k) projected inputs -> (n, J) antecedent activation of every rule."""
        mu = fuzz.gaussmf(z[:, None, :], self.centres[None], self.sigmas[None])  # (n, J, k)
        return mu.min(-1) if self.tnorm == "min" else mu.prod(-1)

    def infer(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Crisp output per class (n, C) and firing strength (n,) for a batch of features."""
        alpha = self.rule_activations(self.project(features))
        return mamdani(alpha, self.weights, self.universe), alpha.max(1)

    def predict_proba(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (crisp outputs normalised; uniform where no rule fires) and firing strength."""
        out, strength = self.infer(features)
        total = out.sum(1, keepdims=True)
        probs = np.divide(out, total, out=np.full_like(out, 1.0 / out.shape[1]), where=total > 0)
        return probs, strength

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "mean": self.mean.tolist(), "projection": self.projection.tolist(),
                "centres": self.centres.tolist(), "sigmas": self.sigmas.tolist(), "weights": self.weights.tolist(),
                "tnorm": self.tnorm, "m": self.m, "n_points": self.n_points}

    @classmethod
    def from_dict(cls, d: dict) -> FuzzySystem:
        arr = {k: np.asarray(d[k], dtype=np.float64) for k in ("mean", "projection", "centres", "sigmas", "weights")}
        return cls(list(d["classes"]), tnorm=d["tnorm"], m=float(d["m"]), n_points=int(d["n_points"]), **arr)

    def rules_text(self) -> str:
        """The rule base, one line per rule, for humans (logged next to the model)."""
        lines = []
        for j in range(len(self.centres)):
            ante = " AND ".join(f"z{d + 1} is N({self.centres[j, d]:+.2f}, {self.sigmas[j, d]:.2f})"
                                for d in range(self.centres.shape[1]))
            cons = ", ".join(f"{c} is HIGH ({self.weights[j, i]:.2f})" for i, c in enumerate(self.classes))
            lines.append(f"R{j + 1}: IF {ante} THEN {cons}; LOW with 1 - weight")
        return "\n".join(lines)


def output_terms(universe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two output terms of every class on [0, 1]: LOW (ramp down) and HIGH (ramp up)."""
    return fuzz.trimf(universe, [0.0, 0.0, 1.0]), fuzz.trimf(universe, [0.0, 1.0, 1.0])


def mamdani(alpha: np.ndarray, weights: np.ndarray, universe: np.ndarray) -> np.ndarray:
    """Mamdani inference from rule activations (n, J) and consequent weights (J, C).

    Clipping (min implication) is monotone in the activation, so max-aggregating the clipped
    terms of all rules equals clipping each term once at its largest activation: that is
    computed here, then the centroid of ``max(min(HIGH, a_high), min(LOW, a_low))`` per class.
    An output with zero area (no rule fires at all) is 0: no evidence for the class."""
    a_high = (alpha[:, :, None] * weights[None]).max(1)  # (n, C)
    a_low = (alpha[:, :, None] * (1.0 - weights[None])).max(1)
    low, high = output_terms(universe)
    agg = np.maximum(np.minimum(high, a_high[..., None]), np.minimum(low, a_low[..., None]))  # (n, C, U)
    area = agg.sum(-1)
    return np.divide((agg * universe).sum(-1), area, out=np.zeros_like(area), where=area > 0)


SYSTEM_FILE = "fuzzy.json"


@torch.no_grad()
def features_and_probs(net, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass: the head's pooled features and the softmax head's probabilities."""
    f = net.features(x)
    return f.float().cpu().numpy(), torch.softmax(net.head.fc(f).float(), 1).cpu().numpy()


class FuzzyImageClassifier(ImageClassifier):
    """The backbone's features through the Mamdani system instead of the linear layer."""

    def __init__(self, base: ImageClassifier, system: FuzzySystem):
        super().__init__(base.net, base.classes, base.spec, base.segment, base.batch_size, base.policy,
                         output=base.output)
        self.system = system

    def features(self, images: list[np.ndarray]) -> np.ndarray:
        out = [features_and_probs(self.net, self.preprocess(images[i:i + self.batch_size]))[0]
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.system.mean.shape[0]))

    def predict(self, data, params=None) -> pd.DataFrame | pd.Series:
        probs, strength = self.system.predict_proba(self.features(read_images(data, self.policy)))
        df = pd.DataFrame(probs.astype(np.float32), columns=[f"p_{c}" for c in self.classes])
        df.insert(0, "class", [self.classes[j] for j in probs.argmax(1)] if len(probs) else [])
        df["firing_strength"] = strength.astype(np.float32)
        return self.shaped(df)


def _load_pyfunc(path: str, model_config: dict | None = None) -> FuzzyImageClassifier:
    """MLflow's pyfunc entry point (``loader_module: dtl.fuzzy_serving``); ``path`` is the data folder,
    ``model_config`` the caller's input policy (file paths only when asked, as for the softmax model)."""
    dev = os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    system = FuzzySystem.from_dict(json.loads((Path(path) / SYSTEM_FILE).read_text()))
    return FuzzyImageClassifier(load_classifier(path, dev, InputPolicy.from_config(model_config),
                                                output=output_mode(model_config)), system)
