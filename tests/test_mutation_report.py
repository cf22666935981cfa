"""The mutation report (bench/mutation_report.py): what a recheck carries over and what it refuses."""

import re
import subprocess

import pytest

from bench.mutation_report import (
    changed_functions,
    check_carry,
    equivalents,
    functions,
    merge,
    parse_report,
    render,
    source_digest,
    sources_of,
)

DIGEST = "ab" * 32


def _report(verdicts, moved=(), equiv=(), digest=DIGEST):
    return render("2026-12-03", "bench/mutation.sh", digest, verdicts, set(moved), set(equiv), "2026-12-02")


def test_a_report_lists_every_mutant_not_killed_under_its_verdict_and_reads_back():
    v = {"dtl.a.x_f__mutmut_1": "killed", "dtl.a.x_f__mutmut_2": "survived", "dtl.a.x_f__mutmut_3": "timeout",
         "dtl.b.xǁCǁm__mutmut_1": "no tests", "dtl.b.x_g__mutmut_1": "not checked", "dtl.b.x_g__mutmut_2": "survived"}
    text = _report(v)
    digest, listed = parse_report(text)
    assert digest == DIGEST
    assert listed == {"dtl.a.x_f__mutmut_2": "survived", "dtl.a.x_f__mutmut_3": "timeout",
                      "dtl.b.xǁCǁm__mutmut_1": "no tests", "dtl.b.x_g__mutmut_1": "not checked",
                      "dtl.b.x_g__mutmut_2": "survived"}
    rows = {r.split(" | ")[0].strip("| "): r for r in text.splitlines() if r.startswith("| dtl.") or r.startswith("| all")}
    # dtl.a: 1 killed + 1 timeout of 3 checked; dtl.b: 0 of 1 checked (the not-checked and no-tests do not count)
    assert rows["dtl.a"].endswith("| 66.7% |") and rows["dtl.b"].endswith("| 0.0% |")
    assert rows["all"].endswith("| 50.0% |")


def test_equivalent_mutants_leave_the_score_and_a_killed_one_on_the_list_is_flagged():
    v = {"dtl.a.x_f__mutmut_1": "killed", "dtl.a.x_f__mutmut_2": "survived", "dtl.a.x_f__mutmut_3": "survived"}
    text = _report(v, equiv={"dtl.a.x_f__mutmut_2", "dtl.a.x_f__mutmut_1"})
    row = next(r for r in text.splitlines() if r.startswith("| dtl.a |"))
    assert row.endswith("| 1 | 50.0% |")  # one equivalent survivor out; 1 killed of the 2 others
    assert "- `dtl.a.x_f__mutmut_2` (equivalent)" in text
    assert re.search(r"killed \(the list is wrong\): `dtl\.a\.x_f__mutmut_1`", text)
    # an equivalent mutant that timed out (the 2026-12-03 run: `rsplit("_")` under load) is neither caught
    # nor proof that the list is wrong: it stays out of the score like a surviving equivalent
    v["dtl.a.x_f__mutmut_4"] = "timeout"
    text = _report(v, equiv={"dtl.a.x_f__mutmut_2", "dtl.a.x_f__mutmut_4"})
    row = next(r for r in text.splitlines() if r.startswith("| dtl.a |"))
    assert row.endswith("| 2 | 50.0% |"), row
    assert "the list is wrong" not in text


def test_a_recheck_carries_only_the_earlier_kills_and_refuses_other_sources():
    earlier = _report({"m.x_f__mutmut_1": "killed", "m.x_f__mutmut_2": "survived", "m.x_f__mutmut_3": "no tests"})
    listed, changed = check_carry(earlier, DIGEST)
    assert changed == set()
    now = {"m.x_f__mutmut_1": "not checked", "m.x_f__mutmut_2": "killed", "m.x_f__mutmut_3": "not checked",
           "m.x_f__mutmut_4": "not checked"}
    merged, moved = merge(now, listed)
    # 1 was killed before (carried), 2 was rerun, 3 keeps its earlier "no tests", 4 is new to the earlier
    # report's sources only if it was killed there: not listed means killed
    assert merged == {"m.x_f__mutmut_1": "killed", "m.x_f__mutmut_2": "killed", "m.x_f__mutmut_3": "no tests",
                      "m.x_f__mutmut_4": "killed"}
    assert moved == {"m.x_f__mutmut_1", "m.x_f__mutmut_3", "m.x_f__mutmut_4"}
    assert merge(now, None) == (now, set())
    # the sentence counts the carried kills apart from the carried "no tests" (it once called all 3 killed)
    text = _report(merged, moved)
    assert "2 mutants killed in the run of 2026-12-02 were not rerun and are counted as killed" in text
    assert "; not rerun either and keeping the verdict it lists: 1;" in text
    assert "| m | 4 | 3 | 0 | 0 | 1 | 0 | 0 | 0 | 3 |" in text
    with pytest.raises(SystemExit, match="sources changed since the earlier report .* no commit holds"):
        check_carry(earlier, "cd" * 32)
    with pytest.raises(SystemExit, match="records no source digest"):
        check_carry("# Mutation run 2026-12-01\n\n## Survived\n\n- `m.x_f__mutmut_2`\n", DIGEST)


def test_the_equivalents_are_read_from_their_own_section_only(tmp_path):
    doc = ("# Testing\n\n- `not.this__mutmut_1`: elsewhere\n\n### Equivalent mutants\n\n"
           "- `dtl.a.x_f__mutmut_2`: `float('nan')` → `float('NAN')`\n- `dtl.a.x_g__mutmut_7`: same value\n\n"
           "## Next\n\n- `nor.this__mutmut_1`: after\n")
    assert equivalents(doc) == {"dtl.a.x_f__mutmut_2", "dtl.a.x_g__mutmut_7"}
    assert equivalents("# no such section\n") == set()


def test_the_source_digest_follows_every_mutated_file(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.mutmut]\nonly_mutate = ["a.py", "b.py"]\n')
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    d = source_digest(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{64}", d)
    (tmp_path / "b.py").write_text("y = 3\n")
    assert source_digest(tmp_path) != d


def _git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


MODULE_V1 = """LIMIT = 3


def f(x):
    return x + 1


class C:
    def m(self):
        return 2


def g(x):
    return x * LIMIT
"""


def test_a_recheck_after_a_change_carries_the_kills_of_unchanged_functions_only(tmp_path):
    """The 2026-12-03 change to groups.shifted_ncc (a faster form of the same function) made the whole
    recheck refuse: kills of the module's other functions are carried, every mutant of the changed one
    is rerun, and a constant's change reruns its whole module."""
    (tmp_path / "pyproject.toml").write_text('[tool.mutmut]\nonly_mutate = ["m.py"]\n')
    (tmp_path / "m.py").write_text(MODULE_V1)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1")
    v1 = {"m.py": MODULE_V1.encode()}
    earlier = _report({"m.x_f__mutmut_1": "killed", "m.x_f__mutmut_2": "survived", "m.x_g__mutmut_1": "killed",
                       "m.xǁCǁm__mutmut_1": "killed"}, digest=source_digest(tmp_path))
    assert set(functions(MODULE_V1, "m")) == {"m", "m.x_f", "m.xǁCǁm", "m.x_g"}

    v2 = MODULE_V1.replace("return x * LIMIT", "return LIMIT * x")  # g changed, f and C.m as they were
    (tmp_path / "m.py").write_text(v2)
    found = sources_of(parse_report(earlier)[0], tmp_path)
    assert found is not None and found[1] == v1
    listed, changed = check_carry(earlier, source_digest(tmp_path), found[1], {"m.py": v2.encode()})
    assert changed == {"m.x_g"}
    now = {"m.x_f__mutmut_1": "not checked", "m.x_f__mutmut_2": "not checked", "m.x_g__mutmut_1": "not checked",
           "m.x_g__mutmut_2": "survived", "m.xǁCǁm__mutmut_1": "not checked"}
    merged, moved = merge(now, listed, changed)
    assert merged == {"m.x_f__mutmut_1": "killed", "m.x_f__mutmut_2": "survived", "m.x_g__mutmut_1": "not checked",
                      "m.x_g__mutmut_2": "survived", "m.xǁCǁm__mutmut_1": "killed"}
    assert moved == {"m.x_f__mutmut_1", "m.x_f__mutmut_2", "m.xǁCǁm__mutmut_1"}
    text = render("2026-12-04", "RECHECK=1 bench/mutation.sh", DIGEST, merged, moved, {"m.x_g__mutmut_2", "m.x_f__mutmut_2"},
                  "2026-12-03", changed, "abc")
    assert "Changed since the sources of the earlier report (commit `abc`): `m.x_g`." in text
    # an equivalence argued for the old g may not hold for the new one's mutant of that number
    assert re.search(r"in a function changed since the earlier report .*: `m\.x_g__mutmut_2`$", text, re.M)

    assert changed_functions(v1, {"m.py": MODULE_V1.replace("LIMIT = 3", "LIMIT = 4").encode()}) == {"m"}
    assert merge({"m.x_f__mutmut_1": "not checked"}, listed, {"m"})[0] == {"m.x_f__mutmut_1": "not checked"}
    with pytest.raises(SystemExit, match="no commit holds the sources"):
        check_carry(earlier, "cd" * 32)
    assert sources_of("cd" * 32, tmp_path) is None
