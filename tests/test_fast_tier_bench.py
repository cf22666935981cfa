"""bench/fast_tier.py reads pytest's last line: a run with a failure must not count as a timing."""

import pytest

from bench.fast_tier import summary


def test_the_summary_counts_passed_and_failed_and_reads_pytests_time():
    assert summary("....\n550 passed, 125 deselected in 41.97s\n") == (550, 0, 41.97)
    assert summary("x\n1 failed, 549 passed, 125 deselected in 42.30s") == (549, 1, 42.30)
    assert summary("550 passed in 38.72s") == (550, 0, 38.72)  # xdist prints no deselected count
    assert summary("3 errors, 2 skipped, 545 passed in 50.00s") == (545, 3, 50.0)
    assert summary("1 error in 9.1s") == (0, 1, 9.1)


def test_output_without_a_summary_is_refused():
    with pytest.raises(ValueError, match="no pytest summary"):
        summary("ImportError while loading conftest\n")
    with pytest.raises(ValueError, match="no pytest summary"):
        summary("")
