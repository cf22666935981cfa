"""What the MLflow UI opens on an experiment of this project: its training runs (not the GenAI
overview), and a shared runs-table view, ``comparison``, that shows each study row with the
columns of the comparison (backbone, strategy, protocol, masking, the headline metrics and CIs).

MLflow keeps the UI's column choice in the browser; a shared view is an experiment tag
(``mlflow.sharedViewState.<key>``) that ``#/experiments/<id>/runs?viewStateShareKey=<key>`` opens.
"""

from __future__ import annotations

import json

from mlflow.exceptions import MlflowException

from dtl.tracking import schema
from dtl.tracking.adapter import Tracking

VIEW = "comparison"
TAG_COLUMNS = (schema.ROLE, schema.PHASE, schema.BACKBONE, schema.STRATEGY, schema.PREPROCESSING, schema.INIT,
               schema.SPLIT_PROTOCOL, schema.ANNOTATION_MASK)
# the rows of the comparison: studies and baselines (trials, folds and explain runs stay nested under
# their study); the job's pipeline and report runs stay on the default table
SEARCH_FILTER = (f"tags.`{schema.ROLE}` != '{schema.Role.PIPELINE}' and "
                 f"tags.`{schema.ROLE}` != '{schema.Role.REPORT}'")
METRIC_COLUMNS = ("test_accuracy", "test_accuracy_ci_low", "test_accuracy_ci_high", "test_macro_f1", "val_macro_f1")


def view_state() -> dict:
    """The shared view: the study and baseline rows (:data:`SEARCH_FILTER`), with the registered
    models, then the comparison's tags (preprocessing: colour and stain settings) and metrics."""
    cols = ["attributes.`Models`"]
    cols += [f"tags.`{k}`" for k in TAG_COLUMNS] + [f"metrics.`{m}`" for m in METRIC_COLUMNS]
    return {"searchFilter": SEARCH_FILTER, "orderByKey": "attributes.start_time", "orderByAsc": False, "selectedColumns": cols}


def view_url(tracking: Tracking) -> str:
    """The view's address below the UI's root (``http://127.0.0.1:5000/`` + this)."""
    return f"#/experiments/{tracking.experiment_id}/runs?viewStateShareKey={VIEW}"


def prepare_experiment(tracking: Tracking) -> None:
    """Open the experiment on its training runs and store the comparison view (each job rewrites it)."""
    exp = tracking.client.get_experiment(tracking.experiment_id)
    if schema.EXPERIMENT_KIND not in exp.tags:
        _set_tag(tracking, schema.EXPERIMENT_KIND, "custom_model_development", keep_other=True)
    value = json.dumps(view_state())
    if exp.tags.get(schema.SHARED_VIEW_PREFIX + VIEW) != value:
        _set_tag(tracking, schema.SHARED_VIEW_PREFIX + VIEW, value)


def _set_tag(tracking: Tracking, key: str, value: str, keep_other: bool = False) -> None:
    """Set an experiment tag that concurrent jobs may be setting too. MLflow's SQL store inserts a
    tag it did not see, so two jobs starting together on one server can both insert and one gets a
    unique-key error (seen on PostgreSQL): then the other job's write stands if it holds ``value``
    (or any value, with ``keep_other``); otherwise the tag now exists and a second write updates it."""
    try:
        tracking.client.set_experiment_tag(tracking.experiment_id, key, value)
    except MlflowException:
        now = tracking.client.get_experiment(tracking.experiment_id).tags.get(key)
        if now is None:
            raise
        if now != value and not keep_other:
            tracking.client.set_experiment_tag(tracking.experiment_id, key, value)
