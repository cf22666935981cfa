"""What a GPU machine lacks to run ``bench/device_run.sh``: this project's runtime dependencies and
theirs, as installed here (``NAME==VERSION``), minus what the machine already has.

    python -m bench.wheels --have device-packages.txt     # one name per line, or `pip freeze` output
    python -m bench.wheels --have device-packages.txt | xargs python3 -m pip download --no-deps ...

Extras are not followed; environment markers are evaluated here (give the machine's Python
version with ``--python 3.12`` so version-conditional requirements match it). Printed in order.
"""

from __future__ import annotations

import argparse
import re
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "triton", "psycopg", "psycopg-binary"}  # the machine's own; psycopg: team server only


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = "all-dtl", python: str = "") -> dict[str, str]:
    """Every distribution ``root`` needs at run time (no extras), with its installed version."""
    env = default_environment()
    if python:
        env.update(python_version=python, python_full_version=f"{python}.0")
    seen: dict[str, str] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        key = canonical(dist.metadata["Name"])
        if key in seen:
            continue
        seen[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
                todo.append(req.name)
    seen.pop(canonical(root), None)
    return seen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--have", required=True, help="the machine's packages: names, or `pip freeze` lines")
    p.add_argument("--python", default="3.12", help="the machine's Python version (markers)")
    args = p.parse_args(argv)
    have = {canonical(re.split(r"[=<>@ ]", line.strip())[0]) for line in open(args.have) if line.strip()}
    for name, version in sorted(closure(python=args.python).items()):
        if name not in have and name not in SKIP:
            print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
