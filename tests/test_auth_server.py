"""A team server that checks who you are: a real `mlflow server --app-name basic-auth` on
127.0.0.1 (PostgreSQL backend store when DTL_PG_URL is set, as in .ci/run; else SQLite), with an
editor (alice, who creates the experiment and the registered model) and a reader (bob, the
server's default READ permission).

- alice: `mlflow run . -e main` then `dtl main` end to end, registration and promotion included;
- no credentials, a wrong password, a reader training: one line naming the server and what is
  missing, before any training;
- bob: `dtl report` and loading the champion work, `dtl promote` is refused and says so; granted
  EDIT on the experiment only, his `dtl main` of a new study stops before training, naming the
  registered model;
- no password anywhere: params, tags, version tags and cards, artifacts, logs, reports, provenance.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from tests.conftest import (
    PYTHON,
    assert_champion_serves_its_test_predictions,
    clean_databases,
    demo_overrides,
    mlflow_server,
    postgres_url,
)
from tests.test_cli import mlflow_run

ADMIN_PW = "admin-Pw-7431-secret"
USERS = {"alice": "alice-Pw-2291-secret", "bob": "bob-Pw-5810-secret"}


def _backend(workspace: Path) -> tuple[str, str]:
    """The server's backend store, and the password in its URL (a secret too) when it has one."""
    if os.environ.get("DTL_PG_URL") or os.environ.get("DTL_REQUIRE_POSTGRES") == "1":
        pg = postgres_url()
        clean_databases(pg, ("mlflow",))
        return f"{pg}/mlflow", urlparse(pg).password or ""
    return f"sqlite:///{workspace}/server.db", ""


def _admin(url: str):
    """The server's user administration, as its admin."""
    from mlflow.server import get_app_client  # deferred: mlflow.server (Flask) adds 1-1.5 s to every collection

    return get_app_client("basic-auth", tracking_uri=url)


@pytest.fixture()
def auth_server(workspace):
    """The basic-auth server, its admin, and the two users; yields its URL and the backend's password."""
    ini = workspace / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{workspace}/auth.db\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PW,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "dtl-test-csrf-key"}
    backend, backend_pw = _backend(workspace)
    # one worker: no supervisor to kill a slow first start (the auth app migrates its own database)
    with mlflow_server(workspace, backend, "--app-name", "basic-auth", env=env, workers=1, timeout=400) as url:
        with _as("admin", ADMIN_PW):
            admin = _admin(url)
            for user, pw in USERS.items():
                admin.create_user(user, pw)
        yield url, backend_pw


class _as:
    """MLFLOW_TRACKING_USERNAME/PASSWORD of one user in this process (and its children), put back after."""

    def __init__(self, user: str | None, password: str | None = None):
        self.env = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password or USERS.get(user or "")}

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.env}
        for k, v in self.env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return self

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _dtl(workspace: Path, url: str, *args: str, overrides: list[str] | None = None) -> subprocess.CompletedProcess:
    o = [x for kv in (overrides or []) for x in ("-o", kv)]
    return subprocess.run([PYTHON, "-m", "dtl", *args, *o], capture_output=True, text=True, cwd=workspace,
                          env={**os.environ, "MLFLOW_TRACKING_URI": url}, timeout=900)


def _one_line_before_training(p: subprocess.CompletedProcess, url: str, *needles: str) -> None:
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1, p.stderr[-3000:]
    assert url in err[0] and all(n in err[0] for n in needles), err[0]
    assert "Traceback" not in p.stderr and "trial" not in p.stdout, p.stdout[-2000:]


@pytest.mark.slow
def test_basic_auth_server_editor_reader_and_refusals(auth_server, workspace, cache_dir, monkeypatch):
    url, backend_pw = auth_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)  # the workspace fixture pointed this process at its sqlite store
    o = demo_overrides(cache_dir, workspace, **{"cards_dir": str(workspace / "cards"), "bootstrap": 20,  # = mlflow_run's
                                                "phase1.n_trials": 1, "phase2.n_trials": 1, "phase1.epochs": 1,
                                                "phase2.epochs": 1})
    logs = []
    with _as(None):  # no credentials at all
        p = _dtl(workspace, url, "main", overrides=o)
        _one_line_before_training(p, url, "requires a login", "MLFLOW_TRACKING_USERNAME")
    with _as("alice", "not-her-password"):
        p = _dtl(workspace, url, "main", overrides=o)
        _one_line_before_training(p, url, "'alice' was not accepted")
        logs.append(p.stdout + p.stderr)
    with _as("alice"):  # the editor: `mlflow run` creates experiment, runs, versions, aliases
        job = mlflow_run("main", workspace, cache_dir, experiment="all-dtl-demo")
        assert job.returncode == 0, job.stderr[-3000:]
        again = _dtl(workspace, url, "main", overrides=o)  # and `dtl main` in the same experiment
        assert again.returncode == 0, again.stderr[-3000:]
        logs += [job.stdout + job.stderr, again.stdout + again.stderr]
        client = mlflow.MlflowClient(url)
        champion = client.get_model_version_by_alias("all-dtl", "champion")
        n_versions = len(client.search_model_versions("name='all-dtl'"))
        exp = client.get_experiment_by_name("all-dtl-demo")
        n_runs = len(client.search_runs([exp.experiment_id], max_results=1000))
    with _as("bob"):  # the reader
        p = _dtl(workspace, url, "main", overrides=o)
        _one_line_before_training(p, url, "'bob' has no EDIT permission on experiment 'all-dtl-demo' and on "
                                          "registered model 'all-dtl'", "Nothing was trained")
        rep = _dtl(workspace, url, "report", "--out", str(workspace / "bob-report"), overrides=o)
        assert rep.returncode == 0, rep.stderr[-3000:]
        assert (workspace / "bob-report" / "results.md").exists()
        assert_champion_serves_its_test_predictions(mlflow.MlflowClient(url), cache_dir / "demo" / "aria" / "Original")
        pr = _dtl(workspace, url, "promote", "--force", overrides=o)
        _one_line_before_training(pr, url, "'bob' has no EDIT permission", "registered model 'all-dtl'",
                                  "No alias was moved")
        logs += [p.stdout + p.stderr, rep.stdout + rep.stderr, pr.stdout + pr.stderr]
    with _as("admin", ADMIN_PW):  # bob may now write runs, still not versions or aliases
        admin = _admin(url)
        admin.grant_user_permission("bob", "experiment", exp.experiment_id, "EDIT")
    with _as("bob"):  # a new phase-2 study: without the pre-flight it would train, then be refused the version
        p = _dtl(workspace, url, "main", overrides=[*o, "phase2.epochs=2"])
        _one_line_before_training(p, url, "'bob' has no EDIT permission on registered model 'all-dtl' (",
                                  "Nothing was trained")
        logs.append(p.stdout + p.stderr)
    with _as("alice"):
        assert client.get_model_version_by_alias("all-dtl", "champion").version == champion.version
        assert len(client.search_model_versions("name='all-dtl'")) == n_versions
        assert len(client.search_runs([exp.experiment_id], max_results=1000)) == n_runs  # bob trained nothing
        _assert_no_secret(client, exp.experiment_id, workspace, logs, backend_pw)


def _assert_no_secret(client, experiment_id: str, workspace: Path, logs: list[str], backend_pw: str) -> None:
    """No password in what MLflow holds (params, tags, version tags and descriptions), in any file
    the server stored (artifacts: cards, reports, provenance, data, models) or the jobs wrote
    (work_dir, cards, reports), or in the jobs' output."""
    secrets = [ADMIN_PW, *USERS.values(), "not-her-password", *filter(None, [backend_pw])]
    held = []
    for r in client.search_runs([experiment_id], max_results=1000):
        held += [str(r.data.params), str(r.data.tags)]
    for v in client.search_model_versions("name='all-dtl'"):
        held += [str(v.tags), v.description or ""]
    files = [f for f in workspace.rglob("*") if f.is_file() and f.suffix not in (".db", ".pt", ".safetensors")
             and f.name != "basic_auth.ini"]
    stored = [f for f in files if (workspace / "artifacts") in f.parents]  # <exp>/<run>/artifacts/<path>
    assert [f for f in stored if f.match("artifacts/report/provenance.json")], stored[:50]
    assert [f for f in stored if f.match("artifacts/model_card/*.md")], stored[:50]
    for s in secrets:
        assert not [h for h in held + logs if s in h], s
        assert not [f for f in files if s.encode() in f.read_bytes()], s


# --- the same checks without a server: what a refusal from one looks like to the client -----------

def _refusal(code: str, endpoint: str) -> MlflowException:
    status = {"PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401}[code]
    return MlflowException(f"API request to endpoint {endpoint} failed with error code {status} != 200. "
                           "Response body: 'Permission denied'", error_code=getattr(databricks_pb2, code))


class _Client:
    """MlflowClient's calls the pre-flight makes; ``denied`` lists the tag writes refused with ``error``."""

    def __init__(self, denied=(), error: str = "PERMISSION_DENIED", model_exists: bool = True):
        self.denied, self.error, self.model_exists, self.written = set(denied), error, model_exists, []

    def get_experiment(self, exp_id):
        return type("Exp", (), {"name": "all-dtl-demo"})()

    def search_registered_models(self, flt, max_results=None):
        return ["all-dtl"] if self.model_exists else []

    def _write(self, what, key):
        if what in self.denied:
            raise _refusal(self.error, f"/api/2.0/mlflow/{what}/set-tag")
        self.written.append((what, key))

    def set_experiment_tag(self, exp_id, key, value):
        self._write("experiments", key)

    def set_registered_model_tag(self, name, key, value):
        self._write("registered-models", key)


def _tracking(client, uri="http://u:pw-in-url@127.0.0.1:5000"):
    from dtl.tracking.adapter import Tracking

    return Tracking(client, uri, "1")


def test_the_write_preflight_names_every_missing_permission(monkeypatch):
    from dtl import DTLError
    from dtl.tracking import schema
    from dtl.tracking.access import check_write_access

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    ok = _Client()
    check_write_access(_tracking(ok), "all-dtl")
    assert ok.written == [("experiments", schema.WRITE_CHECKED), ("registered-models", schema.WRITE_CHECKED)]
    with pytest.raises(DTLError) as e:
        check_write_access(_tracking(_Client({"experiments", "registered-models"})), "all-dtl", "No alias was moved.")
    msg = str(e.value)
    assert "http://u:***@127.0.0.1:5000" in msg and "pw-in-url" not in msg and "\n" not in msg
    assert "user 'bob' has no EDIT permission on experiment 'all-dtl-demo' and on registered model 'all-dtl'" in msg
    assert msg.endswith("No alias was moved.")
    with pytest.raises(DTLError, match="on registered model 'all-dtl' "):
        check_write_access(_tracking(_Client({"registered-models"})), "all-dtl")
    check_write_access(_tracking(_Client({"registered-models"}, model_exists=False)), "all-dtl")  # the job creates it
    check_write_access(_tracking(_Client({"experiments"}), "sqlite:///mlflow.db"), "all-dtl")  # no users: no probe
    with pytest.raises(MlflowException):  # not a refusal: not hidden
        check_write_access(_tracking(_Client({"experiments"}, error="UNAUTHENTICATED")))


def test_a_refusal_met_later_is_one_line_naming_server_user_and_permission(monkeypatch):
    from dtl.tracking.access import denied_message

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "bob-pw")
    url = "http://127.0.0.1:5000"
    alias = denied_message(_refusal("PERMISSION_DENIED", "/api/2.0/mlflow/registered-models/alias"), url)
    assert alias.startswith(f"MLflow tracking server {url} denied /api/2.0/mlflow/registered-models/alias to user "
                            "'bob': no permission on the registered model")
    run = denied_message(_refusal("PERMISSION_DENIED", "/api/2.0/mlflow/runs/create"), url)
    assert "on the experiment: creating and writing runs needs EDIT" in run
    assert "'bob' was not accepted" in denied_message(_refusal("UNAUTHENTICATED", "/api/2.0/mlflow/runs/create"), url)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    assert "no credentials are set" in denied_message(_refusal("UNAUTHENTICATED", "/x"), url)
    assert denied_message(MlflowException("RESOURCE_DOES_NOT_EXIST"), url) is None
    assert denied_message(ValueError("x"), url) is None
    assert not [m for m in (alias, run) if "bob-pw" in m or "\n" in m]
