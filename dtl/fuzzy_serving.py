"""Deprecated: the fuzzy-head model moved to :mod:`dtl.model.fuzzy` (logging in
:mod:`dtl.tracking.logged`). Models logged before the package redesign name
``loader_module: dtl.fuzzy_serving``: this keeps them loading."""

import warnings

from dtl.model.fuzzy import SYSTEM_FILE, FuzzyImageClassifier, FuzzySystem, _load_pyfunc, features_and_probs  # noqa: F401

warnings.warn(f"Importing from {__name__} is deprecated, please import via dtl.model.fuzzy", DeprecationWarning,
              stacklevel=2)
