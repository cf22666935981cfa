"""Shared fixtures: an isolated MLflow/Optuna workspace per test, the demo data generated
once per session, and the real datasets in ../shared/datasets (skip, or fail in CI)."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("DTL_SHARED_DATASETS", ROOT.parent / "shared" / "datasets"))


def require_real_data() -> Path:
    """The shared real datasets, or a skip with the reason (a failure when DTL_REQUIRE_REAL_DATA=1)."""
    if (SHARED / "aria-all-pbs-2021").is_dir() and (SHARED / "c-nmc-2019-subset").is_dir():
        return SHARED
    msg = f"real datasets not found at {SHARED} (set DTL_SHARED_DATASETS)"
    if os.environ.get("DTL_REQUIRE_REAL_DATA") == "1":
        pytest.fail(msg + " and DTL_REQUIRE_REAL_DATA=1")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One decoded-image cache and demo dataset for the whole session."""
    return tmp_path_factory.mktemp("dtl-cache")


_TEMPLATE: list[Path] = []


def fresh_mlflow_db(folder: Path) -> Path:
    """``folder/mlflow.db``: an empty MLflow store at the current schema, copied from one that MLflow
    created (with its migrations) once per session. Creating each store anew costs 1.5-2.5 s of
    migrations (about 4 s of the fast tier's registry tests). The copy is what MLflow would make in
    ``folder``: its Default experiment's artifacts go to ``folder/mlruns/0``."""
    if not _TEMPLATE:
        from mlflow.tracking import MlflowClient  # deferred: MLflow only for tests that open a store

        tmp = Path(tempfile.mkdtemp(prefix="dtl-mlflow-template-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        with contextlib.chdir(tmp):  # the template's Default experiment points here, never at the checkout
            MlflowClient(f"sqlite:///{tmp}/mlflow.db").search_experiments()  # runs the migrations
        _TEMPLATE.append(tmp / "mlflow.db")
    db = folder / "mlflow.db"
    if not db.exists():
        shutil.copyfile(_TEMPLATE[0], db)
        with contextlib.closing(sqlite3.connect(db)) as con, con:
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                        (str(folder.resolve() / "mlruns" / "0"),))
    return db


@pytest.fixture()
def workspace(tmp_path, monkeypatch, cache_dir):
    """A fresh working directory with its own sqlite MLflow store and Optuna storage."""
    fresh_mlflow_db(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("DTL_KILL_AT", raising=False)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def demo_overrides(cache_dir: Path, tmp: Path, **extra) -> list[str]:
    """Overrides that make the demo recipe tiny: one backbone, 2 trials, 2 epochs."""
    base = {
        "cache_dir": str(cache_dir), "work_dir": str(tmp / "runs"), "report_dir": str(tmp / "report"),
        "tune.storage": f"sqlite:///{tmp}/optuna.db", "backbones": "[test_resnet]",
        "phase1.n_trials": 2, "phase2.n_trials": 2, "phase1.epochs": 2, "phase2.epochs": 2, "bootstrap": 50,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


PYTHON = sys.executable


@contextlib.contextmanager
def tracking_uri_kept():
    """Put back on exit what ``mlflow.set_tracking_uri`` changes: MLflow's module global and
    ``os.environ["MLFLOW_TRACKING_URI"]`` (it writes both, so that children inherit the store).
    Tests call it, and so does ``dtl.tracking.connect``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    uri = utils._tracking_uri if utils else None
    try:
        yield
    finally:
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env
        utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
        if utils is not None:
            utils._tracking_uri = uri


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    """No test leaves MLflow pointed at its (deleted) temporary store for the next one."""
    with tracking_uri_kept():
        yield


@contextlib.contextmanager
def module_workspace(tmp: Path):
    """``workspace`` for module-scoped fixtures: cwd and a sqlite MLflow store in ``tmp``, restored after."""
    import mlflow

    with tracking_uri_kept(), pytest.MonkeyPatch.context() as mp:
        fresh_mlflow_db(tmp)
        mp.chdir(tmp)  # a store's artifacts go under the working directory
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")  # and into os.environ, for subprocesses
        yield tmp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll ``url`` (every 0.25 s, no fixed sleep) until it answers 2xx; fail at once, with the
    server's output where it is piped, if ``proc`` exits first, and after ``timeout`` seconds."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).ok:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still starting up
            pass
        if proc.poll() is not None:
            raise AssertionError(f"{url}: the server exited ({proc.returncode}) "
                                 + (proc.stdout.read()[-3000:] if proc.stdout else ""))
        time.sleep(0.25)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def mlflow_serve(model_uri: str, cwd: Path, timeout: float = 180):
    """A real ``mlflow models serve`` of ``model_uri`` on 127.0.0.1 (local env manager); yields
    its base URL once /ping answers, and stops it afterwards."""
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([str(Path(PYTHON).parent / "mlflow"), "models", "serve", "-m", model_uri,
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/ping", proc, timeout)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def postgres_url() -> str:
    """DTL_PG_URL (postgresql://user:pass@127.0.0.1:port, databases `mlflow` and `optuna`) when it
    answers; else a skip with the reason, a failure when DTL_REQUIRE_POSTGRES=1 (.ci/run)."""
    from urllib.parse import urlparse

    url = os.environ.get("DTL_PG_URL", "")
    reason = "no PostgreSQL: set DTL_PG_URL=postgresql://user:pass@127.0.0.1:port (databases mlflow, optuna)"
    if url:
        u = urlparse(url)
        try:
            socket.create_connection((u.hostname, u.port or 5432), timeout=3).close()
            return url.rstrip("/")
        except OSError:
            reason = f"PostgreSQL at {u.hostname}:{u.port} is not reachable"
    if os.environ.get("DTL_REQUIRE_POSTGRES") == "1":
        pytest.fail(reason + " and DTL_REQUIRE_POSTGRES=1")
    pytest.skip(reason)


def clean_databases(pg: str, names: tuple[str, ...] = ("mlflow", "optuna")) -> None:
    """Empty the PostgreSQL databases a team-server test uses (a clean store per test)."""
    import sqlalchemy

    for db in names:
        eng = sqlalchemy.create_engine(f"{pg}/{db}")
        with eng.begin() as c:
            c.execute(sqlalchemy.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        eng.dispose()


@contextlib.contextmanager
def mlflow_server(workspace: Path, backend: str, *extra: str, env: dict | None = None, workers: int = 2,
                  timeout: float = 180):
    """A real ``mlflow server`` on 127.0.0.1 with ``backend`` as its store and artifacts under
    ``workspace``; its output goes to ``workspace/server.log`` (a pipe nobody reads would fill up
    and stall it). Yields its URL once /health answers; stopped afterwards, also on failure."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(workspace / "server.log", "w") as log:
        proc = subprocess.Popen([str(Path(PYTHON).parent / "mlflow"), "server", *extra, "--backend-store-uri", backend,
                                 "--artifacts-destination", str(workspace / "artifacts"), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", str(workers)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=workspace, env=env)
        try:
            try:
                wait_for_http(url + "/health", proc, timeout)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{(workspace / 'server.log').read_text()[-3000:]}") from None
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def assert_champion_serves_its_test_predictions(client, data_root: Path, name: str = "all-dtl", n: int = 6) -> None:
    """A valid champion, not just a loadable one: loaded through the registry alias, it gives on the
    study's first ``n`` test images (read from ``data_root`` + the logged relative path) the
    probabilities that the study's final evaluation logged for them (``predictions_test.csv``)."""
    import mlflow
    import numpy as np
    import pandas as pd
    from PIL import Image

    from dtl.tracking import schema

    mv = client.get_model_version_by_alias(name, "champion")
    local = client.download_artifacts(mv.tags[schema.PHASE2_RUN], "evaluation/predictions_test.csv")
    table = pd.read_csv(local).head(n)
    files = [Path(data_root) / p for p in table["path"]]
    assert all(f.is_file() for f in files), [str(f) for f in files if not f.is_file()]
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict({"image": [np.asarray(Image.open(f).convert("RGB")) for f in files]})
    cols = [c for c in table.columns if c.startswith("p_")]
    assert list(out.filter(like="p_").columns) == cols
    assert np.allclose(out[cols].to_numpy(), table[cols].to_numpy(), atol=2e-3), (out[cols], table[cols])
    assert list(out["class"]) == list(table["predicted"])
