"""The fuzzy head: the maths against hand computations and scikit-fuzzy's control system,
and (slow) the tracked job end to end: nested resumable study, registered pyfunc model."""

import math

import numpy as np
import pytest

from dtl import fuzzy
from dtl.stats import paired_bootstrap


def blobs(n=600, classes=4, dim=48, seed=0):
    """Features shaped like a trained network's: one well separated cloud per class."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim))
    y = rng.integers(0, classes, n)
    return rng.normal(size=(n, dim)) + means[y], y


def two_rule_system(tnorm="min", n_points=20001):
    """One input (identity projection), rules R1 centred at 0 and R2 at 2, both sigma 1;
    R1: class a HIGH (1), class b LOW (1); R2: a HIGH 0.5 / LOW 0.5, b HIGH (1)."""
    return fuzzy.FuzzySystem(["a", "b"], mean=np.zeros(1), projection=np.eye(1), centres=np.array([[0.0], [2.0]]),
                             sigmas=np.ones((2, 1)), weights=np.array([[1.0, 0.0], [0.5, 1.0]]), tnorm=tnorm,
                             n_points=n_points)


def centroid_by_hand(a, b):
    """Centroid of max(min(u, a), min(1 - u, b)) on [0, 1] for b <= a, b <= 1/2: the output is
    b on [0, b], u on [b, a] and a on [a, 1]; integrate each piece."""
    area = b * b + (a * a - b * b) / 2 + a * (1 - a)
    moment = b * b * b / 2 + (a ** 3 - b ** 3) / 3 + a * (1 - a * a) / 2
    return moment / area


def test_mamdani_output_equals_a_hand_computed_two_rule_example():
    fs = two_rule_system()
    z = 0.5
    mu1, mu2 = math.exp(-(z - 0) ** 2 / 2), math.exp(-(z - 2) ** 2 / 2)  # 0.8825, 0.3247
    # class a: HIGH clipped at max(mu1 * 1, mu2 * 0.5) = mu1, LOW at max(mu1 * 0, mu2 * 0.5)
    expected_a = centroid_by_hand(mu1, 0.5 * mu2)
    # class b: HIGH at max(0, mu2) = mu2, LOW at max(mu1, 0) = mu1: the mirror image of the same shape
    expected_b = 1 - centroid_by_hand(mu1, mu2)
    out, strength = fs.infer(np.array([[z]]))
    assert out[0] == pytest.approx([expected_a, expected_b], abs=1e-4)
    assert strength[0] == pytest.approx(mu1)
    assert out[0, 0] > 0.5 > out[0, 1]  # near R1's centre: a wins


def test_product_tnorm_multiplies_the_memberships():
    fs = fuzzy.FuzzySystem(["a"], np.zeros(2), np.eye(2), np.array([[0.0, 0.0]]), np.ones((1, 2)),
                           np.array([[1.0]]), tnorm="product")
    act = fs.rule_activations(np.array([[1.0, 2.0]]))
    assert act[0, 0] == pytest.approx(math.exp(-0.5) * math.exp(-2.0))
    fs.tnorm = "min"
    assert fs.rule_activations(np.array([[1.0, 2.0]]))[0, 0] == pytest.approx(math.exp(-2.0))


def test_no_firing_gives_zero_outputs_and_uniform_probabilities():
    fs = two_rule_system(n_points=101)
    probs, strength = fs.predict_proba(np.array([[1e6]]))
    assert strength[0] == 0.0 and probs[0] == pytest.approx([0.5, 0.5])


def test_membership_functions_from_cmeans_centres_cover_the_train_features():
    x, y = blobs()
    for tnorm in fuzzy.TNORMS:
        fs = fuzzy.fit(x, y, list("abcd"), k=4, n_clusters=6, m=1.5, tnorm=tnorm, seed=0)
        z = fs.project(x)
        per_dim = fuzzy.fuzz.gaussmf(z[:, None, :], fs.centres[None], fs.sigmas[None])  # (n, J, k)
        # every train point, in every dimension, lies inside some cluster's membership function
        assert per_dim.max(1).min() >= fuzzy.COVER * (1 - 1e-9)
        # and fires some rule (the whole antecedent) above the floor: its own cluster's
        floor = fuzzy.COVER if tnorm == "min" else fuzzy.COVER ** 4
        assert fs.infer(x)[1].min() >= floor * (1 - 1e-9)
        assert fs.centres.shape == (6, 4) and (fs.sigmas >= fuzzy.SIGMA_FLOOR).all()


def test_projection_is_fitted_on_train_only_and_whitened():
    x, y = blobs()
    fs = fuzzy.fit(x, y, list("abcd"), k=5, n_clusters=4)
    z = fs.project(x)
    assert z.mean(0) == pytest.approx(np.zeros(5), abs=1e-9)
    assert z.std(0, ddof=1) == pytest.approx(np.ones(5), rel=1e-6)
    shifted = fs.project(x + 100.0)  # new data is projected with the train statistics, not refitted
    assert not np.allclose(shifted.mean(0), 0)


def test_consequents_follow_cluster_class_cooccurrence():
    x, y = blobs(classes=3)
    fs = fuzzy.fit(x, y, list("abc"), k=3, n_clusters=3, m=1.5)
    assert fs.weights.max(1) == pytest.approx(np.ones(3))
    dominant = fs.weights.argmax(1)
    assert sorted(dominant) == [0, 1, 2]  # one cluster per well separated class
    probs, _ = fs.predict_proba(x)
    assert (probs.argmax(1) == y).mean() > 0.95


def test_batch_inference_equals_per_sample_inference():
    x, y = blobs(n=300)
    for tnorm in fuzzy.TNORMS:
        fs = fuzzy.fit(x, y, list("abcd"), k=4, n_clusters=5, m=1.6, tnorm=tnorm, seed=1)
        batch, strength = fs.infer(x[:60])
        single = [fs.infer(x[i:i + 1]) for i in range(60)]
        # equal up to float rounding (BLAS sums a batch matmul in another order than a single row)
        np.testing.assert_allclose(batch, np.concatenate([s[0] for s in single]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(strength, np.concatenate([s[1] for s in single]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tnorm", fuzzy.TNORMS)
def test_vectorised_inference_matches_the_skfuzzy_control_system(tnorm):
    x, y = blobs(n=300)
    fs = fuzzy.fit(x, y, list("abcd"), k=3, n_clusters=4, m=1.5, tnorm=tnorm)
    ours, _ = fs.infer(x[:40])
    ref = fuzzy.control_infer(fuzzy.control_system(fs), fs, fs.project(x[:40]))
    assert np.abs(ours - ref).max() < 5e-3  # both discretise: the output universe, skfuzzy also the inputs
    assert (ours.argmax(1) == ref.argmax(1)).all()


def test_system_round_trips_through_json():
    x, y = blobs(n=200)
    fs = fuzzy.fit(x, y, list("abcd"), k=3, n_clusters=4, tnorm="product")
    back = fuzzy.FuzzySystem.from_dict(__import__("json").loads(__import__("json").dumps(fs.to_dict())))
    assert np.array_equal(back.infer(x)[0], fs.infer(x)[0]) and back.tnorm == "product"
    assert fs.rules_text().count("\n") == 3 and "THEN a is HIGH" in fs.rules_text()


def test_risk_coverage_and_abstention_metrics():
    correct = np.array([1, 1, 0, 1, 0], bool)
    conf = np.array([0.9, 0.8, 0.1, 0.7, 0.2])  # the two errors are the least confident
    cov, risk = fuzzy.risk_coverage(correct, conf)
    assert cov == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert risk == pytest.approx([0, 0, 0, 0.25, 0.4])
    m = fuzzy.abstention_metrics(correct, conf, "x")
    assert m["x_abstain_auroc"] == 1.0 and m["x_selective_accuracy_50"] == 1.0
    assert m["x_aurc"] == pytest.approx(np.mean([0, 0, 0, 0.25, 0.4]))
    assert fuzzy.abstention_metrics(correct, -conf, "x")["x_abstain_auroc"] == 0.0


def test_paired_bootstrap_difference_and_interval():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    good = np.where(rng.random(400) < 0.9, y, 1 - y)
    bad = np.where(rng.random(400) < 0.6, y, 1 - y)

    def acc(t, p):
        return float((t == p).mean())

    r = paired_bootstrap(y, good, bad, acc, n=300, seed=0)
    assert r["diff"] == pytest.approx(acc(y, good) - acc(y, bad))
    assert 0 < r["ci_low"] < r["diff"] < r["ci_high"] and r["p_le_0"] == 0.0
    same = paired_bootstrap(y, good, good, acc, n=50)
    assert same["diff"] == same["ci_low"] == same["ci_high"] == 0.0
    grouped = paired_bootstrap(y, good, bad, acc, n=300, seed=0, groups=np.arange(400) // 4)
    assert grouped["diff"] == r["diff"] and grouped["ci_low"] != r["ci_low"]
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap(y, good[:10], bad, acc)
