"""The logged fuzzy-head model: a pyfunc flavor (loader ``dtl.fuzzy_serving``).

Images in (the same input formats and preprocessing as :mod:`dtl.serving`, whose decoding
this reuses), out per image: the fuzzy system's ``class``, ``p_<class>`` (normalised crisp
outputs) and ``firing_strength`` (the strongest rule activation: low = the input is unlike
the training data, abstain). The backbone runs inside: ``dtl/weights.safetensors`` +
``dtl/spec.json`` as in the softmax model, plus the rule base in ``dtl/fuzzy.json``. Nothing
is unpickled on load.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from dtl.fuzzy import FuzzySystem
from dtl.serving import (
    DATA_DIR,
    ImageClassifier,
    InputPolicy,
    load_classifier,
    pip_requirements,
    read_images,
    signature_and_example,
)

SYSTEM_FILE = "fuzzy.json"


@torch.no_grad()
def features_and_probs(net, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass: the head's pooled features and the softmax head's probabilities."""
    f = net.features(x)
    return f.float().cpu().numpy(), torch.softmax(net.head.fc(f).float(), 1).cpu().numpy()


class FuzzyImageClassifier(ImageClassifier):
    """The backbone's features through the Mamdani system instead of the linear layer."""

    def __init__(self, base: ImageClassifier, system: FuzzySystem):
        super().__init__(base.net, base.classes, base.spec, base.segment, base.batch_size, base.policy)
        self.system = system

    def features(self, images: list[np.ndarray]) -> np.ndarray:
        out = [features_and_probs(self.net, self.preprocess(images[i:i + self.batch_size]))[0]
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.system.mean.shape[0]))

    def predict(self, data, params=None) -> pd.DataFrame:
        probs, strength = self.system.predict_proba(self.features(read_images(data, self.policy)))
        df = pd.DataFrame(probs.astype(np.float32), columns=[f"p_{c}" for c in self.classes])
        df.insert(0, "class", [self.classes[j] for j in probs.argmax(1)] if len(probs) else [])
        df["firing_strength"] = strength.astype(np.float32)
        return df


def _load_pyfunc(path: str, model_config: dict | None = None) -> FuzzyImageClassifier:
    """MLflow's pyfunc entry point (``loader_module: dtl.fuzzy_serving``); ``path`` is the data folder,
    ``model_config`` the caller's input policy (file paths only when asked, as for the softmax model)."""
    dev = os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    system = FuzzySystem.from_dict(json.loads((Path(path) / SYSTEM_FILE).read_text()))
    return FuzzyImageClassifier(load_classifier(path, dev, InputPolicy.from_config(model_config)), system)


def save_model(path, net, meta: dict, system: FuzzySystem, example_image: np.ndarray, card: str,
               mlflow_model=None, **_ignored):
    """Write the pyfunc model to ``path`` (called by ``mlflow.models.Model.log``)."""
    import mlflow.pyfunc  # deferred: logging code; pulls SciPy into serving
    from mlflow.types.schema import ColSpec, Schema  # deferred: as above

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / DATA_DIR
        data.mkdir()
        save_file({k: v.contiguous() for k, v in net.cpu().state_dict().items()}, str(data / "weights.safetensors"))
        (data / "spec.json").write_text(json.dumps(meta, indent=2, default=str))
        (data / SYSTEM_FILE).write_text(json.dumps(system.to_dict()))
        (data / "rules.txt").write_text(system.rules_text() + "\n")
        (data / "MODEL_CARD.md").write_text(card)
        signature, example = signature_and_example(example_image, list(system.classes))
        signature.outputs = Schema(signature.outputs.inputs + [ColSpec("float", "firing_strength")])
        # self-contained like the softmax model: its own copy of dtl and exact pins (scikit-fuzzy too)
        reqs = pip_requirements() + [f"scikit-fuzzy=={version('scikit-fuzzy')}"]
        mlflow.pyfunc.save_model(str(path), loader_module="dtl.fuzzy_serving", data_path=str(data),
                                 mlflow_model=mlflow_model, signature=signature, input_example=example,
                                 code_paths=[str(Path(__file__).resolve().parent)], pip_requirements=reqs,
                                 # MLflow lets a caller override only keys the model was saved with
                                 model_config=InputPolicy().model_config())
