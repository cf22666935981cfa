"""The mutation run's report: per-module counts of mutmut's verdicts and the name of every mutant
not killed, from ``mutants/**/*.py.meta``; ``bench/mutation.sh`` writes it to
``bench/results/mutation.md``.

A recheck (``RECHECK=1 bench/mutation.sh``) reruns only what an earlier report did not list as
killed and carries that report's kills over. mutmut numbers the mutants of a function in order, so
a kill names the same mutation only while its function reads as it did: each report records the
SHA-256 of the mutated files; where they changed since, the recheck finds the commit that holds
the report's sources (its digest), carries kills only for functions whose text is unchanged (a
change outside any function, to a constant or an import, counts as a change to every function of
that module: mutmut's own incremental rule, one step stricter) and reruns every mutant of the
others. Without such a commit the recheck is refused.
Mutants named in docs/testing.md's "Equivalent mutants" list (``- `NAME`: reason``) are counted
apart: the score is the killed share of the checked, non-equivalent mutants.

    python -m bench.mutation_report report DATE "COMMAND" [PREVIOUS_REPORT]   # Markdown on stdout
    python -m bench.mutation_report recheck PREVIOUS_REPORT MODULE...       # names to rerun, one per line
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLS = ("killed", "survived", "timeout", "no tests", "not checked", "suspicious", "skipped")
KILLED = {"killed", "timeout"}  # mutmut's own score counts a timeout as caught
_NAME = re.compile(r"^- `([^`]+)`", re.M)


def mutated_files(root: Path = ROOT) -> list[str]:
    """``[tool.mutmut] only_mutate``, in its listed order."""
    block = re.search(r"^only_mutate\s*=\s*\[(.*?)\]", (root / "pyproject.toml").read_text(), re.M | re.S)
    return re.findall(r'"([^"]+)"', block.group(1))  # (tomllib is Python 3.11+; the project runs on 3.10)


def source_digest(root: Path = ROOT, sources: dict[str, bytes] | None = None) -> str:
    """SHA-256 over the mutated files in their listed order: as they are under ``root``, or ``sources``
    (file -> bytes in that order, e.g. read from a commit)."""
    h = hashlib.sha256()
    for f in (list(sources) if sources is not None else mutated_files(root)):
        h.update(f.encode() + b"\0" + (sources[f] if sources is not None else (root / f).read_bytes()) + b"\0")
    return h.hexdigest()


def _git(*args: str, root: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, check=False)


def sources_of(digest: str, root: Path = ROOT, depth: int = 50) -> tuple[str, dict[str, bytes]] | None:
    """The newest commit (of the last ``depth`` that changed a mutated file) whose mutated files have
    ``digest``, and those files; None if there is none."""
    files = mutated_files(root)
    log = _git("log", f"-n{depth}", "--format=%H", "--", *files, root=root)
    for commit in log.stdout.decode().split():
        shown = {f: _git("show", f"{commit}:{f}", root=root) for f in files}
        if all(r.returncode == 0 for r in shown.values()):
            sources = {f: r.stdout for f, r in shown.items()}
            if source_digest(root, sources) == digest:
                return commit, sources
    return None


def functions(text: str, module: str) -> dict[str, str]:
    """mutmut's name of each function of ``module`` (``module.x_f``; methods ``module.xǁCǁm``) -> its
    source, and ``module`` itself -> the module's text outside them."""
    is_fn = (ast.FunctionDef, ast.AsyncFunctionDef)
    tree, lines = ast.parse(text), text.splitlines(keepends=True)
    defs = [(f"x_{n.name}", n) for n in tree.body if isinstance(n, is_fn)]
    defs += [(f"xǁ{c.name}ǁ{m.name}", m) for c in tree.body if isinstance(c, ast.ClassDef)
             for m in c.body if isinstance(m, is_fn)]
    out, spans = {}, []
    for key, fn in defs:
        first = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
        out[f"{module}.{key}"] = "".join(lines[first - 1:fn.end_lineno])
        spans.append((first, fn.end_lineno))
    inside = {i for a, b in spans for i in range(a, b + 1)}
    out[module] = "".join(line for i, line in enumerate(lines, 1) if i not in inside)
    return out


def module_name(path: str) -> str:
    """``dtl/data/groups.py`` -> ``dtl.data.groups``."""
    return path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")


def changed_functions(before: dict[str, bytes], after: dict[str, bytes]) -> set[str]:
    """The functions (mutmut's names) whose text differs between two versions of the mutated files, or
    is new; a module whose text outside its functions differs is named whole (``module``)."""
    out = set()
    for f in after:
        mod = module_name(f)
        old = functions(before[f].decode(), mod) if f in before else {}
        new = functions(after[f].decode(), mod)
        out |= {name for name, src in new.items() if old.get(name) != src}
    return out


def stale(name: str, changed: set[str]) -> bool:
    """Whether mutant ``name``'s earlier verdict no longer applies: its function or its module changed."""
    fn = name.rsplit("__mutmut_", 1)[0]
    return fn in changed or module_of(name) in changed


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


def check_carry(previous: str, digest: str, base: dict[str, bytes] | None = None,
                after: dict[str, bytes] | None = None) -> tuple[dict[str, str], set[str]]:
    """The not-killed mutants of an earlier report whose verdicts may be carried over, and the functions
    whose mutants must all be rerun (none when the sources are the report's; else those that differ
    between ``base``, the report's sources, and ``after``, the current ones), or an error saying why
    nothing may be carried."""
    old, listed = parse_report(previous)
    if old is None:
        raise SystemExit("the earlier report records no source digest: run a fresh one (FRESH=1 bench/mutation.sh)")
    if old == digest:
        return listed, set()
    if base is None or after is None:
        raise SystemExit("the mutated sources changed since the earlier report (its SHA-256 differs) and no commit "
                         "holds the sources it was made on, so its mutant numbers cannot be matched to functions: "
                         "run a fresh one (FRESH=1 bench/mutation.sh)")
    if source_digest(sources=base) != old:
        raise SystemExit("the sources given as the earlier report's do not have its SHA-256")
    return listed, changed_functions(base, after)


def _current() -> dict[str, bytes]:
    return {f: (ROOT / f).read_bytes() for f in mutated_files()}


def carry_for(text: str) -> tuple[dict[str, str], set[str], str | None]:
    """:func:`check_carry` of an earlier report against this checkout, its sources looked up in git
    when they changed since; and the commit they were found in."""
    digest = source_digest()
    old = parse_report(text)[0]
    found = sources_of(old) if old and old != digest else None
    listed, changed = check_carry(text, digest, *(found[1], _current()) if found else (None, None))
    return listed, changed, (found[0] if found else None)


def merge(now: dict[str, str], carried: dict[str, str] | None,
          changed: set[str] = frozenset()) -> tuple[dict[str, str], set[str]]:
    """This run's verdicts, with each mutant it did not check taking the earlier report's verdict
    (killed unless the earlier report lists it), except the mutants of ``changed`` functions, which
    stay "not checked" until run. Returns the verdicts and the carried names."""
    if carried is None:
        return dict(now), set()
    out, moved = {}, set()
    for name, status in now.items():
        if status == "not checked" and not stale(name, changed):
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
           previous_date: str | None = None, changed: set[str] = frozenset(), base: str | None = None) -> str:
    """The Markdown report."""
    lines = [f"# Mutation run {date}", "", f"`{command}` (mutmut 3, fast tier)", "",
             f"Sources: SHA-256 `{digest}` of the mutated files (`[tool.mutmut] only_mutate`).", ""]
    if changed:
        lines += [f"Changed since the sources of the earlier report (commit `{(base or '?')[:12]}`): "
                  + ", ".join(f"`{c}`" for c in sorted(changed))
                  + ". None of their mutants' verdicts was carried; each was run now or stays \"not checked\".", ""]
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
    reread = sorted(n for n in equiv if stale(n, changed))
    if reread:  # the numbers now name the changed function's mutations, maybe other ones
        lines += ["Listed as equivalent in docs/testing.md, in a function changed since the earlier report "
                  "(re-read each reason against `mutmut show NAME`): " + ", ".join(f"`{n}`" for n in reread), ""]
    for status in COLS[1:]:
        names = sorted(n for n, s in verdicts.items() if s == status)
        if names:
            lines += [f"## {status.capitalize()} ({len(names)}; `mutmut show NAME` prints the diff)", ""]
            lines += [f"- `{n}`" + (" (equivalent)" if n in equiv else "") for n in names] + [""]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    scope = os.environ.get("MUTATION_SCOPE", "").split()
    if argv[:1] == ["recheck"]:
        listed, changed, _ = carry_for(Path(argv[1]).read_text())
        mods = set(argv[2:])
        names = [n for n, s in sorted(listed.items()) if module_of(n) in mods and not stale(n, changed)]
        # every mutant of a changed function (a changed module: all of it) is rerun, not only the listed ones
        names += [f"{c}.*" if c in mods else f"{c}__mutmut_*" for c in sorted(changed)
                  if c in mods or module_of(c) in mods]
        print("\n".join(names))
        return
    date, command, *prev = argv[1:]
    digest = source_digest()
    verdicts = read_verdicts(ROOT / "mutants", scope)
    carried, previous_date, changed, base = None, None, set(), None
    if prev:
        text = Path(prev[0]).read_text()
        carried, changed, base = carry_for(text)
        previous_date = (re.search(r"^# Mutation run (\S+)", text, re.M) or [None, None])[1]
    verdicts, moved = merge(verdicts, carried, changed)
    equiv = equivalents((ROOT / "docs" / "testing.md").read_text())
    print(render(date, command, digest, verdicts, moved, equiv, previous_date, changed, base))


if __name__ == "__main__":
    main(sys.argv[1:])
