"""The mutation run's report: per-module counts of mutmut's verdicts and the name of every mutant
not killed, from ``mutants/**/*.py.meta``; ``bench/mutation.sh`` writes it to
``bench/results/mutation.md``.

A recheck (``RECHECK=1 bench/mutation.sh``) reruns only what an earlier report did not list as
killed and carries that report's kills over: valid only while the mutated sources are byte for
byte those of the earlier run (mutmut numbers the mutants of a function in order), so each report
records the SHA-256 of the mutated files and a recheck against other sources is refused.
Mutants named in docs/testing.md's "Equivalent mutants" list (``- `NAME`: reason``) are counted
apart: the score is the killed share of the checked, non-equivalent mutants.

    python -m bench.mutation_report report DATE "COMMAND" [PREVIOUS_REPORT]   # Markdown on stdout
    python -m bench.mutation_report recheck PREVIOUS_REPORT MODULE...       # names to rerun, one per line
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLS = ("killed", "survived", "timeout", "no tests", "not checked", "suspicious", "skipped")
KILLED = {"killed", "timeout"}  # mutmut's own score counts a timeout as caught
_NAME = re.compile(r"^- `([^`]+)`", re.M)


def source_digest(root: Path = ROOT) -> str:
    """SHA-256 over the mutated files (``[tool.mutmut] only_mutate``), in their listed order."""
    block = re.search(r"^only_mutate\s*=\s*\[(.*?)\]", (root / "pyproject.toml").read_text(), re.M | re.S)
    files = re.findall(r'"([^"]+)"', block.group(1))  # (tomllib is Python 3.11+; the project runs on 3.10)
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode() + b"\0" + (root / f).read_bytes() + b"\0")
    return h.hexdigest()


def module_of(name: str) -> str:
    """``dtl.config.x__coerce__mutmut_3`` → ``dtl.config``; methods (``xǁClassǁm__mutmut_1``) too."""
    return name.rsplit(".", 1)[0]


def parse_report(text: str) -> tuple[str | None, dict[str, str]]:
    """An earlier report's source digest and its not-killed mutants ``{name: status}`` (the names
    under each "## <status>" heading)."""
    m = re.search(r"^Sources: SHA-256 `([0-9a-f]{64})`", text, re.M)
    listed, status = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            head = line[3:].split(" (")[0].strip().lower()
            status = head if head in COLS else None
        elif status and (n := _NAME.match(line)):
            listed[n.group(1)] = status
    return (m.group(1) if m else None), listed


def check_carry(previous: str, digest: str) -> dict[str, str]:
    """The not-killed mutants of an earlier report whose verdicts may be carried over, or an error
    saying why they may not."""
    old, listed = parse_report(previous)
    if old is None:
        raise SystemExit("the earlier report records no source digest: run a fresh one (FRESH=1 bench/mutation.sh)")
    if old != digest:
        raise SystemExit("the mutated sources changed since the earlier report (its SHA-256 differs), so its mutant "
                         "numbers no longer name the same mutations: run a fresh one (FRESH=1 bench/mutation.sh)")
    return listed


def merge(now: dict[str, str], carried: dict[str, str] | None) -> tuple[dict[str, str], set[str]]:
    """This run's verdicts, with each mutant it did not check taking the earlier report's verdict
    (killed unless the earlier report lists it). Returns the verdicts and the carried names."""
    if carried is None:
        return dict(now), set()
    out, moved = {}, set()
    for name, status in now.items():
        if status == "not checked":
            out[name], _ = carried.get(name, "killed"), moved.add(name)
        else:
            out[name] = status
    return out, moved


def equivalents(text: str) -> set[str]:
    """Mutants listed under docs/testing.md's "Equivalent mutants" heading."""
    part = re.split(r"^#+ Equivalent mutants.*$", text, maxsplit=1, flags=re.M)
    if len(part) < 2:
        return set()
    body = re.split(r"^#", part[1], maxsplit=1, flags=re.M)[0]
    return set(_NAME.findall(body))


def read_verdicts(mutants: Path, scope: list[str]) -> dict[str, str]:
    """``{name: status}`` of the in-scope mutants from mutmut's meta files."""
    from mutmut.stats import status_by_exit_code

    out = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        for k, v in json.loads(meta.read_text())["exit_code_by_key"].items():
            if any(fnmatch.fnmatchcase(k, g) for g in scope):
                out[k] = status_by_exit_code[v]
    return out


def render(date: str, command: str, digest: str, verdicts: dict[str, str], moved: set[str], equiv: set[str],
           previous_date: str | None = None) -> str:
    """The Markdown report."""
    lines = [f"# Mutation run {date}", "", f"`{command}` (mutmut 3, fast tier)", "",
             f"Sources: SHA-256 `{digest}` of the mutated files (`[tool.mutmut] only_mutate`).", ""]
    if moved:
        kept = sum(verdicts[n] not in KILLED for n in moved)
        lines += [f"A recheck: {len(moved) - kept} mutants killed in the run of {previous_date or 'the earlier report'} "
                  "were not rerun and are counted as killed (\"carried\")"
                  + (f"; not rerun either and keeping the verdict it lists: {kept}" if kept else "")
                  + "; the rest were run now.", ""]
    head = ["module", "mutants", *COLS, "carried", "equivalent", "killed share of checked non-equivalent"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    by_mod: dict[str, list[str]] = {}
    for name in sorted(verdicts):
        by_mod.setdefault(module_of(name), []).append(name)

    def row(label: str, names: list[str]) -> str:
        c = Counter(verdicts[n] for n in names)
        # an equivalent mutant is out of the score unless killed (which flags the list); one that timed
        # out (slow under load, like any other) is not counted as caught
        eq = {n for n in names if n in equiv and verdicts[n] != "killed"}
        scored = [n for n in names if verdicts[n] in ("killed", "survived", "timeout") and n not in eq]
        caught = sum(verdicts[n] in KILLED for n in scored)
        share = f"{caught / len(scored):.1%}" if scored else "–"
        return (f"| {label} | {len(names)} | " + " | ".join(str(c[k]) for k in COLS)
                + f" | {sum(n in moved for n in names)} | {len(eq)} | {share} |")

    lines += [row(m, names) for m, names in by_mod.items()]
    lines += [row("all", sorted(verdicts)), ""]
    wrongly = sorted(n for n in equiv & verdicts.keys() if verdicts[n] == "killed")
    if wrongly:
        lines += ["Listed as equivalent in docs/testing.md but killed (the list is wrong): "
                  + ", ".join(f"`{n}`" for n in wrongly), ""]
    for status in COLS[1:]:
        names = sorted(n for n, s in verdicts.items() if s == status)
        if names:
            lines += [f"## {status.capitalize()} ({len(names)}; `mutmut show NAME` prints the diff)", ""]
            lines += [f"- `{n}`" + (" (equivalent)" if n in equiv else "") for n in names] + [""]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    scope = os.environ.get("MUTATION_SCOPE", "").split()
    if argv[:1] == ["recheck"]:
        listed = check_carry(Path(argv[1]).read_text(), source_digest())
        mods = set(argv[2:])
        print("\n".join(n for n, s in sorted(listed.items()) if module_of(n) in mods))
        return
    date, command, *prev = argv[1:]
    digest = source_digest()
    verdicts = read_verdicts(ROOT / "mutants", scope)
    carried, previous_date = None, None
    if prev:
        text = Path(prev[0]).read_text()
        carried = check_carry(text, digest)
        previous_date = (re.search(r"^# Mutation run (\S+)", text, re.M) or [None, None])[1]
    verdicts, moved = merge(verdicts, carried)
    equiv = equivalents((ROOT / "docs" / "testing.md").read_text())
    print(render(date, command, digest, verdicts, moved, equiv, previous_date))


if __name__ == "__main__":
    main(sys.argv[1:])
