"""``dtl predict``: classify the user's own image files with a logged or registered model, the
way a colleague would (``mlflow.pyfunc.load_model``), one line per file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import mlflow.pyfunc

from dtl import DTLError
from dtl.model.decode import InputPolicy, image_from_value
from dtl.tracking.adapter import DEFAULT_TRACKING_URI


def predict_files(uri: str, files: list[str], tracking_uri: str = "") -> Iterator[tuple[str, str, bool]]:
    """Load the model at ``uri`` once, then yield (file, its line, ok) per file: the class and the
    probabilities, or the reason the file could not be classified (the others still are)."""
    mlflow.set_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    if not files:
        raise DTLError("predict needs at least one image file")
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as e:
        raise DTLError(f"cannot load model {uri}: {str(e)[:300]}") from None
    for f in files:
        try:
            if not Path(f).exists():
                raise DTLError("no such file")
            arr = image_from_value(f, InputPolicy(allow_paths=True))  # the user's own files, read here
            row = model.predict({"image": [arr]}).iloc[0]
        except DTLError as e:
            yield f, f"{f}: ERROR: {e}", False
            continue
        probs = {k[2:]: round(float(v), 4) for k, v in row.items() if k.startswith("p_")}
        yield f, f"{f}: {row['class']} {json.dumps(probs)}", True
