import numpy as np
import pytest
from sklearn import metrics as skm

from dtl.evaluation.metrics import confusion, evaluate_predictions, point_metrics
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
