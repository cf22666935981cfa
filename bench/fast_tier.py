"""Wall time of the fast tier (``pytest -m "not slow"``), serially and on two pytest-xdist workers,
in alternating runs, each beside a speed gauge of the machine (a fixed 20-million-step Python loop),
so runs made at different hours of a shared machine can be told apart from changes to the tier:

    python -m bench.fast_tier                  # 3 pairs (serial, -n 2), appended to bench/results/fast_tier.md
    python -m bench.fast_tier --runs 1 --modes n2

A run that does not pass every test stops the benchmark (its time says nothing about the tier).
Nothing is written to ``__pycache__`` (``PYTHONDONTWRITEBYTECODE=1``, as on the CI machine): in a
checkout without one (a clean clone here) every project module is compiled and every test module
rewritten again in each run, the worse case. ``PYTEST_ADDOPTS`` passes through: keep it free of
``-q`` (the summary line this reads disappears at ``-qq``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {"serial": [], "n2": ["-n", "2"]}
GAUGE = "import time\nt = time.perf_counter()\nx = 0\nfor i in range(20_000_000):\n    x += i\nprint(time.perf_counter() - t)"


def summary(text: str) -> tuple[int, int, float]:
    """(passed, not passed, pytest's own seconds) from pytest's last line, e.g. ``550 passed,
    125 deselected in 41.97s`` or ``1 failed, 549 passed in 42.30s`` (deselected and skipped count
    as neither)."""
    line = text.strip().splitlines()[-1] if text.strip() else ""
    m = re.search(r"in ([\d.]+)s", line)
    if not m:
        raise ValueError(f"no pytest summary in the last line: {line!r}")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", line)}
    bad = sum(counts.get(k, 0) for k in ("failed", "error", "errors", "xpassed"))
    return counts.get("passed", 0), bad, float(m[1])


def gauge() -> float:
    """Seconds of the fixed Python loop on this machine now (lower is faster)."""
    return float(subprocess.run([sys.executable, "-c", GAUGE], capture_output=True, text=True, check=True).stdout)


def run(mode: str) -> dict:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    g = gauge()
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-m", "not slow", "-q", "-p", "no:cacheprovider", *MODES[mode]],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:  # a failure, or no test run at all (a conftest error, -n without pytest-xdist)
        sys.exit(f"the {mode} run did not pass (exit {p.returncode}):\n{p.stdout[-3000:]}{p.stderr[-2000:]}")
    passed, bad, own = summary(p.stdout)
    if bad:  # an xpassed test (strict xfail turns it into a failure; pytest exits 0 otherwise)
        sys.exit(f"the {mode} run had {bad} failed, error or xpassed tests:\n{p.stdout[-3000:]}")
    return {"mode": mode, "gauge": g, "passed": passed, "pytest": own, "wall": wall,
            "at": dt.datetime.now(dt.timezone.utc).strftime("%H:%M")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="rounds; each runs every mode once")
    ap.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["serial", "n2"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fast_tier.md")
    a = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    out = a.out.resolve()
    own = out.relative_to(ROOT).as_posix() if out.is_relative_to(ROOT) else None
    dirty = [line for line in status.splitlines() if line[3:] != own]  # the results file itself does not count
    rows = []
    for r in range(a.runs):
        for mode in a.modes:
            rows.append(x := run(mode))
            print(f"round {r + 1} {mode}: {x['passed']} passed, pytest {x['pytest']:.1f} s, wall {x['wall']:.1f} s, "
                  f"gauge {x['gauge']:.2f} s", flush=True)
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    head = (f"\n## {day}, {commit}{' (uncommitted changes)' if dirty else ''}, {os.cpu_count()} cores\n\n"
            "| UTC | mode | tests passed | pytest's time | wall | gauge |\n|---|---|---|---|---|---|\n")
    body = "".join(f"| {x['at']} | {'serial' if x['mode'] == 'serial' else '`-n 2`'} | {x['passed']} | "
                   f"{x['pytest']:.1f} s | {x['wall']:.1f} s | {x['gauge']:.2f} s |\n" for x in rows)
    if not a.out.exists():
        a.out.write_text("# Fast-tier wall time\n\nWritten by `python -m bench.fast_tier` (its docstring says how). "
                         "The gauge is a fixed 20-million-step Python loop timed just before each run: "
                         "the machine's speed at that moment (lower is faster).\n")
    with a.out.open("a") as f:
        f.write(head + body)
    print(f"appended to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
