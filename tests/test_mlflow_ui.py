"""The MLflow UI as a user opens it in a browser after the README's first command: the real
`mlflow ui` on the job's store, read by Debian's headless Chromium through selenium."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PYTHON, free_port, wait_for_http
from tests.test_cli import mlflow_run

pytestmark = pytest.mark.slow


def chromium():
    """Debian's chromium and chromium-driver (`.ci/run` installs them), or a skip (a failure when
    DTL_REQUIRE_BROWSER=1)."""
    driver, binary = shutil.which("chromedriver"), shutil.which("chromium")
    if not (driver and binary):
        msg = "no chromium / chromedriver: apt-get install chromium chromium-driver"
        if os.environ.get("DTL_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + " and DTL_REQUIRE_BROWSER=1")
        pytest.skip(msg)
    return driver, binary


@contextlib.contextmanager
def mlflow_ui(workspace: Path):
    """`mlflow ui` on the workspace's sqlite store, on 127.0.0.1 and a free port."""
    port = free_port()
    with open(workspace / "ui.log", "w") as log:
        proc = subprocess.Popen([str(Path(PYTHON).parent / "mlflow"), "ui", "--backend-store-uri",
                                 f"sqlite:///{workspace}/mlflow.db", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=workspace)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", proc)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@contextlib.contextmanager
def browser(size=(2400, 1000)):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    driver, binary = chromium()
    o = Options()
    o.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={size[0]},{size[1]}"):
        o.add_argument(a)
    d = webdriver.Chrome(service=Service(driver), options=o)
    try:
        yield d
    finally:
        d.quit()


def page(d, url: str, *texts: str, timeout: float = 120) -> str:
    """Open ``url`` and wait until the page shows every one of ``texts``; its visible text."""
    d.get(url)
    deadline = time.monotonic() + timeout
    while True:
        body = d.find_element("tag name", "body").text
        if all(t in body for t in texts):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}: {[t for t in texts if t not in body]} not shown; the page shows:\n{body[:3000]}")
        time.sleep(0.5)


def row_text(d, run_name: str) -> str:
    """The visible text of the runs-table row of ``run_name`` (its pinned and scrolled parts)."""
    link = d.find_element("xpath", f"//a[normalize-space()='{run_name}']")
    assert link.is_displayed(), f"{run_name}: not a visible row"
    index = link.find_element("xpath", "./ancestor::div[@row-index][1]").get_attribute("row-index")
    return " | ".join(r.text for r in d.find_elements("css selector", f"div.ag-row[row-index='{index}']"))


def test_the_ui_shows_each_study_as_a_row_and_the_named_models_with_their_versions(workspace, cache_dir):
    import mlflow

    chromium()
    job = mlflow_run("main", workspace, cache_dir, experiment="all-dtl-demo")
    assert job.returncode == 0, job.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    exp = client.get_experiment_by_name("all-dtl-demo").experiment_id
    study = client.search_runs([exp], "tags.`dtl.role` = 'study' and tags.phase = 'phase2'")[0]
    name, acc = study.info.run_name, study.data.metrics["test_accuracy"]
    with mlflow_ui(workspace) as url, browser() as d:
        # the experiment's default runs table: each study a top-level row (trials nested under it)
        body = page(d, f"{url}/#/experiments/{exp}/runs", name, "phase1-test_resnet")
        assert "trial-" not in body
        row_text(d, name)
        # the comparison view the job stores on the experiment: backbone and the test metric in the row
        page(d, f"{url}/#/experiments/{exp}/runs?viewStateShareKey=comparison", name, "backbone", "test_accuracy")
        row = row_text(d, name)
        assert "test_resnet" in row and "double" in row and str(acc)[:4] in row, row
        assert "all-dtl" in row and "v1" in row, row  # the registered version of its model
        # the Models page: the descriptively named model and its registered version
        models = page(d, f"{url}/#/experiments/{exp}/models", "test_resnet-double", "all-dtl")
        assert "v1" in models and "\nmodel\n" not in models, models[:2000]
