import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from dtl.evaluation.metrics import (
    accuracy_macro_f1,
    confusion,
    direction,
    evaluate_predictions,
    expected_calibration_error,
    point_metrics,
)
from dtl.evaluation.stats import bootstrap_ci, paired_bootstrap
from dtl.train.engine import cosine_lr


@pytest.mark.parametrize("k, n, seed", [(2, 60, 0), (4, 200, 1), (4, 9, 2)])
def test_point_metrics_match_sklearn(k, n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k), n)
    probs[np.arange(n), y] += rng.uniform(0, 0.6, n)  # better than chance
    probs /= probs.sum(1, keepdims=True)
    m = point_metrics(y, probs)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, labels=list(range(k)), average="macro", zero_division=0))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, labels=list(range(k)), average="weighted", zero_division=0))
    if len(np.unique(y)) > 1:
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    if k == 2:
        assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
    elif len(np.unique(y)) == k:
        assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_bootstrap_ci_contains_point_estimate_and_is_seeded():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 150)
    probs = rng.dirichlet(np.ones(4), 150)
    probs[np.arange(150), y] += 0.5
    out = evaluate_predictions(y, probs / probs.sum(1, keepdims=True), list("abcd"), "test", n_boot=300, seed=0)
    for k in ("accuracy", "macro_f1", "balanced_accuracy", "roc_auc"):
        assert out[f"test_{k}_ci_low"] <= out[f"test_{k}"] <= out[f"test_{k}_ci_high"]
    assert bootstrap_ci(y, probs, point_metrics, 50, seed=1) == bootstrap_ci(y, probs, point_metrics, 50, seed=1)
    assert "test_f1_a" in out and "test_precision_d" in out


def test_confusion_counts_and_rows():
    cm = confusion(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), ["x", "y"])
    assert cm["counts"] == [[1, 1], [1, 2]]
    assert cm["normalized"][1] == [pytest.approx(1 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4)]


@pytest.mark.parametrize("step, total, warm, expected", [(0, 100, 10, 0.1), (9, 100, 10, 1.0), (10, 100, 10, 1.0),
                                                         (55, 100, 10, 0.5), (100, 100, 10, 0.0)])
def test_cosine_with_warmup(step, total, warm, expected):
    assert cosine_lr(step, total, warm) == pytest.approx(expected, abs=1e-6)


def _toy(n=120, seed=3, k=4, strength=0.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k), n)
    probs[np.arange(n), y] += strength
    return y, probs / probs.sum(1, keepdims=True)


def test_group_bootstrap_resamples_whole_groups():
    """Each item copied 5 times (one patient, or one smear field photographed 5 times): resampling
    images pretends 5x the evidence and narrows the interval; resampling groups gives back the
    interval of the distinct items."""
    y, p = _toy()
    yy, pp, groups = np.repeat(y, 5), np.repeat(p, 5, axis=0), np.repeat(np.arange(len(y)), 5)
    width = {}
    for name, args in {"items": (y, p, None), "copies": (yy, pp, None), "grouped": (yy, pp, groups)}.items():
        lo, hi = bootstrap_ci(args[0], args[1], point_metrics, 400, 0, args[2])["accuracy"]
        width[name] = hi - lo
    assert width["copies"] < 0.6 * width["items"]
    assert width["grouped"] == pytest.approx(width["items"], rel=0.25)


def test_paired_bootstrap_difference():
    y, p = _toy(n=300)
    same = paired_bootstrap(y, p, p.copy(), point_metrics, ("accuracy", "macro_f1"), n=200)
    assert same["accuracy"]["diff"] == 0 and same["accuracy"]["ci_low"] == same["accuracy"]["ci_high"] == 0
    assert not same["accuracy"]["excludes_zero"]
    worse = p.copy()
    flip = np.arange(0, 300, 3)  # a third of the items: the right class loses its probability
    worse[flip, y[flip]] = 0
    worse /= worse.sum(1, keepdims=True)
    d = paired_bootstrap(y, p, worse, point_metrics, ("accuracy",), n=300, seed=1)["accuracy"]
    exact = point_metrics(y, p)["accuracy"] - point_metrics(y, worse)["accuracy"]
    assert d["diff"] == pytest.approx(exact) and d["ci_low"] <= d["diff"] <= d["ci_high"]
    assert d["excludes_zero"] and d["ci_low"] > 0 and d["unit"] == "image" and d["n_items"] == 300
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap(y, p, p[:10], point_metrics, ("accuracy",))


# --- exact behaviour on small and degenerate samples (sklearn or hand-computed oracles) ---------------------------


def _silently(fn, *args, **kwargs):
    """Call with every warning an error: the nan/zero paths of the metrics are meant to be quiet."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def _probs_for(pred, k, seed=0):
    """Random probabilities whose argmax is ``pred``."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(k), len(pred))
    p[np.arange(len(pred)), pred] += 1.0
    return p / p.sum(1, keepdims=True)


# (y, pred, k): a class absent from labels and predictions, classes with support 1 (right and wrong),
# a class predicted once and right, one item only, and a random case.
SMALL_CASES = [
    ([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 4),
    ([0, 1, 2, 3, 3, 3], [0, 2, 1, 3, 3, 0], 4),
    ([1, 0, 0, 0, 2], [1, 0, 0, 2, 2], 3),
    ([1], [1], 2),
    ([2], [0], 3),
    (list(np.random.default_rng(7).integers(0, 5, 40)), list(np.random.default_rng(8).integers(0, 5, 40)), 5),
]


@pytest.mark.parametrize("y, pred, k", SMALL_CASES)
def test_accuracy_macro_f1_matches_sklearn_on_small_and_degenerate_samples(y, pred, k):
    y, pred = np.asarray(y), np.asarray(pred)
    got = _silently(accuracy_macro_f1, y, _probs_for(pred, k))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, labels=list(range(k)), average="macro",
                                                         zero_division=0))


@pytest.mark.parametrize("y, pred, k", SMALL_CASES)
def test_point_metrics_match_sklearn_on_small_and_degenerate_samples(y, pred, k):
    y, pred = np.asarray(y), np.asarray(pred)
    m = _silently(point_metrics, y, _probs_for(pred, k))
    labels = list(range(k))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, labels=labels, average="weighted", zero_division=0))
    if len(np.unique(y)) > 1:  # mean recall over the classes present in the labels
        assert m["balanced_accuracy"] == pytest.approx(skm.recall_score(y, pred, labels=np.unique(y), average="macro"))
    else:
        assert np.isnan(m["balanced_accuracy"])


def test_point_metrics_of_one_item():
    m = _silently(point_metrics, np.array([1]), np.array([[0.2, 0.8]]))
    assert (m["accuracy"], m["weighted_f1"], m["macro_f1"]) == (1.0, 1.0, 0.5)  # class 0: no support, F1 0
    assert np.isnan(m["balanced_accuracy"]) and np.isnan(m["roc_auc"])


@pytest.mark.parametrize("y", [[1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0]])
def test_binary_auc_matches_sklearn_with_a_single_positive_or_negative(y):
    y = np.asarray(y)
    score = np.array([0.9, 0.3, 0.95, 0.3, 0.1, 0.5])  # with a tie
    probs = np.stack([1 - score, score], 1)
    assert _silently(point_metrics, y, probs)["roc_auc"] == pytest.approx(skm.roc_auc_score(y, score))


@pytest.mark.parametrize("k", [2, 3])
def test_auc_and_balanced_accuracy_of_a_one_class_sample_are_nan_without_warnings(k):
    y = np.array([1, 1, 1])
    m = _silently(point_metrics, y, _probs_for(np.array([1, 0, 1]), k))
    assert np.isnan(m["roc_auc"]) and np.isnan(m["balanced_accuracy"])
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_three_class_auc_is_the_one_vs_rest_macro_of_sklearn():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 50)
    probs = rng.dirichlet(np.ones(3), 50)
    probs[np.arange(50), y] += 0.3
    probs /= probs.sum(1, keepdims=True)
    assert point_metrics(y, probs)["roc_auc"] == pytest.approx(
        skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_auc_with_two_of_three_classes_present_averages_their_one_vs_rest_aucs():
    y = np.array([0, 2, 0, 2, 2, 0, 2])
    probs = np.random.default_rng(5).dirichlet(np.ones(3), len(y))
    want = np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in (0, 2)])
    assert _silently(point_metrics, y, probs)["roc_auc"] == pytest.approx(want)


def test_ece_default_is_fifteen_equal_width_bins_and_point_metrics_reports_it():
    # confidences 0.52 (right) and 0.54 (wrong) fall in different bins of 15 (edge 8/15 = 0.533):
    # 1/2 * |1 - 0.52| + 1/2 * |0 - 0.54| = 0.51 (16 bins would pool them: |0.5 - 0.53| = 0.03)
    y = np.array([0, 0])
    probs = np.array([[0.52, 0.48], [0.46, 0.54]])
    assert expected_calibration_error(y, probs) == pytest.approx(0.51)
    assert point_metrics(y, probs)["ece"] == pytest.approx(0.51)


@pytest.mark.parametrize("metric, want", [("val_loss", "minimize"), ("test_ece", "minimize"), ("loss", "minimize"),
                                          ("ece", "minimize"), ("ext_test_loss", "minimize"),
                                          ("test_ece_after", "minimize"), ("val_ece_before", "minimize"),
                                          ("test_ece_after_ci_high", "minimize"), ("train_loss_ci_low", "minimize"),
                                          ("val_accuracy", "maximize"), ("test_macro_f1", "maximize"),
                                          ("val_roc_auc", "maximize"), ("accuracy", "maximize"),
                                          ("test_piece_count", "maximize"), ("lossless_accuracy", "maximize")])
def test_direction_minimizes_losses_and_calibration_error_only(metric, want):
    """A ``loss`` or ``ece`` part decides, wherever it stands: explain's ``test_ece_after`` (and its CI
    bounds) once read as higher-is-better because only the last part was read. A part must be the
    whole word (``piece`` holds no ``ece``)."""
    assert direction(metric) == want


def _binary_toy(n=12, seed=6):
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    probs = rng.dirichlet(np.ones(2), n)
    probs[np.arange(n), y] += 0.3
    return y, probs / probs.sum(1, keepdims=True)


def test_evaluate_predictions_defaults_to_1000_draws_with_seed_0():
    """A report's intervals are reproducible only if the defaults are fixed: 1000 draws, seed 0."""
    y, probs = _binary_toy()
    got = evaluate_predictions(y, probs, ["a", "b"], "test")
    # the documented draws (n items with replacement), scored by the pairwise definition of the AUC;
    # draws holding one class have no AUC and are left out of the percentiles
    rng, aucs = np.random.default_rng(0), []
    for _ in range(1000):
        i = rng.integers(0, len(y), len(y))
        d = probs[i][y[i] == 1, 1][:, None] - probs[i][y[i] == 0, 1][None, :]
        if d.size:
            aucs.append((d > 0).mean() + 0.5 * (d == 0).mean())
    want = tuple(np.quantile(aucs, [0.025, 0.975]))
    assert (got["test_roc_auc_ci_low"], got["test_roc_auc_ci_high"]) == pytest.approx(want)


def test_evaluate_predictions_passes_seed_and_groups_to_the_bootstrap():
    y, probs = _binary_toy()
    groups = np.repeat(np.arange(4), 3)
    for kwargs in ({"seed": 5}, {"seed": 5, "groups": groups}):
        got = evaluate_predictions(y, probs, ["a", "b"], "val", n_boot=40, **kwargs)
        want = bootstrap_ci(y, probs, point_metrics, 40, kwargs["seed"], kwargs.get("groups"))
        assert {k: (got[f"val_{k}_ci_low"], got[f"val_{k}_ci_high"]) for k in want} == want
    ungrouped = evaluate_predictions(y, probs, ["a", "b"], "val", n_boot=40, seed=5)
    assert ungrouped["val_ece_ci_low"] != got["val_ece_ci_low"]  # the groups made a difference


def test_evaluate_predictions_with_one_draw_has_the_interval_of_that_draw():
    y, probs = _binary_toy()
    idx = np.random.default_rng(3).integers(0, len(y), len(y))  # the documented draw: n items with replacement
    one = point_metrics(y[idx], probs[idx])
    got = evaluate_predictions(y, probs, ["a", "b"], "test", n_boot=1, seed=3)
    for k in ("accuracy", "ece", "macro_f1"):
        assert got[f"test_{k}_ci_low"] == got[f"test_{k}_ci_high"] == pytest.approx(one[k])


def test_evaluate_predictions_without_draws_has_no_interval_keys():
    y, probs = _binary_toy()
    got = evaluate_predictions(y, probs, ["a", "b"], "test", n_boot=0)
    assert not any(k.endswith(("_ci_low", "_ci_high")) for k in got)
    assert got["test_accuracy"] == point_metrics(y, probs)["accuracy"]


def test_evaluate_predictions_per_class_scores_count_absent_classes_as_zero_silently():
    # class "c" is predicted once (wrongly) but never true; class "d" is neither true nor predicted
    y = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 1, 1, 1, 2])
    got = _silently(evaluate_predictions, y, _probs_for(pred, 4), list("abcd"), "test", n_boot=0)
    per_class = {c: tuple(got[f"test_{m}_{c}"] for m in ("precision", "recall", "f1")) for c in "abcd"}
    assert per_class == {"a": (1.0, pytest.approx(0.5), pytest.approx(2 / 3)),
                         "b": (pytest.approx(2 / 3), pytest.approx(2 / 3), pytest.approx(2 / 3)),
                         "c": (0.0, 0.0, 0.0), "d": (0.0, 0.0, 0.0)}


def test_confusion_keeps_every_class_with_zero_rows_and_4_decimal_rates():
    # class "b" has support 1 (its row is 100%), "d" has none (a zero row, not NaN); 1/3 is rounded to 0.3333
    y = np.array([0, 0, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 2, 2, 0])
    cm = _silently(confusion, y, pred, list("abcd"))
    assert cm == {"classes": ["a", "b", "c", "d"],
                  "counts": [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]],
                  "normalized": [[0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.3333, 0.0, 0.6667, 0.0],
                                 [0.0, 0.0, 0.0, 0.0]]}

