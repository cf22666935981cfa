"""Deprecated: moved to :mod:`dtl.model.net` (the network) and :mod:`dtl.train.weights`
(building and initialising it). Kept so that models pickled before the package redesign
(``mlflow.pytorch.load_model``) still load: it re-exports the network's classes only."""

import warnings

from dtl.model.net import DTLNet, LinearHead, ModelSpec, PBSHead  # noqa: F401

warnings.warn(f"Importing from {__name__} is deprecated, please import via dtl.model.net", DeprecationWarning,
              stacklevel=2)
