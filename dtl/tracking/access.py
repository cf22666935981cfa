"""Permissions on a tracking server with users (``mlflow server --app-name basic-auth``): the
pre-flight of a job that writes, and one line for a refusal met later. The login itself is
checked by :func:`dtl.tracking.adapter.connect`.

Local stores (SQLite, a directory, a database URL) have no users: every check passes there.
"""

from __future__ import annotations

import os
import re
import time

from mlflow.exceptions import MlflowException

from dtl import DTLError
from dtl.tracking import schema
from dtl.tracking.adapter import Tracking, login_hint, redact

READ_ALLOWS = "READ allows `dtl report` and loading models"


def _user() -> str:
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or "(none)"


def denied_message(e: BaseException, uri: str) -> str | None:
    """One line for an MLflow permission refusal (HTTP 401/403 from an authenticating server), naming
    the server, the user and the permission the refused request needs; None for other errors."""
    if not isinstance(e, MlflowException) or e.error_code not in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return None
    if e.error_code == "UNAUTHENTICATED":
        return f"MLflow tracking server {redact(uri)} requires a login and {login_hint()}"
    m = re.search(r"endpoint (\S+)", str(e))
    endpoint = m.group(1) if m else "a request"
    what = ("the registered model: registering and promoting (aliases) need EDIT"
            if "registered-models" in endpoint or "model-versions" in endpoint
            else "the experiment: creating and writing runs needs EDIT")
    return (f"MLflow tracking server {redact(uri)} denied {endpoint} to user {_user()!r}: no permission on {what} "
            f"({READ_ALLOWS}). Ask the owner or an admin to grant it.")


def check_write_access(tracking: Tracking, registered_model: str = "", stops: str = "Nothing was trained.") -> None:
    """Pre-flight of a job that writes, on a server with users: a harmless tag write on the
    experiment (creating runs needs EDIT there) and, when it exists, on the registered model
    (versions and aliases need EDIT there). Every missing permission is named in one line, before
    any training; a registered model that does not exist yet is created by the job, which then
    manages it. Local stores pass."""
    if not tracking.uri.startswith(("http://", "https://")):
        return
    c, stamp = tracking.client, time.strftime("%Y-%m-%dT%H:%M:%S")
    probes = [(f"experiment {c.get_experiment(tracking.experiment_id).name!r}",
               lambda: c.set_experiment_tag(tracking.experiment_id, schema.WRITE_CHECKED, stamp))]
    if registered_model and c.search_registered_models(f"name = '{registered_model}'", max_results=1):
        probes.append((f"registered model {registered_model!r}",
                       lambda: c.set_registered_model_tag(registered_model, schema.WRITE_CHECKED, stamp)))
    missing = []
    for what, probe in probes:
        try:
            probe()
        except MlflowException as e:
            if e.error_code != "PERMISSION_DENIED":
                raise
            missing.append(what)
    if missing:
        raise DTLError(f"MLflow tracking server {redact(tracking.uri)}: user {_user()!r} has no EDIT permission on "
                       f"{' and on '.join(missing)} (runs, model versions and aliases need EDIT; {READ_ALLOWS}). "
                       f"Ask the owner or an admin to grant it. {stops}")
