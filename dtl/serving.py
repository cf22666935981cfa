"""Deprecated: the served model moved to :mod:`dtl.model` (decoding in :mod:`dtl.model.decode`,
the pyfunc flavor in :mod:`dtl.model.pyfunc`; logging in :mod:`dtl.tracking.logged`). Models
logged before the package redesign name ``loader_module: dtl.serving``: this keeps them loading."""

import warnings

from dtl.model.decode import (  # noqa: F401
    IMAGE_FORMATS,
    INPUT_COLUMN,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    InputPolicy,
    InvalidInput,
    decode_image_bytes,
    image_from_value,
    read_images,
    truthy,
)
from dtl.model.pyfunc import (  # noqa: F401
    CALIBRATION_FILE,
    DATA_DIR,
    SERVING_DISTRIBUTIONS,
    ImageClassifier,
    _load_pyfunc,
    load_classifier,
    pip_requirements,
    stored_temperature,
)

warnings.warn(f"Importing from {__name__} is deprecated, please import via dtl.model.pyfunc", DeprecationWarning,
              stacklevel=2)
