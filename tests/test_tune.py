"""Optuna studies for real: pruning, resume after SIGKILL mid-trial, two workers on one study (slow);
the project's own study factory, pruners and study identity in memory (fast)."""

import os
import subprocess

import mlflow
import optuna
import pytest
import requests
from optuna.trial import TrialState

from dtl import DTLError, config
from dtl.tracking.adapter import connect, find_runs, start_run
from dtl.train.tune import make_storage, run_study
from tests.conftest import PYTHON, demo_overrides, free_port, wait_for_http


@pytest.mark.slow
def test_threshold_pruner_prunes_and_tags_the_trial_runs(workspace, cache_dir):
    """Pruned trials do not count toward n_trials: with every trial pruned the study goes on to
    its cap on trials of any state (here 3 for n_trials=2), then ends with a clear error."""
    cfg = config.load(["demo"], demo_overrides(cache_dir, workspace, **{
        "tune.pruner": "threshold", "tune.threshold": 1.01, "tune.pruner_warmup_epochs": 1, "tune.max_trials": 3}))
    t = connect(cfg.tracking_uri, cfg.experiment)
    with pytest.raises(DTLError, match="no trial completed.*'pruned': 3"):
        run_study(cfg, "phase1", "test_resnet", t)
    trials = mlflow.search_runs([t.experiment_id], "tags.`dtl.role` = 'trial'", output_format="list")
    assert len(trials) == 3
    for r in trials:
        assert r.data.tags["optuna.state"] == "PRUNED" and r.data.tags["optuna.pruned_epoch"] == "1"
        assert r.info.status == "FINISHED"
        assert [m.step for m in t.client.get_metric_history(r.info.run_id, "val_macro_f1")] == [0, 1]
    study = mlflow.search_runs([t.experiment_id], "tags.`dtl.role` = 'study'", output_format="list")[0]
    assert study.info.status == "FAILED"


@pytest.mark.slow
def test_median_pruner_study_logs_parent_summary(workspace, cache_dir):
    cfg = config.load(["demo"], demo_overrides(cache_dir, workspace, **{"phase1.n_trials": 3}))
    t = connect(cfg.tracking_uri, cfg.experiment)
    res = run_study(cfg, "phase1", "test_resnet", t)
    run = t.client.get_run(res.run_id)
    m = run.data.metrics
    assert m["n_complete"] + m["n_pruned"] == 3 and "study_wall_s" in m and "best_value" in m
    assert run.data.tags["best_trial"] == str(res.best_trial)
    # TPE's start-up draws for a budget of 3: max(2, 3 // 3) = 2, so only trial 2 was proposed by TPE
    assert run.data.tags["dtl.best_is_startup_draw"] == str(res.best_trial < 2).lower()
    arts = {a.path for a in t.client.list_artifacts(res.run_id, "study")}
    assert "study/optimization_history.png" in arts and "study/best.json" in arts
    assert {a.path for a in t.client.list_artifacts(res.run_id, "checkpoint")} == {"checkpoint/best.pt"}
    # only the best trial's checkpoint is kept
    kept = sorted(p.name for p in (workspace / "runs" / res.study_name).iterdir())
    assert kept == [f"trial-{res.best_trial}"]


def _phase1_cmd(tmp, cache_dir, storage, n_trials=3, extra=()):
    o = demo_overrides(cache_dir, tmp, **{"phase1.n_trials": n_trials, "tune.storage": storage,
                                          "tune.heartbeat_s": 1})
    return [PYTHON, "-m", "dtl", "phase1", "--config", "demo"] + [x for kv in o for x in ("-o", kv)] + list(extra)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_resume_after_sigkill_in_the_middle_of_a_trial(workspace, cache_dir, kind):
    """Rerun at once: the killed trial's process is gone from this host, so it is failed and
    retried without waiting for a heartbeat (journal storage has none)."""
    storage = f"sqlite:///{workspace}/optuna.db" if kind == "sqlite" else f"journal:{workspace}/optuna.journal"
    cmd = _phase1_cmd(workspace, cache_dir, storage)
    env = {**os.environ, "DTL_KILL_AT": "phase1:trial1:epoch0", "DTL_KILL_MARKER": str(workspace / "killed")}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=workspace, timeout=600)
    assert first.returncode == -9, first.stderr[-2000:]
    assert (workspace / "killed").exists()
    name = optuna.get_all_study_names(make_storage(storage, 1))[0]
    study = optuna.load_study(study_name=name, storage=make_storage(storage, 1))
    states = [t.state for t in study.trials]
    assert states[0] in (TrialState.COMPLETE, TrialState.PRUNED) and states[1] == TrialState.RUNNING
    kept_value = study.trials[0].value
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=workspace, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    study = optuna.load_study(study_name=name, storage=make_storage(storage, 1))
    by_state = {s: [t for t in study.trials if t.state == s] for s in TrialState}
    assert len(by_state[TrialState.COMPLETE]) + len(by_state[TrialState.PRUNED]) == 3
    assert [t.number for t in by_state[TrialState.FAIL]] == [1]
    assert study.trials[0].value == kept_value  # the finished trial was not redone
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == 1)
    assert retry.params == study.trials[1].params
    t = connect("", "all-dtl-demo")
    runs = mlflow.search_runs([t.experiment_id], output_format="list")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = [r for r in runs if r.data.tags.get("optuna.trial") == "1"]
    assert [r.info.status for r in killed] == ["KILLED"]
    # the retry resumed from the killed trial's last checkpoint: its first logged epoch is 1
    retry_run = next(r for r in runs if r.data.tags.get("optuna.retry_of") == "1")
    assert [m.step for m in t.client.get_metric_history(retry_run.info.run_id, "val_loss")] == [1]


@pytest.mark.slow
def test_two_workers_share_one_journal_study(workspace, cache_dir):
    storage = f"journal:{workspace}/optuna.journal"
    cmd = _phase1_cmd(workspace, cache_dir, storage, n_trials=4)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workspace)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "database is locked" not in err
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    name = optuna.get_all_study_names(JournalStorage(JournalFileBackend(str(workspace / "optuna.journal"))))[0]
    study = optuna.load_study(study_name=name, storage=make_storage(storage, 1))
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 4 <= len(finished) <= 5  # MaxTrialsCallback may let one extra finish when both start at once
    t = connect("", "all-dtl-demo")
    trials = mlflow.search_runs([t.experiment_id], "tags.`dtl.role` = 'trial'", output_format="list")
    numbers = [r.data.tags["optuna.trial"] for r in trials]
    assert sorted(numbers) == sorted(str(t.number) for t in study.trials)  # each trial logged once
    studies = mlflow.search_runs([t.experiment_id], "tags.`dtl.role` = 'study'", output_format="list")
    assert len(studies) == 1


@pytest.mark.slow
def test_loss_monitor_minimises_everywhere(workspace, cache_dir):
    """monitor=val_loss: the study minimises, the best trial has the lowest loss, and its best.pt
    is the epoch with the lowest loss."""
    from dtl.train.weights import load_checkpoint

    cfg = config.load(["demo"], demo_overrides(cache_dir, workspace, **{"phase1.monitor": "val_loss",
                                                                        "phase1.n_trials": 3}))
    t = connect(cfg.tracking_uri, cfg.experiment)
    res = run_study(cfg, "phase1", "test_resnet", t)
    study = optuna.load_study(study_name=res.study_name, storage=cfg.tune.storage)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    values = [tr.value for tr in study.trials if tr.state == TrialState.COMPLETE]
    assert res.best_value == min(values)
    hist = t.client.get_metric_history(res.best_trial_run_id, "val_loss")
    ck = load_checkpoint(res.checkpoint)["meta"]["metrics"]
    assert ck["val_loss"] == pytest.approx(min(h.value for h in hist))
    assert t.client.get_run(res.run_id).data.tags["direction"] == "minimize"


@pytest.mark.parametrize("monitor", ["val_macro_f1", "val_loss"])
def test_pruner_waits_for_startup_trials_and_the_lr_warmup(monitor):
    """The median pruner judges nothing before 5 completed trials, nor inside the LR warm-up
    (here 2 epochs), whichever direction the monitor has."""
    from optuna.trial import create_trial

    from dtl.train.tune import make_pruner

    cfg = config.load(["demo"], [f"phase1.monitor={monitor}", "phase1.warmup_epochs=2", "tune.pruner_warmup_epochs=1"])
    sign = 1 if monitor == "val_macro_f1" else -1
    study = optuna.create_study(direction="maximize" if sign > 0 else "minimize", pruner=make_pruner(cfg, "phase1"))

    def good():
        return create_trial(value=sign * 0.9, intermediate_values={e: sign * 0.9 for e in range(4)})

    def bad_trial_prunes_at(epoch):
        tr = study.ask()
        tr.report(sign * 0.1, epoch)
        out = tr.should_prune()
        study.tell(tr, state=TrialState.PRUNED)
        return out

    for _ in range(4):
        study.add_trial(good())
    assert not bad_trial_prunes_at(3)  # 4 completed trials: still starting up
    study.add_trial(good())
    assert not bad_trial_prunes_at(1)  # epoch 1 is inside the 2-epoch LR warm-up
    assert bad_trial_prunes_at(2)


@pytest.mark.slow
def test_find_runs_pages_past_one_page(workspace):
    """Every matching run, in start order, however many pages MLflow splits them into."""
    t = connect(os.environ["MLFLOW_TRACKING_URI"], "paging")
    ids = [start_run(t, f"r{i}", {"dtl.role": "trial"}).id for i in range(5)]
    assert [r.info.run_id for r in find_runs(t, "tags.`dtl.role` = 'trial'", page_size=2)] == ids
    assert len(find_runs(t, "tags.`dtl.role` = 'trial'", max_results=3, page_size=2)) == 3


def _should_prune(study: optuna.Study, value: float, epoch: int) -> bool:
    tr = study.ask()
    tr.report(value, epoch)
    out = tr.should_prune()
    study.tell(tr, state=TrialState.PRUNED)
    return out


@pytest.mark.parametrize("monitor, worse, better", [("val_loss", 2.5, 1.5), ("val_macro_f1", 0.3, 0.7)])
def test_the_project_study_with_the_threshold_pruner_follows_the_monitor_direction(monitor, worse, better):
    """open_optuna_study as the trials get it: a loss monitor minimises and is pruned ABOVE the
    threshold, a score monitor maximises and is pruned below it; never inside the warm-up."""
    from dtl.train.tune import open_optuna_study

    threshold = 2.0 if monitor == "val_loss" else 0.5
    cfg = config.load(["demo"], [f"phase1.monitor={monitor}", "tune.pruner=threshold", f"tune.threshold={threshold}",
                                 "tune.pruner_warmup_epochs=2", "phase1.warmup_epochs=1"])
    study = open_optuna_study(cfg, "s", "phase1", optuna.storages.InMemoryStorage())
    want = "MINIMIZE" if monitor == "val_loss" else "MAXIMIZE"
    assert study.direction == getattr(optuna.study.StudyDirection, want)
    assert isinstance(study.pruner, optuna.pruners.ThresholdPruner)
    assert _should_prune(study, worse, 2) and not _should_prune(study, better, 2)
    assert not _should_prune(study, worse, 1)  # epoch 1 < tune.pruner_warmup_epochs = 2


def test_study_identity_changes_with_what_trials_depend_on_and_only_that():
    from dataclasses import replace

    from dtl.train.tune import study_identity, study_name

    cfg = config.load(["demo"])
    base = study_identity(cfg, "phase1", "digest", "imagenet")
    changed = {
        "seed": study_identity(replace(cfg, seed=cfg.seed + 1), "phase1", "digest", "imagenet"),
        "data": study_identity(cfg, "phase1", "other", "imagenet"),
        "init": study_identity(cfg, "phase1", "digest", "scratch"),
        "epochs": study_identity(config.with_phase(cfg, "phase1", epochs=cfg.phase1.epochs + 1), "phase1", "digest", "imagenet"),
        "image_size": study_identity(replace(cfg, image_size=cfg.image_size + 32), "phase1", "digest", "imagenet"),
        "deterministic": study_identity(replace(cfg, deterministic=not cfg.deterministic), "phase1", "digest", "imagenet"),
    }
    assert all(v != base for v in changed.values()), [k for k, v in changed.items() if v == base]
    same = [study_identity(config.with_phase(cfg, "phase1", n_trials=cfg.phase1.n_trials + 5), "phase1", "digest", "imagenet"),
            study_identity(config.with_phase(cfg, "phase1", data=replace(cfg.phase1.data, root="/elsewhere")),
                           "phase1", "digest", "imagenet")]
    assert same == [base, base]  # more trials extend the study; moved files are the same data
    assert study_name("phase1", "r50", "double", base, "exp") == f"exp.phase1.r50.{base[:10]}"
    assert study_name("phase2", "r50", "single", base, "exp") == f"exp.phase2.single.r50.{base[:10]}"


@pytest.mark.parametrize("recipe, phase, expected", [
    ("", "phase1", "e239b6b191632920d3bb6572afc0a1aecd3aba92bde3b915d5bfc0b2a4dbb850"),
    ("", "phase2", "a51edf89103725ce6c8b707cbb50c7868b123a874b5150502eff8bf6410d4db4"),
    ("demo", "phase1", "8a6e0ac3277327ff7f42318e94efe673539a64d7326d04431ef43a443d0ea865"),
    ("demo", "phase2", "4cb63e4b8120e419e3353bf8c9dcf1d5b4e50d23283c5a0606facb5efbf2da9d"),
])
def test_study_identities_are_those_the_landed_main_gave(recipe, phase, expected):
    """Golden hashes computed with commit a70bc07 (before augment.hed / augment.grey existed): a
    store made then reopens its studies. A change here orphans every study in every store."""
    from dtl import config
    from dtl.train.tune import study_identity

    cfg = config.load([recipe], []) if recipe else config.Config()
    assert study_identity(cfg, phase, "d" * 64, "scratch") == expected


def test_data_colour_at_raw_leaves_study_identities_as_they_were_and_another_colour_is_another_study():
    """``data.colour`` came after stores with study identities existed: at ``raw`` it is left
    out of the identity (the golden hashes above), any other value makes another study."""
    from dtl.config import to_dict
    from dtl.train.phases import training_config
    from dtl.train.tune import study_identity

    cfg = config.load(["demo"])
    d = to_dict(cfg)
    old = {**d, "phase2": {**d["phase2"], "data": {k: v for k, v in d["phase2"]["data"].items() if k != "colour"}}}
    assert training_config(d) == training_config(old)
    for phase in ("phase1", "phase2"):
        base = study_identity(cfg, phase, "d" * 64, "scratch")
        assert study_identity(config.load(["demo"], [f"{phase}.data.colour=raw"]), phase, "d" * 64, "scratch") == base
        for colour in ("greyscale", "reinhard"):
            other = config.load(["demo"], [f"{phase}.data.colour={colour}"])
            assert other.phase(phase).data.colour == colour
            assert study_identity(other, phase, "d" * 64, "scratch") != base


@pytest.mark.slow
def test_optuna_dashboard_reads_the_study_with_its_metric_name_and_mlflow_link(workspace, cache_dir):
    """docs/tuning.md: `optuna-dashboard sqlite:///optuna.db` shows each study under its metric
    name, with user attributes linking it to its MLflow run (read from the real dashboard's API)."""
    cfg = config.load(["demo"], demo_overrides(cache_dir, workspace, **{"phase1.n_trials": 1}))
    t = connect(cfg.tracking_uri, cfg.experiment)
    res = run_study(cfg, "phase1", "test_resnet", t)
    tags = t.client.get_run(res.run_id).data.tags
    port = free_port()
    exe = os.path.join(os.path.dirname(PYTHON), "optuna-dashboard")
    with subprocess.Popen([exe, cfg.tune.storage, "--host", "127.0.0.1", "--port", str(port)], cwd=workspace,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(f"{url}/api/studies", proc, timeout=60)
            studies = {s["study_name"]: s for s in requests.get(f"{url}/api/studies", timeout=10).json()["study_summaries"]}
            detail = requests.get(f"{url}/api/studies/{studies[res.study_name]['study_id']}", timeout=10).json()
        finally:
            proc.terminate()
    assert detail["objective_names"] == [tags["monitor"]] == ["val_macro_f1"]
    attrs = {a["key"]: a["value"] for a in detail["user_attrs"]}
    assert attrs["mlflow_run_id"] == res.run_id and attrs["backbone"] == "test_resnet" and attrs["phase"] == "phase1"
    assert attrs["strategy"] == tags["strategy"] and attrs["data_digest"] == tags["data_digest"]
    trial_attrs = {a["key"]: a["value"] for a in detail["trials"][0]["user_attrs"]}
    assert len(detail["trials"]) == 1 and trial_attrs["mlflow_run_id"] in {r.info.run_id for r in find_runs(t, "tags.`dtl.role` = 'trial'")}
