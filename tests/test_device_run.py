"""``bench/device_run.sh --smoke``: the GPU machine's one unattended command, run on the CPU with a
tiny backbone and a handful of real images staged as the docs say (tar archives in a data
folder), so the script cannot rot between GPU sessions."""

import os
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import ROOT, require_real_data

pytestmark = [pytest.mark.slow, pytest.mark.realdata]  # a shell script running benchmarks and `dtl main`


def stage(shared, devdata, aria_per_class: int = 5, pbc_classes: int = 3, pbc_per_class: int = 6) -> None:
    """Aria `Original` as two archives (as docs/gpu.md stages the full set) and a few PBC classes."""
    devdata.mkdir()
    aria = shared / "aria-all-pbs-2021" / "Original"
    for name, classes in (("aria-original-1.tar", ("Benign", "Early")), ("aria-original-2.tar", ("Pre", "Pro"))):
        with tarfile.open(devdata / name, "w") as tar:
            for cls in classes:
                for f in sorted((aria / cls).glob("*.jpg"))[::40][:aria_per_class]:
                    tar.add(f, f"aria-all-pbs-2021/Original/{cls}/{f.name}")
    pbc = shared / "pbc-acevedo-2020-subset"
    with tarfile.open(devdata / "pbc.tar", "w") as tar:
        for d in sorted(p for p in pbc.iterdir() if p.is_dir())[:pbc_classes]:
            for f in sorted(d.glob("*.jpg"))[:pbc_per_class]:
                tar.add(f, f"pbc-acevedo-2020-subset/{d.name}/{f.name}")


def test_device_run_smoke_writes_every_result_into_out(tmp_path):
    shared = require_real_data()
    stage(shared, tmp_path / "devdata")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DEVDATA": str(tmp_path / "devdata"), "WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_RUN_ID", None)
    p = subprocess.run(["bash", str(ROOT / "bench" / "device_run.sh"), "--smoke"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=900)
    log = (out / "device_run.log").read_text()
    assert p.returncode == 0, log[-4000:]
    assert "every step ok" in log and "FAILED" not in log
    assert len(list(out.iterdir())) <= 8  # what a device machine hands back at most
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    for f in ("./bench/test_resnet-cpu-bf16.json", "./bench/test_resnet-cpu-bf16-compile.json",
              "./report/results.md", "./environment.txt"):
        assert f in names, (f, sorted(names))
    assert any(n.startswith("./cards/") and n.endswith(".md") for n in names)
    summary = (out / "summary.md").read_text()
    assert "| test_resnet | 64 | 8 | bf16 | no | model only (ceiling) |" in summary
    assert "| test_resnet | 64 | 8 | bf16 | eager | project training path |" in summary
    assert "## dtl main --config real-gpu" in summary and "## Model card:" in summary
    assert "phase-1 data: " in log and "pbc-acevedo-2020-subset" in log
