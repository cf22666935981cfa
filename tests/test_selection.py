"""The pure promotion decision (:func:`dtl.tracking.promotion.select`): its ranking against a second,
comparison-based implementation, the policy's own direction, and the reason a forced move is given."""

import functools
import math
import random

import pytest

from dtl.tracking.policy import Policy
from dtl.tracking.promotion import Candidate, Decision, select


def c(v, f1, acc=0.0, digest="d1", **kw):
    return Candidate(str(v), {"val_macro_f1": f1, "val_accuracy": acc}, digest, **kw)


P = Policy(metric="val_macro_f1", tie_breaks=("val_accuracy",), min_value=0.5)


def reference_ranking(cands: list[Candidate], policy: Policy) -> list[str]:
    """Written from the promotion rules, not from ``_key``: a candidate needs the policy metric (not NaN)
    within ``min_value``; then the metric in the policy's direction, each tie-break in its own direction
    (lower is better for losses and ECE), a missing or NaN value after any present one, and last the
    newest version first."""
    names = (policy.metric, *policy.tie_breaks)
    lower = [policy.direction == "minimize"] + [n.endswith(("_loss", "_ece")) for n in policy.tie_breaks]

    def value(cand, name):
        x = cand.metrics.get(name)
        return None if x is None or math.isnan(x) else x

    def eligible(cand):
        x = value(cand, policy.metric)
        if x is None or policy.min_value is None:
            return x is not None
        return x <= policy.min_value if policy.direction == "minimize" else x >= policy.min_value

    def before(a, b):  # negative: a ranks before b
        for name, low in zip(names, lower):
            x, y = value(a, name), value(b, name)
            if x == y:
                continue
            if x is None or y is None:
                return 1 if x is None else -1
            return -1 if (x < y) == low else 1
        return int(b.version) - int(a.version)

    return [x.version for x in sorted(filter(eligible, cands), key=functools.cmp_to_key(before))]


POLICIES = [
    Policy(metric="val_macro_f1", tie_breaks=("val_loss", "val_accuracy")),
    Policy(metric="val_macro_f1", min_value=0.2, tie_breaks=("val_accuracy", "val_ece")),
    Policy(metric="val_loss", direction="minimize", tie_breaks=("val_accuracy", "val_ece")),
    Policy(metric="val_loss", direction="minimize", min_value=0.2, tie_breaks=("val_ece", "val_balanced_accuracy")),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.metric}-{p.min_value}-{'-'.join(p.tie_breaks)}")
def test_select_ranks_like_a_metric_by_metric_comparison_with_missing_values_last(policy):
    """Random small registries on a coarse grid (so ties are common), some metrics missing or NaN."""
    rng = random.Random(7)
    names = ["val_macro_f1", "val_loss", "val_accuracy", "val_ece", "val_balanced_accuracy"]
    for _ in range(150):
        cands = []
        for version in rng.sample(range(1, 40), rng.randint(1, 6)):
            metrics = {}
            for name in names:
                r = rng.random()
                if r < 0.7:
                    metrics[name] = rng.choice([0.1, 0.2, 0.3])
                elif r < 0.8:
                    metrics[name] = float("nan")
            cands.append(Candidate(str(version), metrics))
        expected = reference_ranking(cands, policy)
        d = select(cands, policy)
        assert d.ranked == expected, cands
        assert (d.champion, d.challenger, d.moved) == (
            (expected[0], expected[1] if len(expected) > 1 else None, True) if expected else (None, None, False))


def test_select_ranks_and_filters_the_policy_metric_in_the_policy_direction():
    """A policy built in code may minimize a metric whose name does not say so (``val_error``): the
    ranking follows the policy's direction, as the ``min_value`` cut-off does."""
    p = Policy(metric="val_error", direction="minimize", min_value=0.3, tie_breaks=())
    cands = [Candidate("1", {"val_error": 0.2}), Candidate("2", {"val_error": 0.1}), Candidate("3", {"val_error": 0.5})]
    assert select(cands, p) == Decision("2", "1", True, "no champion yet", ["2", "1"])


@pytest.mark.parametrize("cands, current", [
    ([c(2, 0.95)], c(1, 0.9)),                                   # better on the metric
    ([c(2, 0.8, acc=0.9)], c(1, 0.8, acc=0.5)),                  # equal on the metric, better on the tie-break
    ([c(2, 0.8, acc=0.5)], c(1, 0.8, acc=0.5)),                  # a full tie: the newer version
    ([c(2, 0.6, digest="d2")], c(1, 0.9)),                       # worse, but on other data
    ([Candidate("3", {"val_macro_f1": 0.8}, calibrated_from="1")], Candidate("1", {"val_macro_f1": 0.8})),
])
def test_force_changes_nothing_where_the_champion_would_move_anyway(cands, current):
    """The reason says "forced" only when forcing overrode the rule; a move that needs no force keeps its reason."""
    unforced = select(cands, P, current)
    assert unforced.moved and unforced.reason != "forced"
    assert select(cands, P, current, force=True) == unforced


def test_a_forced_demo_model_over_a_real_champion_is_explained_by_the_data_not_by_force():
    demo = Candidate("4", {"val_macro_f1": 0.6}, "demo", synthetic=True)
    assert select([demo], P, c(1, 0.9), force=True) == Decision(
        "4", None, True, "champion was trained on other data (digest, split protocol or masking differs)", ["4"])


def test_a_version_listed_twice_is_never_its_own_challenger():
    """The same version read twice from a listing: it becomes champion, and there is no challenger."""
    d = select([c(2, 0.95), c(2, 0.95)], P, c(1, 0.9))
    assert (d.champion, d.challenger, d.moved, d.reason) == ("2", None, True, "better than the champion")
