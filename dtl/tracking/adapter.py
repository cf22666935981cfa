"""The adapter to MLflow tracking: runs, tags, params, metrics, artifacts, dataset inputs.

Runs are created and written through ``MlflowClient`` with explicit run ids (no global
active-run stack), so nested study/trial runs, resumed runs and parallel workers never step
on each other. Under ``mlflow run`` the run that MLflow created (``MLFLOW_RUN_ID``) is the
pipeline's root run and its experiment is used: ``set_experiment`` is never called.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import pandas as pd
import requests
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from dtl import DTLError
from dtl.evaluation.metrics import Evaluation, confusion_figure
from dtl.tracking import schema

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_SECRET = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@]+):(?P<pw>[^@/]+)@", re.I)


def command_line() -> str:
    """This process's ``dtl`` command line as recorded in provenance and reports, passwords removed
    (``-o tune.storage=postgresql://user:pw@host/db`` is a normal way to pass a storage URL)."""
    return redact("dtl " + " ".join(sys.argv[1:]))


def redact(uri: str) -> str:
    """Strip the password from a URL (``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``)."""
    return _SECRET.sub(lambda m: f"{m['scheme']}{m['user']}:***@", uri or "")


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


@dataclass
class Tracking:
    """Where runs go: the client, the experiment and (under ``mlflow run``) the outer run."""

    client: MlflowClient
    uri: str
    experiment_id: str
    outer_run_id: str | None = None


def connect(tracking_uri: str = "", experiment: str = "all-dtl") -> Tracking:
    """Resolve the tracking URI, check that it answers, and find or create the experiment.

    Fails before any training with a message that names the URI (password removed)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # child processes (mlflow models serve, workers) follow
    try:
        reachable(uri, "MLflow tracking server")
        client = _init_sqlite_store(uri) if uri.startswith("sqlite:///") else MlflowClient(uri)
        if uri.startswith(("http://", "https://")):
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
            _check_login(client, uri)
        outer = os.environ.get("MLFLOW_RUN_ID")
        if outer:
            exp_id = client.get_run(outer).info.experiment_id
            if exp_id == "0":  # `mlflow run` without --experiment-name: say where the job is going
                print(f"note: this `mlflow run` logs to MLflow's Default experiment; the recipe names "
                      f"{experiment!r}: add --experiment-name {experiment} to keep the job there", file=sys.stderr)
        else:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else _create_experiment(client, experiment)
    except DTLError:
        raise
    except Exception as e:
        raise DTLError(f"MLflow tracking server {redact(uri)} is not reachable or not usable "
                       f"({type(e).__name__}: {redact(str(e))[:300]}). Start it, or unset MLFLOW_TRACKING_URI "
                       f"to use the local {DEFAULT_TRACKING_URI}.") from None
    return Tracking(client, uri, exp_id, outer)


DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433, "http": 80, "https": 443}


def reachable(uri: str, what: str, timeout: float = 3.0) -> None:
    """Fail fast when nothing answers at a server URI's host and port (a TCP connect within
    ``timeout`` seconds): drivers and MLflow's HTTP client otherwise retry for minutes. Local
    stores (sqlite, file paths) pass."""
    u = urlparse(uri)
    scheme = u.scheme.split("+", 1)[0].lower()
    if scheme not in DEFAULT_PORTS or not u.hostname:
        return
    try:
        port = u.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise DTLError(f"{what} {redact(uri)}: the port is not a number") from None
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise DTLError(f"{what} {redact(uri)} is not reachable: nothing answers at {u.hostname}:{port} within "
                       f"{timeout:g} s ({type(e).__name__}: {e}). Start it, or check the host and port.") from None


def login_hint() -> str:
    """Why a server with users refused this process: no credentials in the environment, or these."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if not user or not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        return "no credentials are set: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    return f"user {user!r} was not accepted (unknown user or wrong MLFLOW_TRACKING_PASSWORD)"


def _check_login(client: MlflowClient, uri: str) -> None:
    """A server with authentication (``mlflow server --app-name basic-auth``) answers 401 without
    valid credentials: say so before any work, naming the server and what to set."""
    try:
        client.search_experiments(max_results=1)
    except MlflowException as e:
        if e.error_code != "UNAUTHENTICATED":
            raise
        raise DTLError(f"MLflow tracking server {redact(uri)} requires a login and {login_hint()}; "
                       "a job needs at least READ permission, training and registration EDIT.") from None


def _init_sqlite_store(uri: str) -> MlflowClient:
    """Create/migrate a local sqlite store under a file lock: two workers starting at once would
    otherwise both run MLflow's schema migrations on the same file and one would fail."""
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(str(db) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:  # the first access of each store (tracking, registry) creates or migrates the tables
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
            return client
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _create_experiment(client: MlflowClient, name: str) -> str:
    try:
        return client.create_experiment(name)
    except Exception:  # another worker created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class Run:
    """One MLflow run, written through the client by id."""

    def __init__(self, tracking: Tracking, run_id: str):
        self.t, self.id = tracking, run_id

    @property
    def client(self) -> MlflowClient:
        return self.t.client

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self.client.get_run(self.id).data.params
        items = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        if items:
            self.client.log_batch(self.id, params=items)  # MLflow splits large batches itself

    def log_metrics(self, metrics: dict[str, float], step: int = 0, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None) -> None:
        """Log numeric metrics (NaN skipped); ``model_id`` and ``dataset`` (name, digest) link
        them to a logged model and the dataset they were computed on (MLflow 3)."""
        ts = int(time.time() * 1000)
        name, digest = dataset or (None, None)
        if model_id is None and mlflow.get_active_model_id():  # a loaded model is MLflow's active model: it takes
            mlflow.clear_active_model()                        # every metric logged without a model id
        items = [Metric(k, float(v), ts, step, model_id=model_id, dataset_name=name, dataset_digest=digest)
                 for k, v in metrics.items() if _is_number(v)]
        if items:
            self.client.log_batch(self.id, metrics=items)  # MLflow splits large batches itself

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        if items:
            self.client.log_batch(self.id, tags=items)

    def log_dict(self, obj: Any, path: str) -> None:
        self.client.log_dict(self.id, obj, path)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.id, text, path)

    def log_figure(self, fig, path: str) -> None:
        import matplotlib.pyplot as plt  # deferred: plotting, only when a figure is drawn

        self.client.log_figure(self.id, fig, path)
        plt.close(fig)

    def log_artifact(self, local: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.id, str(local), artifact_path)

    def log_table(self, df, path: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(path).name
            df.to_csv(p, index=False)
            self.client.log_artifact(self.id, str(p), str(Path(path).parent) if Path(path).parent != Path(".") else None)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.id, status)

    def reopen(self) -> None:
        self.client.update_run(self.id, status="RUNNING")


def _is_number(v) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f  # NaN is not logged


def _param_value(v: Any) -> str:
    s = redact(str(v)) if isinstance(v, str) else str(v)
    return s[:6000]


def start_run(tracking: Tracking, name: str, tags: dict[str, Any], parent: str | None = None) -> Run:
    tags = {**base_tags(), **tags, schema.RUN_NAME: name}
    if parent:
        tags[schema.PARENT] = parent
    r = tracking.client.create_run(tracking.experiment_id, tags={k: str(v) for k, v in tags.items() if v is not None},
                                   run_name=name)
    return Run(tracking, r.info.run_id)


def base_tags() -> dict[str, str]:
    return {schema.GIT_COMMIT: git_commit(), schema.HOST: socket.gethostname(), schema.PID: str(os.getpid())}


def find_runs(tracking: Tracking, filter_string: str, max_results: int | None = None, page_size: int = 1000):
    """Runs of the experiment matching ``filter_string``, oldest first: every match (paged
    through MLflow's page tokens, past the 1,000 of one page) unless ``max_results`` caps it."""
    out, token = [], None
    while True:
        n = page_size if max_results is None else min(page_size, max_results - len(out))
        page = tracking.client.search_runs([tracking.experiment_id], filter_string=filter_string, max_results=n,
                                           order_by=["attributes.start_time ASC"], page_token=token)
        out.extend(page)
        token = page.token
        if not token or (max_results is not None and len(out) >= max_results):
            return out


def find_run(tracking: Tracking, tags: dict[str, str]) -> Run | None:
    runs = find_runs(tracking, schema.where(tags), 50)
    if not runs:
        return None
    oldest = min(runs, key=lambda r: (r.info.start_time, r.info.run_id))  # the same answer in every process
    return Run(tracking, oldest.info.run_id)


def end_orphans(tracking: Tracking, parent: str | None = None, alive: set[str] | None = None) -> int:
    """End RUNNING dtl runs whose process is gone (same host, pid not alive) as KILLED: study,
    trial and root runs, and the outer run of a killed ``mlflow run`` invocation.

    ``alive`` lists run ids known to be live elsewhere (e.g. trials Optuna still sees running)."""
    flt = schema.where({schema.PARENT: parent} if parent else {}, status="RUNNING")
    n = 0
    host = socket.gethostname()
    for r in find_runs(tracking, flt):
        t = r.data.tags
        if r.info.run_id == tracking.outer_run_id or (alive and r.info.run_id in alive):
            continue
        if schema.PID not in t or t.get(schema.HOST) != host:
            continue
        # an `mlflow run` outer run also records its launcher: alive while either process is
        if any(pid_alive(int(t[k])) for k in (schema.PID, schema.LAUNCHER_PID) if t.get(k, "").isdigit()):
            continue
        tracking.client.set_tag(r.info.run_id, schema.ENDED_BY, "rerun: the process that ran it was gone")
        tracking.client.set_terminated(r.info.run_id, "KILLED")
        n += 1
    return n


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed child not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def dataset_ref(ds, split: str, name: str) -> tuple[str, str]:
    """(name, digest) of one split as logged by :func:`log_dataset`, to link metrics to it."""
    return f"{name}-{split}", hashlib.sha256((ds.digest + split).encode()).hexdigest()[:16]


def log_dataset(run: Run, ds, context: str, name: str) -> None:
    """Log one split of the manifest as an MLflow dataset input (``mlflow.log_input`` by run id)."""
    split = {"training": "train", "validation": "val", "test": "test"}[context]
    df = ds.manifest[ds.manifest["split"] == split]
    if not len(df):
        return
    ds_name, digest = dataset_ref(ds, split, name)
    dataset = mlflow.data.from_pandas(pd.DataFrame(df), source=str(ds.root), name=ds_name, digest=digest)
    run.client.log_inputs(run.id, [DatasetInput(dataset._to_mlflow_entity(),
                                                [InputTag(schema.DATASET_CONTEXT, context)])])


def log_data(run: Run, ds, name: str) -> None:
    """Manifest (CSV), audit (JSON) and the three dataset inputs of a phase's data."""
    run.log_table(ds.manifest, f"data/{name}_manifest.csv")
    audit = ds.audit()
    run.log_dict(audit, f"data/{name}_audit.json")
    if ds.unreadable:
        run.log_text("\n".join(ds.unreadable), f"data/{name}_skipped_unreadable.txt")
    for ctx in ("training", "validation", "test"):
        log_dataset(run, ds, ctx, name)


def log_evaluation(run: Run, ev: Evaluation, prefix: str = "", model_id: str | None = None, data=None) -> None:
    """Metrics with CIs, confusion matrices (JSON + PNG) and predictions of a final evaluation.

    With ``model_id`` and ``data`` (the dataset and the name it was logged under), each
    split's metrics are linked to the logged model and to that split's dataset, so MLflow's
    model views compare models by them."""
    if model_id is None or data is None:
        run.log_metrics(ev.metrics)
    else:
        ds, name = data
        for split in {k.split("_", 1)[0] for k in ev.metrics}:
            run.log_metrics({k: v for k, v in ev.metrics.items() if k.startswith(f"{split}_")},
                            model_id=model_id, dataset=dataset_ref(ds, split, name))
    if ev.ci_unit:
        run.set_tags({schema.CI_UNIT_PREFIX + split: unit for split, unit in ev.ci_unit.items()})
    for split, cm in ev.confusion.items():
        run.log_dict(cm, f"evaluation/{prefix}confusion_{split}.json")
        run.log_figure(confusion_figure(cm, f"{prefix}{split}"), f"evaluation/{prefix}confusion_{split}.png")
    for split, table in ev.predictions.items():
        run.log_table(table, f"evaluation/{prefix}predictions_{split}.csv")


def download(run_id: str, path: str, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))


def system_metrics(run_id: str):
    """Start MLflow's system-metrics monitor (CPU, memory, disk, network; GPU where pynvml
    sees one) on ``run_id``, so a slow study can be explained from the UI; call ``finish()``
    on the result. A resumed run continues its step count. Interval:
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL (default 10 s)."""
    # its start/stop/no-GPU INFO lines would interleave with the progress lines of every study
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    if mlflow.get_active_model_id():  # its thread would link every sample to a model loaded before
        mlflow.clear_active_model()
    monitor = SystemMetricsMonitor(run_id, resume_logging=True)  # to the URI connect() set
    monitor.start()
    return monitor


@contextlib.contextmanager
def ended(run: Run, end: bool = True):
    """Yield ``run``; end it FINISHED, or FAILED (KILLED on an interrupt) with the reason as a tag.
    ``end=False`` for ``mlflow run``'s own run: MLflow ends that one (the reason is tagged all the same)."""
    try:
        yield run
    except BaseException as e:
        try:
            run.set_tags({schema.FAIL_REASON: f"{type(e).__name__}: {str(e)[:400]}"})
            if end:
                run.end("FAILED" if isinstance(e, Exception) else "KILLED")
        except Exception:  # noqa: BLE001 - the tracking server itself may be gone
            pass
        raise
    if end:
        run.end("FINISHED")


def mark_outer(tracking: Tracking, role: str) -> None:
    """Give ``mlflow run``'s own run (if this process runs under one) the role of its job."""
    if tracking.outer_run_id:
        Run(tracking, tracking.outer_run_id).set_tags({schema.ROLE: role})


def command_run(tracking: Tracking, name: str, tags: dict):
    """The run of one command (``evaluate``, ``report``): ``mlflow run``'s own run when there is
    one, tagged, else a new run; a context manager that ends it (:func:`ended`)."""
    if tracking.outer_run_id:
        run = Run(tracking, tracking.outer_run_id)
        run.set_tags(tags)
    else:
        run = start_run(tracking, name, tags)
    return ended(run, end=not tracking.outer_run_id)


def is_tracking_failure(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is the tracking server going away mid-run."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, requests.exceptions.ConnectionError) or (
                isinstance(e, MlflowException) and ("API request" in str(e) or "Max retries" in str(e))):
            return True
        e = e.__cause__ or e.__context__
    return False
