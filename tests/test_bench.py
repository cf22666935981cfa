"""The benchmark runs end to end (tiny, CPU) and writes its JSON and Markdown. No timing
assertions here: speed targets live in the benchmark results, not in tests."""

import json
import subprocess

import pytest

from tests.conftest import PYTHON, ROOT

pytestmark = pytest.mark.slow  # each test launches the benchmark in a subprocess


def test_throughput_bench_smoke(tmp_path, cache_dir):
    p = subprocess.run([PYTHON, "-m", "bench.throughput", "--backbone", "test_resnet", "--image-size", "32",
                        "--device", "cpu", "--precision", "fp32", "--steps", "2", "--warmup", "1", "--workers", "0",
                        "--batch-size", "8", "--eval-batch-size", "16", "--skip", "kornia",
                        "--cache-dir", str(cache_dir), "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "test_resnet-cpu-fp32.json").read_text())
    for k in ("a_model_only_img_s", "b_project_img_s", "c_plain_img_s", "eval_project_img_s",
              "pyfunc_cpu_img_s_batch32", "b_over_a", "b_over_c", "cache_over_raw_uint8"):
        assert res[k] > 0, k
    assert res["cache_over_raw_uint8"] < 1.2
    assert (tmp_path / "test_resnet-cpu-fp32.md").read_text().startswith("| key | value |")


def test_fuzzy_speed_bench_smoke(tmp_path):
    p = subprocess.run([PYTHON, "-m", "bench.fuzzy_speed", "--n", "20", "--k", "3", "--clusters", "4",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "fuzzy_speed.json").read_text())
    assert [r["tnorm"] for r in res["rows"]] == ["min", "product"]
    for r in res["rows"]:
        assert r["n"] == 20 and r["vectorised_s"] > 0 and r["skfuzzy_s"] > 0 and r["max_abs_diff"] < 5e-3
    assert (tmp_path / "fuzzy_speed.md").read_text().startswith("| t-norm |")
