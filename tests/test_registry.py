"""Promotion policy: the pure selection table, then aliases against a real sqlite registry."""

import pytest

from dtl import DTLError
from dtl.registry import Candidate, Policy, load_policy, select

P = Policy(metric="val_macro_f1", tie_breaks=("val_accuracy",), min_value=0.5)


def c(v, f1, acc=0.0, digest="d1"):
    return Candidate(str(v), {"val_macro_f1": f1, "val_accuracy": acc}, digest)


@pytest.mark.parametrize("cands, current, force, champion, challenger, moved", [
    ([c(1, 0.8), c(2, 0.9)], None, False, "2", "1", True),                       # first promotion
    ([c(1, 0.8), c(2, 0.8, acc=0.9)], None, False, "2", "1", True),              # tie-break
    ([c(1, 0.8), c(2, 0.8)], None, False, "2", "1", True),                       # full tie: newest
    ([c(1, 0.4), c(2, 0.45)], None, False, None, None, False),                   # below min_value
    ([c(3, 0.7)], c(1, 0.9), False, "1", "3", False),                            # never downgrade
    ([c(3, 0.7)], c(1, 0.9), True, "3", None, True),                             # unless forced
    ([c(3, 0.7, digest="d2")], c(1, 0.9), False, "3", None, True),               # other data: not comparable
    ([c(1, 0.9), c(3, 0.95)], c(1, 0.9), False, "3", "1", True),                 # better candidate
    ([c(1, 0.9), c(3, 0.85)], c(1, 0.9), False, "1", "3", False),                # champion still best
    ([Candidate("4", {"val_macro_f1": 0.99}, "demo", True)], c(1, 0.7), False, "1", None, False),  # demo never
    ([Candidate("4", {"val_macro_f1": 0.99}, "demo", True)], c(1, 0.7), True, "4", None, True),    # ... unless forced
    ([c(5, 0.6, digest="real")], Candidate("4", {"val_macro_f1": 0.99}, "demo", True), False, "5", None, True),
])
def test_select(cands, current, force, champion, challenger, moved):
    d = select(cands, P, current, force)
    assert (d.champion, d.challenger, d.moved) == (champion, challenger, moved), d.reason


def test_minimize_direction():
    p = Policy(metric="val_loss", direction="minimize", tie_breaks=())
    d = select([Candidate("1", {"val_loss": 0.3}), Candidate("2", {"val_loss": 0.2})], p)
    assert d.champion == "2"


def test_policy_file_validation(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("metric: val_accuracy\nbogus: 1\n")
    with pytest.raises(DTLError, match="unknown policy key"):
        load_policy(f)
    f.write_text("metric: val_accuracy\ndirection: up\n")
    with pytest.raises(DTLError, match="maximize or minimize"):
        load_policy(f)
    f.write_text("metric: val_accuracy\ntie_breaks: [val_macro_f1]\n")
    assert load_policy(f, "other").registered_model == "other"
    assert load_policy("registry/policy.yaml").metric == "val_macro_f1"


def test_gain_of_double_transfer_table():
    import pandas as pd

    from dtl.report import double_gain, seed_table

    df = pd.DataFrame([
        {"backbone": "r", "strategy": "double", "test_accuracy": 0.9, "test_macro_f1": 0.8},
        {"backbone": "r", "strategy": "scratch", "test_accuracy": 0.7, "test_macro_f1": 0.75},
        {"backbone": "e", "strategy": "double", "test_accuracy": 0.9, "test_macro_f1": 0.8},
    ])
    g = double_gain(df)
    assert list(g["backbone"]) == ["r"] and g.loc[0, "test_accuracy_vs_scratch"] == pytest.approx(0.2)
    assert "test_accuracy_vs_single" not in g.columns
    full = df.assign(phase2_val_accuracy=0.5, init="scratch", split_protocol="image-level", test_accuracy_ci="")
    assert list(seed_table(full).columns) == ["Model", "Phase-2 Accuracy", "Eval Acc", "Notes"]


def test_policy_direction_follows_the_metric_and_test_metrics_are_refused(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("metric: val_loss\n")
    assert load_policy(f).direction == "minimize"  # derived, not the maximize default
    f.write_text("metric: val_loss\ndirection: maximize\n")
    with pytest.raises(DTLError, match="contradicts metric val_loss"):
        load_policy(f)
    f.write_text("metric: test_macro_f1\n")
    with pytest.raises(DTLError, match="not a validation metric"):
        load_policy(f)
    f.write_text("metric: val_macro_f1\ntie_breaks: [test_accuracy]\n")
    with pytest.raises(DTLError, match="tie_breaks"):
        load_policy(f)


def test_tie_breaks_keep_their_own_direction():
    """val_loss (minimize) tied: the tie-break val_balanced_accuracy still prefers the higher value."""
    p = Policy(metric="val_loss", direction="minimize", tie_breaks=("val_balanced_accuracy",))
    a = Candidate("1", {"val_loss": 0.3, "val_balanced_accuracy": 0.9})
    b = Candidate("2", {"val_loss": 0.3, "val_balanced_accuracy": 0.7})
    assert select([a, b], p).champion == "1"
