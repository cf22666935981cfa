"""Bootstrap statistics and calibration against independent oracles: a second implementation of
the draws in the test, hand-computed small examples, and sklearn where it has the metric."""

from __future__ import annotations

import statistics
import warnings
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from dtl.evaluation import calibration
from dtl.evaluation.metrics import accuracy_macro_f1, expected_calibration_error, point_metrics
from dtl.evaluation.stats import Resampler, bootstrap_ci, mean_spread, paired_bootstrap, paired_difference


def _oracle_draws(n_boot: int, seed: int, groups=None, n: int | None = None) -> list[np.ndarray]:
    """The documented draws, written again: ``n`` item indices with replacement, or as many
    groups (sorted by name as strings) with replacement, each contributing all its members in
    their original order."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return [rng.integers(0, n, n) for _ in range(n_boot)]
    names = sorted({str(g) for g in groups})
    members = [np.array([i for i, g in enumerate(groups) if str(g) == name]) for name in names]
    out = []
    for _ in range(n_boot):
        picks = rng.integers(0, len(names), len(names))
        out.append(np.concatenate([members[p] for p in picks]))
    return out


def _quantiles(values, alpha=0.05):
    v = np.asarray(values, float)
    v = v[~np.isnan(v)]
    return float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))


def _swap_models(n=200, seed=0):
    """Two models right on different halves of the items (each 50% accurate): the paired
    difference is 0 and its interval must straddle 0."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    right, wrong = np.eye(2)[y] * 0.8 + 0.1, np.eye(2)[1 - y] * 0.8 + 0.1
    half = np.arange(n) < n // 2
    return y, np.where(half[:, None], right, wrong), np.where(half[:, None], wrong, right)


def test_paired_interval_straddling_zero_does_not_exclude_it_and_matches_a_second_implementation():
    y, a, b = _swap_models()
    r = paired_bootstrap(y, a, b, accuracy_macro_f1, ("accuracy",), n=300, seed=4)["accuracy"]
    ok_a, ok_b = a.argmax(1) == y, b.argmax(1) == y
    diffs = [ok_a[i].mean() - ok_b[i].mean() for i in _oracle_draws(300, 4, n=len(y))]
    lo, hi = _quantiles(diffs)
    assert r["diff"] == 0.0 and r["ci_low"] == pytest.approx(lo) and r["ci_high"] == pytest.approx(hi)
    assert r["ci_low"] < -0.05 and r["ci_high"] > 0.05 and r["excludes_zero"] is False
    assert r["p_le_0"] == pytest.approx(np.mean(np.asarray(diffs) <= 0))
    assert (r["n_items"], r["n_units"], r["unit"]) == (200, 200, "image")
    # B better everywhere: the interval lies below 0, and that excludes it too
    below = paired_bootstrap(y, b * 0 + 0.5, np.eye(2)[y], accuracy_macro_f1, ("accuracy",), n=200)["accuracy"]
    assert below["ci_high"] < 0 and below["excludes_zero"] is True and below["p_le_0"] == 1.0


def test_paired_bootstrap_alpha_sets_the_interval_width():
    y, a, b = _swap_models(seed=1)
    wide = paired_bootstrap(y, a, b, accuracy_macro_f1, ("accuracy",), n=300, seed=2, alpha=0.01)["accuracy"]
    narrow = paired_bootstrap(y, a, b, accuracy_macro_f1, ("accuracy",), n=300, seed=2, alpha=0.5)["accuracy"]
    ok_a, ok_b = a.argmax(1) == y, b.argmax(1) == y
    diffs = [ok_a[i].mean() - ok_b[i].mean() for i in _oracle_draws(300, 2, n=len(y))]
    assert (wide["ci_low"], wide["ci_high"]) == pytest.approx(_quantiles(diffs, 0.01))
    assert (narrow["ci_low"], narrow["ci_high"]) == pytest.approx(_quantiles(diffs, 0.5))


# Groups named so that string order differs from first-appearance and numeric order, and not contiguous.
GROUPS = np.array(["10", "9", "10", "b", "9", "a", "10", "b", "2", "a", "9", "2"] * 5)


def test_group_resampler_draws_whole_groups_exactly_as_documented():
    rs = Resampler(len(GROUPS), GROUPS, seed=7)
    assert rs.n_units == 5 and rs.unit == "group"
    for got, want in zip([rs.draw() for _ in range(20)], _oracle_draws(20, 7, list(GROUPS))):
        assert np.array_equal(got, want)
        counts = np.bincount(got, minlength=len(GROUPS))
        for g in set(GROUPS):  # every member of a group is drawn as often as the others
            assert len(set(counts[GROUPS == g])) == 1
    single = Resampler(12, None, seed=3)
    assert single.n_units == 12 and single.unit == "image"
    assert all(np.array_equal(single.draw(), w) for w in _oracle_draws(5, 3, n=12))



def test_the_default_seed_is_zero_everywhere_a_draw_is_made():
    """A report's intervals are reproducible only if the defaults are: seed 0, 1000 draws."""
    assert np.array_equal(Resampler(12).draw(), Resampler(12, seed=0).draw())
    assert np.array_equal(Resampler(12, GROUPS[:12]).draw(), Resampler(12, GROUPS[:12], seed=0).draw())


def test_a_paired_metric_undefined_on_every_resample_gives_nan_not_a_verdict():
    y = np.array([0, 0, 0])  # one class: AUC is undefined on every draw
    probs = np.eye(2)[y] * 0.8 + 0.1
    r = paired_bootstrap(y, probs, probs[:, ::-1].copy(), point_metrics, ("roc_auc", "accuracy"), 30)
    assert np.isnan(r["roc_auc"]["p_le_0"]) and np.isnan(r["roc_auc"]["ci_low"]) and not r["roc_auc"]["excludes_zero"]
    assert r["accuracy"]["p_le_0"] == 0.0 and r["accuracy"]["excludes_zero"]


def test_a_metric_undefined_on_every_resample_is_a_silent_nan():
    """No numpy "mean of empty slice" warning in a report's log when no resample defines the metric."""
    y = np.arange(20) % 2
    undefined = lambda t, q: {"m": float("nan")}  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = paired_bootstrap(y, np.eye(2)[y], np.eye(2)[1 - y], undefined, ("m",), 20)["m"]
        ci = bootstrap_ci(y, np.eye(2)[y], undefined, 20)["m"]
    assert all(np.isnan(r[k]) for k in ("diff", "ci_low", "ci_high", "p_le_0")) and r["excludes_zero"] is False
    assert np.isnan(ci[0]) and np.isnan(ci[1])


def test_bootstrap_takes_any_real_number_type_from_the_metric_and_summarises_in_float64():
    """A metric on float32 network outputs returns numpy float32 values; one counting exactly may
    return Fractions: the intervals are those of the same values as Python floats."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    u, v = rng.random((2, 80)).astype(np.float32)
    draws = _oracle_draws(300, 1, n=80)
    got = bootstrap_ci(y, u, lambda t, q: {"m": q.mean()}, 300, seed=1)["m"]  # np.float32 values
    assert got == pytest.approx(_quantiles([float(u[i].mean()) for i in draws]), rel=1e-12, abs=0)
    share = lambda t, q: {"m": Fraction(int((q > 0.5).sum()), len(q))}  # noqa: E731 - exact
    as_float = lambda t, q: {"m": float((q > 0.5).mean())}  # noqa: E731
    assert bootstrap_ci(y, u, share, 300, seed=1)["m"] == pytest.approx(bootstrap_ci(y, u, as_float, 300, seed=1)["m"])
    exact = paired_bootstrap(y, u, v, share, ("m",), 300, seed=1)["m"]
    assert exact == pytest.approx(paired_bootstrap(y, u, v, as_float, ("m",), 300, seed=1)["m"])
    diffs = [float((u[i] > 0.5).mean() - (v[i] > 0.5).mean()) for i in draws]
    assert exact["p_le_0"] == pytest.approx(np.mean(np.asarray(diffs) <= 0))


def test_group_ids_given_as_numbers_are_drawn_as_their_text_is():
    """Patient ids read from a CSV come as integers or as text: the same groups, the same draws
    (groups ordered by name as text: "10" < "2" < "9", not numerically)."""
    ids = np.array([10, 9, 10, 2, 9, 2, 2, 10, 9])
    as_num, as_text = Resampler(len(ids), ids, seed=4), Resampler(len(ids), ids.astype(str), seed=4)
    for got, text, want in zip([as_num.draw() for _ in range(10)], [as_text.draw() for _ in range(10)],
                               _oracle_draws(10, 4, list(ids))):
        assert np.array_equal(got, want) and np.array_equal(text, want)


def test_grouped_bootstrap_ci_equals_the_second_implementation():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, len(GROUPS))
    probs = rng.dirichlet(np.ones(3), len(GROUPS))
    got = bootstrap_ci(y, probs, accuracy_macro_f1, 150, seed=11, groups=GROUPS, alpha=0.1)
    draws = _oracle_draws(150, 11, list(GROUPS))
    for m in ("accuracy", "macro_f1"):
        want = _quantiles([accuracy_macro_f1(y[i], probs[i])[m] for i in draws], 0.1)
        assert got[m] == pytest.approx(want)
    paired = paired_bootstrap(y, probs, probs[::-1].copy(), accuracy_macro_f1, ("accuracy",), 100, 3, GROUPS)
    assert (paired["accuracy"]["n_units"], paired["accuracy"]["unit"]) == (5, "group")


def test_bootstrap_interval_ignores_nan_resamples_and_empty_is_nan():
    y = np.array([0, 0, 0, 1])
    probs = np.eye(2)[y] * 0.8 + 0.1
    # AUC is NaN whenever a resample holds one class only; the interval is over the others
    got = bootstrap_ci(y, probs, point_metrics, 200, seed=1)["roc_auc"]
    assert got == (1.0, 1.0)
    nan = bootstrap_ci(np.array([0, 0]), np.eye(2)[[0, 0]], point_metrics, 20)["roc_auc"]
    assert np.isnan(nan[0]) and np.isnan(nan[1])


def test_paired_difference_of_a_scalar_metric():
    y, a, b = _swap_models(n=100, seed=2)
    acc = lambda t, q: float((t == q).mean())  # noqa: E731 - a metric of labels
    r = paired_difference(y, a.argmax(1), np.where(np.arange(100) < 80, y, 1 - y), acc, n=200, seed=5)
    assert set(r) == {"diff", "ci_low", "ci_high", "p_le_0"} and r["diff"] == pytest.approx(0.5 - 0.8)
    assert r["ci_high"] < 0 and r["p_le_0"] == 1.0
    # the documented defaults (n=1000, seed=0): seeded, so the same answer every call
    mean = lambda t, q: float(q.mean())  # noqa: E731 - continuous, so that one draw more moves the quantiles
    u, v = np.random.default_rng(0).random((2, 100))
    assert paired_difference(y, u, v, mean) == paired_difference(y, u, v, mean, n=1000, seed=0)
    assert paired_difference(y, u, v, mean) != paired_difference(y, u, v, mean, n=1001, seed=0)
    narrow = paired_difference(y, u, v, mean, n=200, alpha=0.5)
    assert (narrow["ci_low"], narrow["ci_high"]) == pytest.approx(_quantiles(
        [u[i].mean() - v[i].mean() for i in _oracle_draws(200, 0, n=100)], 0.5))
    # bootstrap_ci's and paired_bootstrap's defaults too (n=1000, seed=0)
    metric = lambda t, q: {"m": float(q.mean())}  # noqa: E731
    assert bootstrap_ci(y, u, metric) == bootstrap_ci(y, u, metric, 1000, 0) != bootstrap_ci(y, u, metric, 1001, 0)
    pb = [paired_bootstrap(y, u, v, metric, ("m",), *args)["m"] for args in ((), (1000, 0), (1001, 0))]
    assert pb[0] == pb[1] != pb[2]
    with pytest.raises(ValueError, match=r"differ in length \(100, 100, 3\)"):
        paired_difference(y, a.argmax(1), y[:3], acc)


def test_mean_spread_of_seed_repeats():
    assert mean_spread([0.5, None, float("nan"), 0.7, 0.9]) == {
        "mean": pytest.approx(0.7), "std": pytest.approx(0.2), "min": 0.5, "max": 0.9, "n": 3}
    assert mean_spread([0.2, 0.4])["std"] == pytest.approx(2 ** 0.5 / 10)  # ddof=1 from two repeats on
    assert mean_spread([0.4]) == {"mean": 0.4, "std": 0.0, "min": 0.4, "max": 0.4, "n": 1}
    empty = mean_spread([None])
    assert empty["n"] == 0 and all(np.isnan(empty[k]) for k in ("mean", "std", "min", "max"))


def test_mean_spread_computes_in_float64_whatever_the_values_type():
    """Repeats given as numpy float32: the summary of the same numbers as Python floats
    (statistics module as the oracle), not a float32 mean off in the 8th digit."""
    vals = np.array([0.9137, 0.8712, 0.9541, 0.9023, 0.8866], dtype=np.float32)
    as_float = [float(v) for v in vals]
    s = mean_spread(list(vals))
    assert s["mean"] == pytest.approx(statistics.fmean(as_float), rel=1e-12, abs=0)
    assert s["std"] == pytest.approx(statistics.stdev(as_float), rel=1e-12, abs=0)
    assert (s["min"], s["max"], s["n"]) == (min(as_float), max(as_float), 5)


# ----------------------------------------------------------------------------- paired gains

def _predictions(paths, labels, p_x, units=None) -> pd.DataFrame:
    t = pd.DataFrame({"path": paths, "label": labels, "p_x": p_x, "p_y": 1 - np.asarray(p_x)})
    return t.assign(bootstrap_unit=units) if units is not None else t


def test_paired_gains_match_items_by_file_not_by_row_position():
    """B's table lists a different, partly overlapping set of files in another order: the gain is
    computed over the shared files only, each model scored on its own prediction of that file."""
    from dtl.report.results import paired_gains

    rng = np.random.default_rng(0)
    n = 60
    paths = np.array([f"img{i:02d}.jpg" for i in range(n)])
    label = rng.choice(["x", "y"], n)
    units = np.array([f"u{i // 3}" for i in range(n)])  # three images per bootstrap unit
    right = np.where(label == "x", 0.9, 0.1)
    p_b = np.where(np.arange(n) % 4 == 0, 1 - right, right)  # B wrong on every 4th file
    a = _predictions(paths, label, right, units).iloc[rng.permutation(n)]
    keep = rng.permutation(n)[:45]  # B holds 45 of A's files and 5 that A lacks
    extra = _predictions([f"other{i}.jpg" for i in range(5)], ["x"] * 5, [0.2] * 5, ["z"] * 5)
    b = pd.concat([_predictions(paths, label, p_b, units).iloc[keep], extra]).iloc[::-1]
    g = paired_gains([("a − b", {"backbone": "r"}, a.reset_index(drop=True), b.reset_index(drop=True))],
                     n_boot=200, seed=3).set_index("metric")
    shared = np.isin(paths, paths[keep])
    y = (label[shared] == "y").astype(int)
    pa, pb = np.eye(2)[np.where(right[shared] > 0.5, 0, 1)], np.eye(2)[np.where(p_b[shared] > 0.5, 0, 1)]
    assert g.loc["test_accuracy", "gain"] == pytest.approx(skm.accuracy_score(y, pa.argmax(1))
                                                           - skm.accuracy_score(y, pb.argmax(1)))
    assert g.loc["test_macro_f1", "gain"] == pytest.approx(skm.f1_score(y, pa.argmax(1), average="macro")
                                                           - skm.f1_score(y, pb.argmax(1), average="macro"))
    assert g.loc["test_accuracy", "gain"] > 0.15
    assert (g["test_items"] == 45).all() and (g["units"] == f"{len(set(units[shared]))} groups").all()
    assert g.loc["test_accuracy", "ci_low"] > 0 and g.loc["test_accuracy", "ci_excludes_0"] == "yes"


def test_paired_gains_skip_tables_without_shared_files():
    from dtl.report.results import paired_gains

    a = _predictions(["a.jpg"], ["x"], [0.9])
    b = _predictions(["b.jpg"], ["x"], [0.9])
    assert paired_gains([("a − b", {"backbone": "r"}, a, b)], n_boot=10).empty


# ----------------------------------------------------------------------------- calibration

def _ece_oracle(y, probs, n_bins=15):
    """Guo et al.'s ECE written per item: bin i holds confidences in (i/n, (i+1)/n]; the gap of
    each bin is weighted by its share of the items."""
    conf, correct = probs.max(1), (probs.argmax(1) == y).astype(float)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(len(y)) if lo < conf[i] <= hi]
        if members:
            gap = abs(sum(correct[i] for i in members) - sum(conf[i] for i in members)) / len(members)
            total += len(members) / len(y) * gap
    return total


def test_ece_weights_each_bin_by_its_share_of_the_items():
    # three items at confidence 0.9 (two right) and one at 0.6 (right), hand computed:
    # 3/4 * |2/3 - 0.9| + 1/4 * |1 - 0.6| = 0.175 + 0.1 (unweighted bins would give 0.3167)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.6, 0.4]])
    y = np.array([0, 0, 0, 0])
    assert expected_calibration_error(y, probs) == pytest.approx(0.275)
    assert expected_calibration_error(y, probs, n_bins=1) == pytest.approx(abs(0.75 - 0.825))


@pytest.mark.parametrize("k, n, seed, n_bins", [(2, 300, 0, 15), (4, 500, 1, 15), (3, 97, 2, 10)])
def test_ece_and_reliability_match_an_independent_implementation(k, n, seed, n_bins):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k) * 0.5, n)
    assert expected_calibration_error(y, probs, n_bins) == pytest.approx(_ece_oracle(y, probs, n_bins))
    r = calibration.reliability(y, probs, n_bins)
    conf = probs.max(1)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    assert r["count"] == np.bincount(bins, minlength=n_bins).tolist() and sum(r["count"]) == n
    full = [b for b in range(n_bins) if r["count"][b]]
    assert [r["confidence"][b] for b in full] == pytest.approx([conf[bins == b].mean() for b in full])
    assert [r["accuracy"][b] for b in full] == pytest.approx([(probs.argmax(1) == y)[bins == b].mean() for b in full])
    assert all(np.isnan(r["accuracy"][b]) for b in range(n_bins) if not r["count"][b])
    assert r["ece"] == pytest.approx(_ece_oracle(y, probs, n_bins)) and len(r["edges"]) == n_bins + 1



def test_reliability_bins_are_open_below_and_closed_above_and_empty_bins_are_silent_nan():
    """Confidences exactly on the 4-bin edges 0.25 / 0.5 / 0.75 / 1: each item in one bin, (lo, hi]."""
    probs = np.array([[0.25] * 4, [0.5, 0.5, 0, 0], [0.75, 0.25, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    y = np.array([0, 0, 1, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" from the empty bin
        r = calibration.reliability(y, probs, 4)
        empty = calibration.reliability(y[:1], probs[:1], 4)
    assert r["count"] == [1, 1, 1, 2] and r["edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert r["confidence"] == [0.25, 0.5, 0.75, 1.0] and r["accuracy"] == [1.0, 1.0, 0.0, 1.0]
    assert empty["count"] == [1, 0, 0, 0] and all(np.isnan(empty[k][b]) for k in ("confidence", "accuracy") for b in (1, 2, 3))
    assert r["ece"] == pytest.approx(_ece_oracle(y, probs, 4))


def test_softmax_and_nll_compute_in_float64_whatever_the_logits_dtype():
    """Logits come from the network as float32; the temperature fit needs float64 precision."""
    z = np.random.default_rng(4).normal(0, 8, (50, 4)).astype(np.float32)
    y = np.arange(50) % 4
    p = calibration.softmax(z, 1.7)
    assert p.dtype == np.float64
    assert np.array_equal(p, calibration.softmax(z.astype(np.float64), 1.7))
    assert calibration.nll(z, y, 1.7) == calibration.nll(z.astype(np.float64), y, 1.7)

def test_softmax_and_nll_against_hand_values():
    z = np.array([[0.0, np.log(3.0)], [1000.0, 1000.0]])  # the second row overflows a naive exp
    assert calibration.softmax(z) == pytest.approx(np.array([[0.25, 0.75], [0.5, 0.5]]))
    assert calibration.softmax(z, 2.0)[0] == pytest.approx([1 / (1 + 3 ** 0.5), 3 ** 0.5 / (1 + 3 ** 0.5)])
    y = np.array([1, 0])
    assert calibration.nll(z, y) == pytest.approx(-(np.log(0.75) + np.log(0.5)) / 2)
    assert calibration.nll(z, y, 2.0) == pytest.approx(-(np.log(3 ** 0.5 / (1 + 3 ** 0.5)) + np.log(0.5)) / 2)


def _logits(n, inflate, seed):
    """Labels drawn from softmax(base), logits ``inflate`` × base: the NLL-optimal T is ~inflate."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1.5, (n, 3))
    p = calibration.softmax(base)
    y = (rng.random(n)[:, None] > p.cumsum(1)).sum(1).clip(0, 2)
    return y, inflate * base


def test_fit_temperature_is_the_nll_minimum_of_a_grid_search():
    y, z = _logits(1500, 3.0, 0)
    t = calibration.fit_temperature(z, y)
    grid = np.exp(np.linspace(np.log(2.0), np.log(4.5), 1001))
    best = grid[np.argmin([calibration.nll(z, y, g) for g in grid])]
    assert t == pytest.approx(best, rel=2e-3) and 2.4 < t < 3.6
    with pytest.raises(ValueError, match="^cannot fit a temperature on an empty split$"):
        calibration.fit_temperature(z[:0], y[:0])


def test_fit_temperature_gives_no_solver_warnings():
    """The tolerance handed to the bounded search is one it knows: no "Unknown solver options" warning."""
    y, z = _logits(300, 2.0, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = calibration.fit_temperature(z, y)
    assert calibration.nll(z, y, t) <= min(calibration.nll(z, y, t * f) for f in (0.99, 1.01))


def test_supported_temperature_needs_errors_and_a_sane_value():
    assert calibration.supported(2.0, 3) and calibration.supported(float(np.exp(3.0)), 1)
    assert not calibration.supported(2.0, 0)
    assert not calibration.supported(float(np.exp(3.01)), 5) and not calibration.supported(float(np.exp(-3.01)), 5)


def test_explain_fits_the_temperature_on_val_only_and_scores_test_with_it():
    """Val logits 3× too confident, test logits 3× too timid: a fit on val gives T ~ 3, a fit on
    test (or on both) would give T < 1 or ~ 1."""
    from dtl.explain.job import calibrate

    y_val, z_val = _logits(1500, 3.0, 1)
    y_test, z_test = _logits(1500, 1 / 3, 2)
    out = calibrate(SimpleNamespace(bootstrap=50, seed=0), y_val, z_val, y_test, z_test, "test", None)
    t_val = calibration.fit_temperature(z_val, y_val)
    assert out["temperature"] == pytest.approx(t_val) and out["temperature"] > 2.4
    assert calibration.fit_temperature(z_test, y_test) < 0.5  # what a fit on test would have said
    assert out["test_ece_after"] == pytest.approx(expected_calibration_error(y_test, calibration.softmax(z_test, t_val)))
    assert out["val_ece_after"] < out["val_ece_before"] and out["test_ece_after"] > out["test_ece_before"]
    assert out["val_errors"] == int((z_val.argmax(1) != y_val).sum())
    assert out["test_argmax_unchanged"] and out["val_argmax_unchanged"]
    lo, hi = out["test_ece_after_ci_low"], out["test_ece_after_ci_high"]
    assert lo <= out["test_ece_after"] <= hi
