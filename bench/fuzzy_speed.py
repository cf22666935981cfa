"""Speed of the fuzzy head's inference: the vectorised numpy implementation (``dtl.fuzzy``)
against scikit-fuzzy's control-system simulation (``skfuzzy.control``, one sample per
``compute``), on the same fitted system and the same inputs; also how closely they agree.

    python -m bench.fuzzy_speed                      # 1,000 samples, k=8, 12 clusters, both t-norms
    python -m bench.fuzzy_speed --n 50 --out /tmp/b  # smoke

The features are synthetic (4 well separated classes in 256 dimensions, the width of the PBS
head's pooled output): inference cost depends on the shapes (k, clusters, classes, output
universe), not on the values. Writes ``<out>/fuzzy_speed.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from dtl.fuzzy import core as fuzzy


def features(n: int, dim: int = 256, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return rng.normal(size=(n, dim)) + 2.0 * rng.normal(size=(classes, dim))[y], y


def measure(fs: fuzzy.FuzzySystem, x: np.ndarray, repeats: int = 3) -> dict:
    """Seconds for the whole batch: vectorised, our per-sample loop, and skfuzzy.control."""
    z = fs.project(x)
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours, _ = fs.infer(x)
        t.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(len(x)):
        fs.infer(x[i:i + 1])
    loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    sim = fuzzy.control_system(fs)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = fuzzy.control_infer(sim, fs, z)
    lib = time.perf_counter() - t0
    top2 = np.sort(ours, 1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    return {"n": len(x), "k": fs.centres.shape[1], "clusters": len(fs.centres), "classes": len(fs.classes),
            "tnorm": fs.tnorm, "vectorised_s": min(t), "per_sample_numpy_s": loop, "skfuzzy_build_s": build,
            "skfuzzy_s": lib, "speedup_vs_skfuzzy": lib / max(min(t), 1e-12),
            "max_abs_diff": float(np.abs(ours - ref).max()),
            "argmax_agreement": float((ours.argmax(1) == ref.argmax(1)).mean()),
            # where the top two classes are further apart than the discretisation error, the two must agree
            "argmax_agreement_clear": float((ours.argmax(1) == ref.argmax(1))[gap > 0.005].mean()),
            "share_clear": float((gap > 0.005).mean())}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["| t-norm | k | clusters | n | vectorised (s) | per-sample numpy (s) | skfuzzy.control (s) | speed-up | "
             "max abs diff | argmax agreement (all / top-2 gap > 0.005) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tnorm']} | {r['k']} | {r['clusters']} | {r['n']} | {r['vectorised_s']:.4f} | "
                     f"{r['per_sample_numpy_s']:.3f} | {r['skfuzzy_s']:.2f} | {r['speedup_vs_skfuzzy']:.0f}× | "
                     f"{r['max_abs_diff']:.1e} | {r['argmax_agreement']:.3f} / {r['argmax_agreement_clear']:.3f} "
                     f"({r['share_clear']:.0%} of samples) |")
    return "\n".join(lines) + f"\n\nMachine: {meta['machine']}; numpy {meta['numpy']}, scikit-fuzzy {meta['scikit-fuzzy']}.\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="samples to infer")
    ap.add_argument("--k", type=int, default=8, help="PCA dimensions (antecedents per rule)")
    ap.add_argument("--clusters", type=int, default=12, help="fuzzy c-means clusters (rules)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    x, y = features(args.n + 1000)
    rows = []
    for tnorm in fuzzy.TNORMS:
        fs = fuzzy.fit(x[:1000], y[:1000], ["Benign", "Early", "Pre", "Pro"], k=args.k, n_clusters=args.clusters,
                       m=1.5, tnorm=tnorm)
        rows.append(measure(fs, x[1000:]))
        print(json.dumps(rows[-1]))
    load = os.getloadavg()[0]  # the cores may be shared: absolute times scale with it, the ratio much less
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}",
            "numpy": np.__version__, "scikit-fuzzy": version("scikit-fuzzy"), "command": "python -m bench.fuzzy_speed"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzzy_speed.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (out / "fuzzy_speed.md").write_text(markdown(rows, meta))
    print((out / "fuzzy_speed.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
