"""Same command, same numbers: study identity from weights and training settings only, pinned
command-line values, TPE's start-up count from the budget, grouped cross-validation folds and
the corrected resampled t statistics that compare models on them."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import statistics
import subprocess
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from dtl import DTLError, config
from dtl.data.splits import cv_folds, fold_split
from dtl.evaluation.stats import corrected_t_interval, holm, joined_units
from dtl.model.net import DTLNet, ModelSpec
from dtl.report.results import _units
from dtl.train.phases import init_digest, training_config
from dtl.train.tune import check_fixed_values, load_search_space, open_optuna_study, startup_trials, study_identity
from dtl.train.weights import save_checkpoint
from tests.conftest import PYTHON, ROOT

# ---------------------------------------------------------------------------- identity (fast)


def _net(seed: int) -> DTLNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return DTLNet(ModelSpec("test_resnet", ("a", "b")))


def test_init_digest_hashes_the_weights_not_the_file(tmp_path):
    """A phase-1 checkpoint's meta holds measured figures (throughput): two runs that trained the
    very same weights must start phase 2 from the same digest, whichever file holds them."""
    net = _net(0)
    a = save_checkpoint(tmp_path / "a.pt", net, {"metrics": {"train_images_per_s": 1876.9}, "config": {"x": "/one"}})
    b = save_checkpoint(tmp_path / "b.pt", net, {"metrics": {"train_images_per_s": 23.6}, "config": {"x": "/two"}})
    assert a.read_bytes() != b.read_bytes()
    assert init_digest(a) == init_digest(b) == init_digest(f"file:{b}")
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))  # the logged model's weights
    assert init_digest(tmp_path / "w.safetensors") == init_digest(a)
    other = save_checkpoint(tmp_path / "c.pt", _net(1), {"metrics": {"train_images_per_s": 1876.9}})
    assert init_digest(other) != init_digest(a)
    assert init_digest("scratch") == "scratch"


def test_study_identity_ignores_paths_budget_and_reporting_but_not_training_settings():
    base = config.load(["demo"])
    ident = study_identity(base, "phase2", "d" * 64, "sha256:00")
    same = config.load(["demo"], ["phase2.data.root=/elsewhere", "work_dir=/w", "cache_dir=/c", "report_dir=/r",
                                  "phase2.n_trials=9", "tune.storage=sqlite:///x.db", "bootstrap=7",
                                  "tracking_uri=sqlite:///m.db", "final.cv=5", "backbones=[test_resnet]"])
    assert study_identity(same, "phase2", "d" * 64, "sha256:00") == ident
    for change in (["seed=1"], ["phase2.epochs=2"], ["augment.hflip=0.1"], ["phase2.data.split_seed=3"],
                   ["image_size=32"], ["phase2.unfreeze=2"]):
        assert study_identity(config.load(["demo"], change), "phase2", "d" * 64, "sha256:00") != ident, change
    assert study_identity(base, "phase2", "e" * 64, "sha256:00") != ident
    assert study_identity(base, "phase2", "d" * 64, "sha256:01") != ident


def test_the_resume_check_ignores_paths():
    a = config.to_dict(config.load(["demo"]))
    b = config.to_dict(config.load(["demo"], ["phase2.data.root=/moved", "work_dir=/w2", "tune.storage=sqlite:///o.db"]))
    assert training_config(a) == training_config(b)
    assert training_config(a) != training_config(config.to_dict(config.load(["demo"], ["phase2.lr_head=0.02"])))


# ---------------------------------------------------------------------------- pinned values (fast)


def test_an_explicit_value_for_a_tuned_key_pins_it():
    cfg = config.load(["demo"], ["phase2.unfreeze=3", "phase2.epochs=2"])
    assert cfg.phase2.pinned == ("unfreeze",)  # epochs is not in the search space: a plain value
    assert cfg.phase1.pinned == ()
    space = load_search_space(cfg, "phase2")
    assert "unfreeze" not in space and {"lr_head", "lr_backbone", "head_dropout"} <= set(space)
    assert "unfreeze" in load_search_space(cfg, "phase1")
    plain = config.load(["demo"], ["phase2.epochs=2"])
    assert plain.phase2.pinned == () and "unfreeze" in load_search_space(plain, "phase2")
    # pinned is part of what the study is: another identity than the tuned study
    assert study_identity(cfg, "phase2", "d", "s") != study_identity(
        config.load(["demo"], ["phase2.epochs=2"]), "phase2", "d", "s")
    assert config.flatten(cfg)["phase2.pinned"] == "unfreeze"


def test_a_pinned_value_is_validated_before_training():
    cfg = config.load(["demo"], ["phase2.unfreeze=99"])
    with pytest.raises(DTLError, match=r"phase2\.unfreeze=99 is out of range for test_resnet.*0 \(head only\) to 5"):
        check_fixed_values(cfg, "phase2", "test_resnet")
    check_fixed_values(config.load(["demo"], ["phase2.unfreeze=5"]), "phase2", "test_resnet")
    check_fixed_values(config.load(["demo"]), "phase2", "test_resnet")  # tuned: nothing fixed to check
    with pytest.raises(DTLError, match=r"out of range; valid: \[-1, inf\)"):
        config.load(["demo"], ["phase2.unfreeze=-2"])


def test_pinning_a_key_named_in_search_is_refused():
    with pytest.raises(DTLError, match=r"phase2\.unfreeze is given on the command line and also named in phase2\.search"):
        config.load(["demo"], ["phase2.search=[unfreeze,lr_head]", "phase2.unfreeze=2"])


def test_the_cli_flags_pin_like_overrides():
    from dtl.cli import build_parser, load_config

    cfg = load_config(build_parser().parse_args(["main", "--config", "demo", "--overrides", "phase1.lr_head=0.005"]))
    assert cfg.phase1.pinned == ("lr_head",) and "lr_head" not in load_search_space(cfg, "phase1")


# ---------------------------------------------------------------------------- start-up draws (fast)


@pytest.mark.parametrize(("n_trials", "given", "expected"), [
    (10, -1, 3), (30, -1, 10), (3, -1, 2), (2, -1, 2), (1, -1, 2), (10, 5, 5), (10, 0, 0)])
def test_startup_trials_follow_the_budget_unless_set(n_trials, given, expected):
    cfg = config.load(["demo"], [f"phase2.n_trials={n_trials}", f"tune.startup_trials={given}"])
    assert startup_trials(cfg, "phase2") == expected
    study = open_optuna_study(cfg, "s", "phase2", optuna.storages.InMemoryStorage())
    assert study.sampler._n_startup_trials == expected


def test_the_default_startup_count_is_derived():
    assert config.TuneConfig().startup_trials == -1
    assert startup_trials(config.load(["real"]), "phase2") == max(2, config.load(["real"]).phase2.n_trials // 3)


# ---------------------------------------------------------------------------- folds (fast)


def _grouped(n_groups: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label = ["Benign", "Early", "Pre", "Pro"][g % 4]
        for i in range(int(rng.integers(1, 6))):
            rows.append({"path": f"{label}/g{g:03d}_{i}.jpg", "label": label, "group": f"g{g:03d}"})
    return pd.DataFrame(rows)


def test_cv_folds_keep_groups_whole_stratify_and_repeat_exactly():
    df = _grouped()
    folds = cv_folds(df["label"], df["group"], 5, seed=0)
    assert set(folds) == set(range(5))
    assert (df.assign(f=folds).groupby("group")["f"].nunique() == 1).all()  # a group never spans two folds
    for f in range(5):  # each fold holds every class
        assert df.loc[folds == f, "label"].nunique() == 4
    assert (cv_folds(df["label"], df["group"], 5, seed=0) == folds).all()
    shuffled = df.sample(frac=1.0, random_state=3)  # same items in another row order: same folds per item
    again = pd.Series(cv_folds(shuffled["label"], shuffled["group"], 5, seed=0), index=shuffled.index)
    assert (again.sort_index().to_numpy() == folds).all()
    assert (cv_folds(df["label"], df["group"], 5, seed=1) != folds).any()
    with pytest.raises(ValueError, match="k <= the number of units"):
        cv_folds(df["label"].head(3), df["group"].head(3), 5, seed=0)


def test_fold_split_tests_each_item_exactly_once_and_validates_on_the_next_fold():
    df = _grouped()
    ids = cv_folds(df["label"], df["group"], 4, seed=0)
    tested = np.zeros(len(df), dtype=int)
    for f in range(4):
        split = fold_split(df["label"], df["group"], 4, f, seed=0)
        tested += split == "test"
        assert ((split == "test") == (ids == f)).all() and ((split == "val") == (ids == (f + 1) % 4)).all()
        assert set(df.loc[split == "train", "group"]).isdisjoint(df.loc[split != "train", "group"])
    assert (tested == 1).all()


def test_every_model_of_a_job_gets_the_same_folds(workspace, cache_dir):
    from dtl.data import store

    cfg = config.load(["demo"], [f"cache_dir={cache_dir}"])
    a = dataclasses.replace(cfg.phase2.data, cv_folds=3, cv_fold=1)
    b = dataclasses.replace(a, mask_annotation="off")  # another row of the table, same data
    with store.scope() as data:
        da, db = data.dataset(a, cache_dir), data.dataset(b, cache_dir)
        base = data.dataset(cfg.phase2.data, cache_dir)
    assert (da.manifest[["path", "split"]].to_numpy() == db.manifest[["path", "split"]].to_numpy()).all()
    assert set(da.manifest["path"]) == set(base.manifest["path"])  # every item, the main test split's too
    assert (da.manifest.groupby("group")["split"].nunique() == 1).all()
    with pytest.raises(DTLError, match="cv_folds must be 0"):
        config.load(["demo"], ["phase2.data.cv_folds=3", "phase2.data.cv_fold=3"])
    with pytest.raises(DTLError, match="final.cv=1 is not valid"):
        config.load(["demo"], ["final.cv=1"])
    with pytest.raises(DTLError, match="final.cv=2 is not valid; 0 .off. or K >= 3"):  # 2 folds: one test, one val, no train
        config.load(["demo"], ["final.cv=2"])
    with pytest.raises(DTLError, match="cv_folds must be 0 .off. or >= 3"):
        config.load(["demo"], ["phase2.data.cv_folds=2"])


# ---------------------------------------------------------------------------- statistics (fast)


def test_corrected_t_interval_matches_a_hand_computed_example():
    # J = 5 folds, n_train = 600, n_test = 200: var = 2.5e-4, factor 1/5 + 1/3 = 0.5333...,
    # se = sqrt(1.3333e-4) = 0.0115470, t(0.975, 4) = 2.7764451 -> half width 0.0320596
    r = corrected_t_interval([0.90, 0.92, 0.88, 0.91, 0.89], n_train=600, n_test=200)
    assert r["mean"] == pytest.approx(0.90) and r["sd"] == pytest.approx(0.0158113883)
    assert r["ci_low"] == pytest.approx(0.90 - 0.0320596, abs=1e-6)
    assert r["ci_high"] == pytest.approx(0.90 + 0.0320596, abs=1e-6)
    plain = 2.7764451 * np.sqrt(2.5e-4 / 5)  # the uncorrected interval is narrower
    assert r["ci_high"] - r["mean"] > plain
    d = corrected_t_interval([0.02, -0.01, 0.03, 0.00, 0.01], 600, 200)  # t = 0.01 / sqrt(0.5333 * 2.5e-4)
    assert d["t"] == pytest.approx(0.01 / np.sqrt(0.533333 * 2.5e-4), rel=1e-4)
    # Student's t with 4 degrees of freedom in closed form, as an oracle independent of SciPy
    t = d["t"]
    x = t / np.sqrt(1 + t * t / 4)
    cdf = 0.5 + 3 / 8 * x * (1 - x * x / 12)
    assert d["p"] == pytest.approx(2 * (1 - cdf), abs=1e-9) and d["ci_low"] < 0 < d["ci_high"]
    assert np.isnan(corrected_t_interval([0.5], 600, 200)["ci_low"])



@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on inf - inf
def test_corrected_t_interval_of_folds_with_both_infinities_is_undefined_not_significant():
    """+inf and -inf folds (a loss that overflowed both ways) leave mean and spread NaN: the p-value
    said 0.0 ("significant") before; nothing can be concluded, so every statistic is NaN."""
    r = corrected_t_interval([0.1, float("inf"), float("-inf"), 0.2], 600, 200)
    assert all(np.isnan(r[k]) for k in ("mean", "sd", "ci_low", "ci_high", "t", "p")) and r["n"] == 4
    one_way = corrected_t_interval([0.1, float("inf"), 0.2], 600, 200)  # mean +inf, spread NaN: no p-value either
    assert one_way["mean"] == float("inf") and np.isnan(one_way["p"])


def test_corrected_t_interval_edge_cases_drop_missing_folds_and_name_a_zero_spread():
    full = corrected_t_interval([0.90, 0.92, 0.88], 600, 200)
    assert full["n"] == 3 and np.isfinite(full["ci_low"])
    assert corrected_t_interval([0.90, None, float("nan"), 0.92, 0.88], 600, 200) == full  # missing folds dropped
    two = corrected_t_interval([0.90, 0.92], 600, 200)  # J = 2 is the smallest with a spread
    assert two["n"] == 2 and np.isfinite(two["ci_low"]) and np.isfinite(two["p"])
    assert np.isfinite(corrected_t_interval([0.90, 0.92], 1, 1)["ci_low"])  # any positive training size
    for values, n_train, mean in (([0.5], 600, 0.5), ([], 600, None), ([0.90, 0.92], 0, 0.91)):
        r = corrected_t_interval(values, n_train, 200)
        assert r["n"] == len(values) and set(r) == set(full)
        assert r["mean"] == pytest.approx(mean) if mean is not None else np.isnan(r["mean"])
        assert all(np.isnan(r[k]) for k in ("sd", "ci_low", "ci_high", "t", "p"))
    # every fold equal: no spread, so the sign of the mean decides
    same = corrected_t_interval([0.02] * 4, 600, 200)
    assert (same["t"], same["p"], same["ci_low"], same["ci_high"]) == (float("inf"), 0.0, 0.02, 0.02)
    assert corrected_t_interval([-0.02] * 4, 600, 200)["t"] == float("-inf")
    zero = corrected_t_interval([0.0] * 4, 600, 200)
    assert (zero["t"], zero["p"]) == (0.0, 1.0)

def test_holm_adjusts_step_down():
    adj = holm([0.01, 0.04, 0.03, np.nan, 0.005])
    assert adj[[4, 0, 2, 1]] == pytest.approx([0.02, 0.03, 0.06, 0.06])
    assert np.isnan(adj[3])
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0]) and holm([0.02, 0.5]) == pytest.approx([0.04, 0.5])


def test_corrected_t_interval_computes_in_float64_and_is_silent_without_folds():
    # fold results as numpy float32: the summary of the same numbers as Python floats (statistics
    # module as the oracle), not a float32 mean and variance off in the 8th digit
    folds = np.array([0.9137, 0.8712, 0.9541, 0.9023, 0.8866], dtype=np.float32)
    as_float = [float(v) for v in folds]
    r = corrected_t_interval(list(folds), 600, 200)
    assert r["mean"] == pytest.approx(statistics.fmean(as_float), rel=1e-12, abs=0)
    assert r["sd"] == pytest.approx(statistics.stdev(as_float), rel=1e-12, abs=0)
    se = np.sqrt((1 / 5 + 200 / 600) * statistics.variance(as_float))
    assert r["t"] == pytest.approx(statistics.fmean(as_float) / se, rel=1e-12, abs=0)
    with warnings.catch_warnings():  # no fold finished: NaN, without numpy's "mean of empty slice"
        warnings.simplefilter("error")
        none = corrected_t_interval([None, float("nan")], 600, 200)
    assert none["n"] == 0 and all(np.isnan(none[k]) for k in ("mean", "sd", "ci_low", "ci_high", "t", "p"))


def test_holm_treats_a_missing_p_value_given_as_none_like_nan():
    adj = holm([0.01, None, 0.04])
    assert adj[[0, 2]] == pytest.approx([0.02, 0.04]) and np.isnan(adj[1])


def test_joined_units_compare_labels_as_text_so_blank_cells_share_one_unit():
    """A units column read from a CSV is float with NaN for blank cells; labels are compared as the
    text the report path reads ("nan" is one label), in either grouping."""
    nums, names = np.array([np.nan, np.nan, 1.0, 2.0]), ["p", "q", "r", "s"]
    for a, b in ((nums, names), (names, nums)):
        u = joined_units(a, b)
        assert u[0] == u[1] and len(set(u)) == 3
        assert list(u) == list(joined_units(np.asarray(a).astype(str), np.asarray(b).astype(str)))


def test_joined_units_link_items_grouped_together_by_either_protocol():
    a = ["g1", "g1", "g2", "g3", "g4", "g5"]
    b = ["b1", "b2", "b2", "b3", "b3", "b4"]
    u = joined_units(a, b)
    assert u[0] == u[1] == u[2] and u[3] == u[4] and len({u[0], u[3], u[5]}) == 3
    m = pd.DataFrame({"bootstrap_unit_a": a, "bootstrap_unit_b": b})
    assert len(set(_units(m))) == 3  # two protocols: the join, not row a's 5 groups
    same = pd.DataFrame({"bootstrap_unit_a": a, "bootstrap_unit_b": [x.upper() for x in a]})
    assert list(_units(same)) == a  # one grouping, renamed: kept as it is


# ---------------------------------------------------------------------------- end to end (slow)


def _demo(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([PYTHON, "-m", "dtl", *extra, "--quiet"], cwd=folder, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=1200)


def _fingerprint(folder: Path) -> dict:
    """What a user would compare between two runs: study names, each trial's parameters and
    per-epoch values, each study's test metrics, the registered versions and the champion."""
    db = sqlite3.connect(folder / "mlflow.db")
    q = lambda sql: db.execute(sql).fetchall()  # noqa: E731
    tags = {(r, k): v for r, k, v in q("select run_uuid, key, value from tags")}
    tag = lambda key: tags.get(key) or ""  # noqa: E731 - runs without the tag sort first
    studies = sorted(v for (r, k), v in tags.items() if k == "dtl.study" and tag((r, "dtl.role")) == "study")
    params = sorted(q("select r.run_uuid, p.key, p.value from params p join runs r on p.run_uuid = r.run_uuid "
                      "where p.key like 'trial.%'"))
    params = sorted((tag((r, "dtl.study")), tag((r, "optuna.trial")), k, v) for r, k, v in params)
    epochs = sorted((tag((r, "dtl.study")), tag((r, "optuna.trial")), tag((r, "dtl.role")), k, s, v)
                    for r, k, s, v in q("select run_uuid, key, step, value from metrics where key like 'val_%' "
                                        "or key = 'train_loss' or key like 'test_%'"))
    aliases = sorted(q("select name, alias, version from registered_model_aliases"))
    versions = sorted((v, tag((r, "dtl.study"))) for v, r in q("select version, run_id from model_versions"))
    return {"studies": studies, "params": params, "values": epochs, "aliases": aliases, "versions": versions}


@pytest.mark.slow
def test_two_fresh_runs_of_the_readme_command_give_the_same_numbers(tmp_path):
    """Bit for bit on the CPU: two fresh folders (fresh stores, caches and checkpoints), the same
    command; then `phase2` on its defaults in the first folder finds the studies `main` finished."""
    args = ["main", "--config", "demo", "--backbones", "test_resnet,test_efficientnet"]
    for name in ("one", "two"):
        r = _demo(tmp_path / name, *args)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = _fingerprint(tmp_path / "one"), _fingerprint(tmp_path / "two")
    assert len(one["studies"]) == 4 and len(one["params"]) > 10 and len(one["values"]) > 50
    for key in one:
        assert one[key] == two[key], key
    assert [a for a in one["aliases"] if a[1] == "champion"]
    # phase 2 on the defaults right after main: the same studies, no new trial, no new version
    before = _fingerprint(tmp_path / "one")
    r = _demo(tmp_path / "one", "phase2", "--config", "demo", "--backbones", "test_resnet,test_efficientnet")
    assert r.returncode == 0, r.stderr[-3000:]
    after = _fingerprint(tmp_path / "one")
    assert after["params"] == before["params"] and after["versions"] == before["versions"]
    assert [v for v in after["values"] if v[2] == "trial"] == [v for v in before["values"] if v[2] == "trial"]


@pytest.mark.slow
def test_final_cv_retrains_on_shared_grouped_folds_and_reports_corrected_gains(workspace, cache_dir):
    from dtl import pipeline
    from dtl.tracking.adapter import connect
    from tests.conftest import demo_overrides

    cfg = config.load(["demo"], demo_overrides(cache_dir, workspace, **{
        "phase1.n_trials": 1, "phase2.n_trials": 1, "final.cv": 3, "strategies": "[double,scratch]",
        "cards_dir": str(workspace / "cards")}))
    res = pipeline.main(cfg)
    t = connect(cfg.tracking_uri, cfg.experiment)
    runs = {s: t.client.get_run(res.studies[("phase2", s, "test_resnet")].run_id) for s in ("double", "scratch")}
    folds = {}
    for s, run in runs.items():
        kids = t.client.search_runs([t.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}' "
                                                       "and tags.`dtl.role` = 'fold'")
        assert sorted(k.data.tags["dtl.cv_fold"] for k in kids) == ["0", "1", "2"]
        assert all(k.inputs.dataset_inputs for k in kids)  # each fold's manifest logged as MLflow inputs
        m = run.data.metrics
        fj = json.loads(Path(t.client.download_artifacts(run.info.run_id, "cv/folds.json", str(workspace))).read_text())
        accs = [f["test_accuracy"] for f in fj["folds"]]
        assert m["cv_test_accuracy_mean"] == pytest.approx(np.mean(accs))
        assert m["cv_test_accuracy_sd"] == pytest.approx(np.std(accs, ddof=1))
        folds[s] = fj["folds"]
    assert runs["double"].data.tags["dtl.cv_id"] == runs["scratch"].data.tags["dtl.cv_id"]
    assert [f["n_test"] for f in folds["double"]] == [f["n_test"] for f in folds["scratch"]]
    versions = t.client.search_model_versions("name='all-dtl'")
    assert len(versions) == 1  # only the main model is registered, never a fold model
    md = (workspace / "report" / "results.md").read_text()
    assert "## Cross-validated gains" in md and "double − scratch" in md and "p_holm" in md
    row = pd.read_csv(workspace / "report" / "results.csv").set_index("strategy").loc["double"]
    assert row["test_accuracy_cv"].endswith("(3x1)")
    diffs = [a["test_accuracy"] - b["test_accuracy"] for a, b in zip(folds["double"], folds["scratch"])]
    n_tr = np.mean([f["n_train"] for f in folds["double"]])
    n_te = np.mean([f["n_test"] for f in folds["double"]])
    expect = corrected_t_interval(diffs, n_tr, n_te)
    cv = pd.read_csv(workspace / "report" / "cv_gains.csv")
    got = cv[cv["metric"] == "test_accuracy"].iloc[0]
    assert got["gain"] == pytest.approx(expect["mean"]) and got["ci_low"] == pytest.approx(expect["ci_low"])
    # the shortcut baseline, refitted on the same folds: a fold-level model − baseline gain (#23)
    (base,) = t.client.search_runs([t.experiment_id], "tags.`dtl.role` = 'baseline'")
    assert base.data.tags["dtl.cv_id"] == runs["double"].data.tags["dtl.cv_id"]
    cid = runs["double"].data.tags["dtl.cv_id"]
    bj = json.loads(Path(t.client.download_artifacts(base.info.run_id, f"cv/folds-{cid}.json", str(workspace))).read_text())
    assert [f["n_test"] for f in bj["folds"]] == [f["n_test"] for f in folds["double"]]
    assert [f["n_train"] for f in bj["folds"]] == [f["n_train"] for f in folds["double"]]
    assert len({f["test_accuracy"] for f in bj["folds"]}) > 1  # fitted per fold, not the held-out model copied
    # the features are computed once for all items: fold 1 scored from its own decoded splits agrees
    import dataclasses

    from dtl.config import with_phase
    from dtl.data.probe import baseline_probs
    from dtl.evaluation.metrics import point_metrics
    from dtl.model.mask import annotation_mask
    from dtl.train.phases import dataset

    d = cfg.phase2.data
    ds = dataset(with_phase(cfg, "phase2", data=dataclasses.replace(d, cv_folds=3, cv_fold=1)), "phase2")
    probs = baseline_probs(ds, base.data.tags["backbone"].removeprefix("baseline:"), base.data.tags["strategy"],
                           annotation_mask(d.mask_annotation, ds.kind, d.variant), cfg.cache_dir, d.colour)
    assert point_metrics(ds.label_ids("test"), probs["test"])["accuracy"] == pytest.approx(bj["folds"][1]["test_accuracy"])
    diffs = [a["test_accuracy"] - b["test_accuracy"] for a, b in zip(folds["double"], bj["folds"])]
    expect = corrected_t_interval(diffs, n_tr, n_te)
    got = cv[(cv["metric"] == "test_accuracy") & cv["comparison"].str.startswith("model − baseline:")
             & cv["comparison"].str.contains("double")].iloc[0]
    assert got["gain"] == pytest.approx(expect["mean"]) and got["ci_high"] == pytest.approx(expect["ci_high"])
    assert "model − baseline:" in md.split("## Cross-validated gains")[1]
    # rerun: the fold runs are found again, not retrained; the baseline's folds are kept
    pipeline.main(cfg, report=False)
    assert len(t.client.search_runs([t.experiment_id], "tags.`dtl.role` = 'fold'")) == 6
    assert len(t.client.search_runs([t.experiment_id], "tags.`dtl.role` = 'baseline'")) == 1
    # a baseline stored before final.cv (or with other folds) gets the folds of the job that finds it
    pipeline.cross_validate_baseline(config.load(["demo"], demo_overrides(cache_dir, workspace, **{"final.cv": 4})),
                                     t, base.info.run_id)
    again = t.client.get_run(base.info.run_id)
    assert again.data.tags["dtl.cv"] == "4x1" and again.data.tags["dtl.cv_id"] != cid
    # ... and keeps the earlier folds beside them: the 3-fold models still pair with their baseline
    assert {a.path for a in t.client.list_artifacts(base.info.run_id, "cv")} == \
        {f"cv/folds-{cid}.json", f"cv/folds-{again.data.tags['dtl.cv_id']}.json"}
    from dtl.report import results
    cv_again = results.cv_gains(results.collect(t, "all-dtl"))
    assert cv_again["comparison"].str.startswith("model − baseline:").any()
