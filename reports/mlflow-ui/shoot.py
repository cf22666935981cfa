"""Screenshots of the MLflow UI on a store, as a user opens it: the experiment's runs table, the
shared ``comparison`` view the job stores, and the Models page (issue 27).

    python reports/mlflow-ui/shoot.py --store sqlite:///mlflow.db --experiment all-dtl-real-cpu-tiny \
        --out reports/mlflow-ui/real-cpu-tiny

Needs Debian's ``chromium`` and ``chromium-driver`` and selenium (the test extra). Starts
``mlflow ui`` on 127.0.0.1 and a free port, waits until each page shows the named texts (so a
screenshot never catches a spinner), and prints the visible text of each page beside its PNG.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(d, url: str, texts: list[str], timeout: float = 180) -> str:
    d.get(url)
    deadline = time.monotonic() + timeout
    while True:
        body = d.find_element("tag name", "body").text
        if all(t in body for t in texts):
            time.sleep(2)  # let the table finish its layout
            return d.find_element("tag name", "body").text
        if time.monotonic() > deadline:
            raise SystemExit(f"{url}: {[t for t in texts if t not in body]} not shown; the page shows:\n{body[:2000]}")
        time.sleep(0.5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="backend store URI, e.g. sqlite:///mlflow.db")
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--out", required=True, help="folder for the PNGs and the pages' text")
    ap.add_argument("--size", default="2200x1300", help="browser window WxH")
    a = ap.parse_args(argv)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    driver, binary = shutil.which("chromedriver"), shutil.which("chromium")
    if not (driver and binary):
        raise SystemExit("no chromium / chromedriver: apt-get install chromium chromium-driver")
    exp = mlflow.MlflowClient(a.store).get_experiment_by_name(a.experiment)
    if exp is None:
        raise SystemExit(f"no experiment {a.experiment!r} in {a.store}")
    client = mlflow.MlflowClient(a.store)
    studies = client.search_runs([exp.experiment_id], "tags.`dtl.role` = 'study' and tags.phase = 'phase2'")
    if not studies:
        raise SystemExit(f"experiment {a.experiment!r} in {a.store} has no phase-2 study run")
    first = studies[-1].info.run_name  # the oldest phase-2 study: a row every view shows
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(out / "ui.log", "w")  # noqa: SIM115 - open while the server runs
    ui = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", a.store,
                           "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if ui.poll() is not None:
                raise SystemExit(f"mlflow ui exited ({ui.returncode}); its log: {out / 'ui.log'}")
            time.sleep(1)
        else:
            raise SystemExit(f"mlflow ui did not answer on {url} in 2 minutes; its log: {out / 'ui.log'}")
        o = Options()
        o.binary_location = binary
        w, h = a.size.split("x")
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--window-size={w},{h}"):
            o.add_argument(arg)
        d = webdriver.Chrome(service=Service(driver), options=o)
        try:
            e = exp.experiment_id
            pages = {"runs-default": (f"{url}/#/experiments/{e}/runs", [first]),
                     "runs-comparison-view": (f"{url}/#/experiments/{e}/runs?viewStateShareKey=comparison",
                                              [first, "backbone", "test_accuracy"]),
                     "models": (f"{url}/#/experiments/{e}/models", ["-double"])}
            for name, (page, texts) in pages.items():
                body = wait(d, page, texts)
                d.save_screenshot(str(out / f"{name}.png"))
                (out / f"{name}.txt").write_text(body)
                print(f"{out / (name + '.png')}: {page}")
        finally:
            d.quit()
    finally:
        ui.terminate()
        ui.wait(timeout=30)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
