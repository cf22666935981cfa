"""The jobs behind the entry points: ``main`` (both phases, register, promote, report) and the
single-phase jobs. Each step is idempotent, so rerunning a killed command resumes it."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dtl import DTLError
from dtl.config import Config, flatten, with_phase
from dtl.data import store
from dtl.data.probe import ItemFeatures, held_out_baseline
from dtl.evaluation.metrics import Evaluation, point_metrics
from dtl.evaluation.stats import corrected_t_interval, mean_spread
from dtl.fuzzy.job import run_fuzzy
from dtl.model.mask import annotation_mask
from dtl.model.mask import mask_state as masked
from dtl.progress import summary_table
from dtl.report import results as report_mod
from dtl.tracking import promotion, schema
from dtl.tracking.access import check_write_access, denied_message
from dtl.tracking.adapter import (
    Run,
    Tracking,
    base_tags,
    command_line,
    command_run,
    connect,
    end_orphans,
    ended,
    find_runs,
    git_commit,
    log_dataset,
    log_evaluation,
    start_run,
)
from dtl.tracking.policy import load_policy
from dtl.tracking.registry import log_model, register
from dtl.tracking.resolve import phase1_source
from dtl.tracking.ui import prepare_experiment, view_url
from dtl.train import faults
from dtl.train.engine import resolve_device
from dtl.train.phases import add_split, dataset, evaluate_checkpoint, preprocessing_label, run_phase
from dtl.train.strategies import STRATEGIES, needs_phase1
from dtl.train.tune import StudyResult, check_fixed_values, run_study
from dtl.train.weights import check_backbone, check_imagenet


@dataclass
class PipelineResult:
    run_id: str
    studies: dict = field(default_factory=dict)  # (phase, strategy, backbone) -> StudyResult
    versions: dict = field(default_factory=dict)  # backbone -> registered version
    champion: str | None = None
    report_dir: str = ""
    ui_view: str = ""  # the experiment's comparison view, below the MLflow UI's root URL

    def text(self) -> str:
        """What ``dtl main`` prints: the results table, the versions and champion, the report's path."""
        lines = []
        if self.report_dir:
            lines.append(summary_table(pd.read_csv(Path(self.report_dir) / "results.csv")))
        lines.append(f"pipeline run {self.run_id}: registered {self.versions}, champion v{self.champion}")
        if self.report_dir:
            lines.append(f"report: {self.report_dir}/results.md")
        if self.ui_view:
            lines.append(f"MLflow UI (mlflow ui --host 127.0.0.1): http://127.0.0.1:5000/{self.ui_view}")
        return "\n".join(lines)


def _phases(cfg: Config) -> tuple[str, ...]:
    """The phases a ``main`` job of this recipe trains."""
    return ("phase1", "phase2") if needs_phase1(cfg.strategies) else ("phase2",)


def _check_inputs(cfg: Config, phases: tuple[str, ...], strategies: tuple[str, ...] = ()) -> None:
    """Fail before any training: unknown backbones, ImageNet weights unreachable offline,
    unreadable data, classes mismatches."""
    starts = {cfg.phase1.init} if "phase1" in phases else set()
    if "phase2" in phases:
        starts |= {STRATEGIES[s].init(cfg.phase2.init) for s in strategies or cfg.strategies
                   if not STRATEGIES[s].from_phase1}
    for b in cfg.backbones:
        check_backbone(b)
        if "imagenet" in starts:
            check_imagenet(b)
        for ph in phases:
            check_fixed_values(cfg, ph, b)
    for ph in phases:
        dataset(cfg, ph)


def open_root_run(tracking: Tracking, cfg: Config, job: str) -> Run:
    """The run that holds the studies: MLflow's own under ``mlflow run``, else a new one."""
    end_orphans(tracking)
    prepare_experiment(tracking)  # the UI opens on its runs; the comparison view
    if tracking.outer_run_id:
        run = Run(tracking, tracking.outer_run_id)
        # host and pids let a later invocation end this run KILLED when `mlflow run` is killed
        # (nobody else would: MLflow ends its run only when its own process survives)
        run.set_tags({**base_tags(), schema.LAUNCHER_PID: os.getppid(), schema.ROLE: schema.Role.PIPELINE, schema.JOB: job})
    else:
        run = start_run(tracking, f"{job}-{time.strftime('%Y%m%d-%H%M%S')}", {schema.ROLE: schema.Role.PIPELINE, schema.JOB: job})
    run.log_params({**flatten(cfg), "job": job})
    return run


def evaluate_study(cfg: Config, study: StudyResult, tracking: Tracking, model_id: str | None = None) -> dict:
    """Final evaluation of a study's best trial on val and test, logged once on the study run
    (and linked to the logged model ``model_id`` and each split's dataset when given)."""
    run = Run(tracking, study.run_id)
    tags = run.client.get_run(run.id).data.tags
    if tags.get(schema.EVALUATED_TRIAL) == str(study.best_trial):
        return run.client.get_run(run.id).data.metrics
    ev = evaluate_checkpoint(cfg, study.phase, study.checkpoint)
    log_evaluation(run, ev, model_id=model_id, data=(dataset(cfg, study.phase), study.phase))
    run.set_tags({schema.EVALUATED_TRIAL: study.best_trial})
    return ev.metrics


def latest_phase1_study(cfg: Config, tracking: Tracking, backbone: str) -> StudyResult:
    """The latest finished phase-1 study of ``backbone`` on the recipe's phase-1 data in this
    experiment, for ``phase2`` run on its defaults; a DTLError naming the command to make one."""
    ds1 = dataset(cfg, "phase1")
    flt = schema.study_query("phase1", ds1.digest, {schema.BACKBONE: backbone}, status="FINISHED")
    runs = [r for r in find_runs(tracking, flt) if r.data.tags.get(schema.CHECKPOINT_TRIAL)]
    if not runs:
        exp = tracking.client.get_experiment(tracking.experiment_id).name
        raise DTLError(f"phase 2 with double transfer needs a phase-1 result, and experiment {exp!r} holds no "
                       f"finished phase-1 study of {backbone} on the recipe's phase-1 data ({ds1.kind}, digest "
                       f"{ds1.digest[:12]}). Create one with `mlflow run . -e phase1 --experiment-name {exp} "
                       f"-P config={cfg.name} -P backbones={backbone}` (or `dtl phase1 --config {cfg.name}`), "
                       "or pass -P phase1=<study run id | models:/ URI | checkpoint file>.")
    r = max(runs, key=lambda r: (r.info.end_time or 0, r.info.start_time))
    t = r.data.tags
    return StudyResult(t.get(schema.STUDY, ""), r.info.run_id, "phase1", backbone, "", int(t[schema.BEST_TRIAL]),
                       float(r.data.metrics.get("best_value", float("nan"))),
                       {k[len(schema.BEST_PARAM_PREFIX):]: v for k, v in t.items() if k.startswith(schema.BEST_PARAM_PREFIX)},
                       Path(), t.get(schema.BEST_TRIAL_RUN_ID, ""))


def run_phase2_strategy(cfg: Config, tracking: Tracking, root: Run, backbone: str, strategy: str,
                        p1: StudyResult | None, p1_source: Path | None = None, p1_label: str = "") -> StudyResult:
    """The phase-2 study of one strategy (:mod:`dtl.strategies`): from the phase-1 result, or from
    the strategy's own init."""
    if STRATEGIES[strategy].from_phase1:
        src = p1.checkpoint if p1 else p1_source
        if src is None:
            raise DTLError(f"{strategy} transfer needs a phase-1 result: run phase 1 first or pass --phase1")
        label = p1_label or f"phase1:{p1.run_id}"
        return run_study(cfg, "phase2", backbone, tracking, root.id, strategy, init_from=src, init_label=label)
    init = STRATEGIES[strategy].init(cfg.phase2.init)
    cfg2 = with_phase(cfg, "phase2", init=init)
    return run_study(cfg2, "phase2", backbone, tracking, root.id, strategy, init_label=init)


def repeat_best(cfg: Config, study: StudyResult, tracking: Tracking) -> dict:
    """Retrain the study's best parameters with seeds ``seed+1 .. seed+repeats-1`` and evaluate each
    on test, so the table can show the spread across seeds beside the single run's bootstrap CI
    (which covers test-set sampling, not training randomness). Each repeat is a nested run
    (``dtl.role=repeat``), found again on rerun; only its metrics are kept, not its weights."""
    n = cfg.final.repeats
    run = Run(tracking, study.run_id)
    if n <= 1:
        return {}
    best_cfg = with_phase(cfg, study.phase, **study.best_params)
    done = {r.data.tags.get(schema.REPEAT_SEED): r for r in
            find_runs(tracking, schema.children(study.run_id, schema.Role.REPEAT, "FINISHED"))}
    values: dict[str, list] = {}
    base = run.client.get_run(study.run_id).data.metrics
    for k in REPEAT_METRICS:
        values[k] = [base.get(k)]
    for i in range(1, n):
        seed = cfg.seed + i
        r = done.get(str(seed))
        if r is None:
            metrics = _train_repeat(dataclasses.replace(best_cfg, seed=seed), study, tracking, seed)
        else:
            metrics = r.data.metrics
        for k in REPEAT_METRICS:
            values[k].append(metrics.get(k))
    summary = {}
    for k, vals in values.items():
        s = mean_spread(vals)
        summary.update({f"seeds_{k}_mean": s["mean"], f"seeds_{k}_std": s["std"], f"seeds_{k}_min": s["min"],
                        f"seeds_{k}_max": s["max"]})
    run.log_metrics({**summary, "seeds_n": n})
    return summary


REPEAT_METRICS = ("val_macro_f1", "test_accuracy", "test_macro_f1", "test_balanced_accuracy")


def _train_repeat(cfg: Config, study: StudyResult, tracking: Tracking, seed: int) -> dict:
    return _retrain(cfg, study, tracking, f"repeat-seed{seed}", {schema.ROLE: schema.Role.REPEAT, schema.REPEAT_SEED: seed})


def _retrain(cfg: Config, study: StudyResult, tracking: Tracking, name: str, tags: dict,
             log_inputs: bool = False) -> dict:
    """Train the study's best parameters once more under ``cfg`` (another seed, another fold) as a
    nested run of the study; evaluate val and test, keep the metrics and drop the weights."""
    workdir = Path(cfg.work_dir) / study.study_name / name
    rrun = start_run(tracking, name, {**tags, schema.PHASE: study.phase, schema.BACKBONE: study.backbone,
                                      schema.STRATEGY: study.strategy, schema.INIT: study.init_label}, parent=study.run_id)
    try:
        res = run_phase(cfg, study.phase, study.backbone, workdir, init_from=study.init_from,
                        init_label=study.init_label or None)
        ev = evaluate_checkpoint(cfg, study.phase, res.checkpoint, splits=("val", "test"))
        ds = dataset(cfg, study.phase)
        sizes = ds.manifest["split"].value_counts()
        rrun.log_metrics({**{k: v for k, v in ev.metrics.items() if "_ci_" not in k},
                          "n_train": int(sizes.get("train", 0)), "n_test": int(sizes.get("test", 0))})
        if log_inputs:  # the fold's manifest, as MLflow dataset inputs (train / val / test)
            for ctx in ("training", "validation", "test"):
                log_dataset(rrun, ds, ctx, f"{study.phase}-{name}")
    except BaseException:
        rrun.end("FAILED")
        raise
    rrun.end("FINISHED")
    shutil.rmtree(workdir, ignore_errors=True)
    return rrun.client.get_run(rrun.id).data.metrics


CV_METRICS = ("test_accuracy", "test_macro_f1", "test_balanced_accuracy", "val_macro_f1")


def cross_validate(cfg: Config, study: StudyResult, tracking: Tracking) -> dict:
    """K-fold grouped cross-validation of the study's best parameters (``final.cv`` folds x
    ``final.cv_repeats``): one nested ``fold`` run per fold, found again on rerun; on the study run
    the mean, sd and corrected resampled t interval (:func:`dtl.stats.corrected_t_interval`) of
    each metric, and ``cv/folds.json`` with the per-fold values that paired comparisons use. The
    folds depend on the data and ``split_seed`` only, so every model of the job shares them."""
    k, reps = cfg.final.cv, cfg.final.cv_repeats
    if k < 2 or study.phase != "phase2":
        return {}
    best_cfg = with_phase(cfg, study.phase, **study.best_params)
    done = {(r.data.tags.get(schema.CV_REPEAT), r.data.tags.get(schema.CV_FOLD)): r for r in
            find_runs(tracking, schema.children(study.run_id, schema.Role.FOLD, "FINISHED"))}
    folds = []
    for rep in range(reps):
        for f in range(k):
            r = done.get((str(rep), str(f)))
            if r is not None:
                metrics = r.data.metrics
            else:
                data = dataclasses.replace(best_cfg.phase(study.phase).data, cv_folds=k, cv_fold=f, cv_repeat=rep)
                metrics = _retrain(with_phase(best_cfg, study.phase, data=data), study, tracking,
                                   f"cv{rep}-fold{f}", {schema.ROLE: schema.Role.FOLD, schema.CV_FOLD: f, schema.CV_REPEAT: rep},
                                   log_inputs=True)
            folds.append({"repeat": rep, "fold": f, **{m: metrics.get(m) for m in (*CV_METRICS, "n_train", "n_test")}})
    summary = cv_summary(folds)
    run = Run(tracking, study.run_id)
    run.log_metrics({f"cv_{m}_{s}": v for m, st in summary.items() for s, v in st.items() if s != "n"})
    run.log_dict({"k": k, "repeats": reps, "split_seed": cfg.phase(study.phase).data.split_seed, "folds": folds},
                 "cv/folds.json")
    run.set_tags({schema.CV: f"{k}x{reps}", schema.CV_ID: cv_id(dataset(cfg, study.phase).digest, k, reps,
                                                              cfg.phase(study.phase).data.split_seed)})
    return summary


def cv_summary(folds: list[dict]) -> dict:
    """Per metric: mean, sd and the corrected resampled t interval over the folds."""
    n_train = float(np.mean([f["n_train"] for f in folds]))
    n_test = float(np.mean([f["n_test"] for f in folds]))
    return {m: corrected_t_interval([f[m] for f in folds], n_train, n_test) for m in CV_METRICS}


def cv_id(data_digest: str, k: int, repeats: int, split_seed: int) -> str:
    """Which folds a CV used: two studies with the same id were scored on the very same folds."""
    return hashlib.sha256(f"{data_digest}|{k}|{repeats}|{split_seed}".encode()).hexdigest()[:16]


BASELINE_VERSION = "2"  # part of a baseline run's key: a change of what is fitted refits stored baselines


def baseline_key(cfg: Config) -> dict:
    """What a baseline run is found again by: the phase-2 data, split, masking and the input
    preprocessing the models see (colour, HSV segmentation), and the baseline's own version."""
    ds = dataset(cfg, "phase2")
    return {schema.ROLE: schema.Role.BASELINE, schema.PHASE: "phase2", schema.DATA_DIGEST: ds.digest,
            schema.SPLIT_PROTOCOL: ds.protocol, schema.ANNOTATION_MASK: mask_state(cfg, "phase2"),
            schema.PREPROCESSING: preprocessing_label(cfg, "phase2", augment=False),
            schema.BASELINE_VERSION: BASELINE_VERSION}


def stored_baseline(cfg: Config, tracking: Tracking) -> str | None:
    """The run id of the finished baseline run of :func:`baseline_key` (the newest), or None."""
    done = find_runs(tracking, schema.where(baseline_key(cfg), status="FINISHED"))
    return done[-1].info.run_id if done else None


def run_baseline(cfg: Config, tracking: Tracking, parent: str) -> str | None:
    """The strongest shortcut baseline of the phase-2 data (:func:`dtl.data.probe.held_out_baseline`),
    scored on val and test like a model and logged as a top-level ``baseline`` run of pipeline run
    ``parent``; found again (not refitted) by :func:`baseline_key`. A baseline that cannot be fitted
    (e.g. too few groups per class for its folds) is skipped with a warning, never the job."""
    found = stored_baseline(cfg, tracking)
    if found:
        _cross_validate_or_warn(cfg, tracking, found)  # a baseline stored before final.cv was set, or other folds
        return found
    tags, ds, d = baseline_key(cfg), dataset(cfg, "phase2"), cfg.phase2.data
    try:
        b = held_out_baseline(ds, annotation_mask(d.mask_annotation, ds.kind, d.variant), cfg.cache_dir, d.colour,
                              cfg.seed, segment=d.hsv_segment)
    except ValueError as e:
        print(f"warning: no shortcut baseline for this data ({e}); the table has no baseline row", flush=True)
        return None
    ev = Evaluation()
    for split, probs in b.probs.items():
        add_split(ev, cfg, ds, split, probs, ds.label_ids(split))
    # a top-level row of the runs table, like the studies, linked to its pipeline run by a tag
    run = start_run(tracking, f"baseline-{b.name}-{b.model}", {
        **tags, schema.BACKBONE: report_mod.BASELINE_PREFIX + b.name, schema.STRATEGY: b.model, schema.PIPELINE_RUN: parent,
        schema.NOTE: f"Shortcut baseline ({b.name} statistics, {b.model}) of pipeline run [{parent}]"
                     f"(#/experiments/{tracking.experiment_id}/runs/{parent})"})
    with ended(run):
        log_evaluation(run, ev)
        run.log_dict({"chosen": {"name": b.name, "model": b.model}, "train_cv": b.train_cv}, "baseline/train_cv.json")
    _cross_validate_or_warn(cfg, tracking, run.id)
    return run.id


def _cross_validate_or_warn(cfg: Config, tracking: Tracking, run_id: str) -> None:
    try:
        cross_validate_baseline(cfg, tracking, run_id)
    except (ValueError, KeyError) as e:  # never the job: the model rows keep their bootstrap gap
        print(f"warning: the shortcut baseline was not refitted on the final.cv folds ({e!r}); model − baseline "
              "has no fold-level test", flush=True)


def cross_validate_baseline(cfg: Config, tracking: Tracking, run_id: str) -> None:
    """``final.cv`` for the baseline run ``run_id``: its chosen baseline refitted on the train part
    of each of the models' folds (the same folds: same ``cv_id``) and scored on the fold's val and
    test, into :func:`dtl.report.results.baseline_folds_path` (the per-fold values, as a study's ``cv/folds.json``), so
    the report pairs model − baseline fold by fold (corrected resampled t); the run's ``cv_*``
    metrics and ``dtl.cv_id`` tag are those of the latest folds. Done once per set of folds; cheap
    (no training)."""
    k, reps, d = cfg.final.cv, cfg.final.cv_repeats, cfg.phase2.data
    if k < 3:
        return
    full = dataset(cfg, "phase2")
    cid = cv_id(full.digest, k, reps, d.split_seed)
    if report_mod.baseline_folds_path(cid) in {a.path for a in tracking.client.list_artifacts(run_id, "cv")}:
        return
    run, tags = Run(tracking, run_id), tracking.client.get_run(run_id).data.tags
    name, model = tags[schema.BACKBONE].removeprefix(report_mod.BASELINE_PREFIX), tags[schema.STRATEGY]
    features = ItemFeatures.of(full, name, annotation_mask(d.mask_annotation, full.kind, d.variant), cfg.cache_dir,
                               d.colour, d.hsv_segment)  # once: each fold is a re-split of the same items
    folds = []
    for rep in range(reps):
        for f in range(k):
            fold = with_phase(cfg, "phase2", data=dataclasses.replace(d, cv_folds=k, cv_fold=f, cv_repeat=rep))
            ds = dataset(fold, "phase2")
            probs = features.probs(ds, model)
            scores = {f"{s}_{m}": v for s, p in probs.items() for m, v in point_metrics(ds.label_ids(s), p).items()}
            sizes = ds.manifest["split"].value_counts()
            folds.append({"repeat": rep, "fold": f, **{m: scores.get(m) for m in CV_METRICS},
                          "n_train": int(sizes.get("train", 0)), "n_test": int(sizes.get("test", 0))})
    summary = cv_summary(folds)
    run.log_metrics({f"cv_{m}_{s}": v for m, st in summary.items() for s, v in st.items() if s != "n"})
    run.set_tags({schema.CV: f"{k}x{reps}", schema.CV_ID: cid})
    run.log_dict({"k": k, "repeats": reps, "split_seed": d.split_seed, "cv_id": cid, "folds": folds},
                 report_mod.baseline_folds_path(cid))  # last: its presence says the folds are done


def baseline_tags(cfg: Config, tracking: Tracking, study_run: str) -> dict:
    """The version's gap to the shortcut baseline of its data and input (:func:`baseline_key`):
    test accuracy, model − baseline, paired bootstrap over the same items as the report's (same
    resamples), and whether it is flagged; {} without a baseline run or without a defined CI."""
    base = stored_baseline(cfg, tracking)
    ta = report_mod.test_predictions(study_run)
    tb = report_mod.test_predictions(base) if base else None
    if ta is None or tb is None:
        return {}
    g = report_mod.paired_gains([("model − baseline", {}, ta, tb)])
    acc = g[g["metric"] == "test_accuracy"].iloc[0]
    if acc["ci_low"] != acc["ci_low"]:
        return {}
    return {schema.BASELINE_RUN: base, schema.BASELINE_GAP: report_mod.gap_text(acc),
            schema.BASELINE_FLAG: str(report_mod.is_flagged(acc)).lower()}


def finish_phase2(cfg: Config, tracking: Tracking, study: StudyResult, register_it: bool,
                  pipeline_run: str) -> str | None:
    """Log the model, evaluate (metrics linked to the model) and optionally register it with lineage tags."""
    run = Run(tracking, study.run_id)
    uri = log_model(run, study.checkpoint, cfg.phase2.data.hsv_segment)  # first: the metrics link to it
    model_id = run.client.get_run(run.id).data.tags.get(schema.MODEL_ID)
    metrics = evaluate_study(cfg, study, tracking, model_id)
    repeat_best(cfg, study, tracking)
    cross_validate(cfg, study, tracking)
    faults.kill_point("registration")
    if not register_it:
        return None
    ds2 = dataset(cfg, "phase2")
    tags = {schema.BACKBONE: study.backbone, schema.STRATEGY: study.strategy, schema.PHASE2_RUN: study.run_id,
            schema.PHASE2_TRIAL: study.best_trial, schema.DATA_DIGEST: ds2.digest, schema.DATA_KIND: ds2.kind,
            schema.SPLIT_PROTOCOL: ds2.protocol, schema.DUPLICATES_REMOVED: ds2.duplicates_removed,
            schema.ANNOTATION_MASK: mask_state(cfg, "phase2"), schema.VERSION_PIPELINE_RUN: pipeline_run,
            schema.PREPROCESSING: preprocessing_label(cfg, "phase2"),
            schema.VERSION_STUDY: study.study_name}
    tags.update(phase1_lineage(run))
    tags.update(baseline_tags(cfg, tracking, study.run_id))
    for k in ("val_macro_f1", "val_accuracy", "val_balanced_accuracy", "test_accuracy", "test_macro_f1",
              "test_balanced_accuracy"):
        if k in metrics:
            tags[schema.METRIC_PREFIX + k] = round(float(metrics[k]), 6)
    return register(tracking, cfg.registered_model, uri, study.run_id, tags)


def phase1_lineage(study_run: Run) -> dict:
    """Lineage of the weights a phase-2 study actually started from, read from the study run itself
    (its ``init`` tag, written when the study was created), never from the job at hand."""
    tags = study_run.client.get_run(study_run.id).data.tags
    init = tags.get(schema.INIT, "")
    out = {schema.INIT_DIGEST: tags.get(schema.INIT_DIGEST, "")}
    if not init.startswith("phase1:"):
        return out
    source = init[len("phase1:"):]
    out[schema.PHASE1_SOURCE] = source
    try:
        p1 = study_run.client.get_run(source).data.tags
    except Exception:  # noqa: BLE001 - a models:/ URI or a file: no phase-1 run to read
        return out
    return {**out, schema.PHASE1_RUN: source, schema.PHASE1_TRIAL: p1.get(schema.BEST_TRIAL, ""),
            schema.PHASE1_DATA_DIGEST: p1.get(schema.DATA_DIGEST, ""), schema.PHASE1_DATA_KIND: p1.get(schema.DATA_KIND, ""),
            schema.PHASE1_SPLIT_PROTOCOL: p1.get(schema.SPLIT_PROTOCOL, ""), schema.PHASE1_INIT: p1.get(schema.INIT, "")}


def main(cfg: Config, report: bool = True, promote: bool = True) -> PipelineResult:
    """For each backbone: tune phase 1, tune phase 2 from it (and the other strategies asked
    for), evaluate on test once, log and register the model; then promote and report."""
    with store.scope() as data:  # the job's data, its split tensors released per backbone
        return _main(cfg, data, report, promote)


def _main(cfg: Config, data: store.DataStore, report: bool, promote: bool) -> PipelineResult:
    tracking = connect(cfg.tracking_uri, cfg.experiment)
    check_write_access(tracking, cfg.registered_model if cfg.register_strategy in cfg.strategies else "")
    _check_inputs(cfg, _phases(cfg))
    if cfg.register_strategy not in cfg.strategies:
        print(f"note: no model is registered: register_strategy={cfg.register_strategy} is not among the "
              f"strategies {list(cfg.strategies)} (set -o register_strategy=...)", flush=True)
    t_start = time.time()
    with root_run(tracking, cfg, "main") as root:
        result = PipelineResult(root.id, ui_view=view_url(tracking))
        run_baseline(cfg, tracking, root.id)  # first: each registered version is compared with it
        for backbone in cfg.backbones:
            data.release()  # the previous backbone's split tensors (its input size, on its device)
            p1 = None
            if needs_phase1(cfg.strategies):
                p1 = run_study(cfg, "phase1", backbone, tracking, root.id)
                result.studies[("phase1", "", backbone)] = p1
                evaluate_study(cfg, p1, tracking)
                faults.kill_point("between_phases")
            for strategy in cfg.strategies:
                s = run_phase2_strategy(cfg, tracking, root, backbone, strategy, p1)
                result.studies[("phase2", strategy, backbone)] = s
                v = finish_phase2(cfg, tracking, s, register_it=strategy == cfg.register_strategy,
                                  pipeline_run=root.id)
                if v:
                    result.versions[backbone] = v
                if strategy == "double" and cfg.fuzzy.enabled:  # the fuzzy head on this phase-2 model

                    run_fuzzy(cfg, tracking, s.run_id)
        if promote and result.versions:
            policy = load_policy(cfg.policy, cfg.registered_model)
            d = promotion.promote(tracking, policy, promotion_filter(cfg), cards_dir=Path(cfg.cards_dir))
            result.champion = d.champion
            root.set_tags({schema.CHAMPION: d.champion, schema.PROMOTION: d.reason})
        if report:
            faults.kill_point("report")
            out = report_mod.build(tracking, cfg.report_dir, cfg.registered_model,
                                   data_digest=dataset(cfg, "phase2").digest,
                                   provenance=_provenance(cfg, tracking, time.time() - t_start, root.id),
                                   description=cfg.description)
            for f in ("results.md", "results.csv", "report.html", "provenance.json"):
                root.log_artifact(out / f, "report")
            result.report_dir = str(out)
    return result


def _provenance(cfg: Config, tracking: Tracking, wall: float, run_id: str) -> dict:
    dev = resolve_device(cfg.device)
    phases = _phases(cfg)
    return {
        "command": command_line(), "git_commit": git_commit(), "pipeline_run": run_id,
        "recipe": cfg.name, "backbones": list(cfg.backbones), "strategies": list(cfg.strategies),
        "init": {"phase1": cfg.phase1.init, "phase2_single": cfg.phase2.init},
        "data": {ph: {"kind": dataset(cfg, ph).kind, "root": cfg.phase(ph).data.root or "(demo, generated)",
                      "digest": dataset(cfg, ph).digest, "split_protocol": dataset(cfg, ph).protocol,
                      "duplicates_removed": dataset(cfg, ph).duplicates_removed,
                      "annotation_mask": mask_state(cfg, ph),
                      "splits": dataset(cfg, ph).audit()["splits"]} for ph in phases},
        "image_size": cfg.image_size or "timm default", "trials": {ph: cfg.phase(ph).n_trials for ph in phases},
        "epochs": {ph: cfg.phase(ph).epochs for ph in phases},
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "precision": cfg.precision, "torch": torch.__version__, "wall_time_s": round(wall, 1),
    }


@contextlib.contextmanager
def root_run(tracking: Tracking, cfg: Config, job: str):
    """The job's root run, ended FINISHED, FAILED (with the reason) or KILLED; under
    ``mlflow run`` MLflow ends its own run."""
    with ended(open_root_run(tracking, cfg, job), end=not tracking.outer_run_id) as root:
        yield root


def evaluate_job(cfg: Config, phase: str, checkpoint: str, study_run: str, splits: tuple[str, ...]):
    """``dtl evaluate``: a checkpoint file or a study run's best checkpoint on ``splits``, logged
    as one ``evaluate`` run. Returns the evaluation and the run id."""
    if not checkpoint and not study_run:
        raise DTLError("evaluate needs --checkpoint FILE or --run <study run id>")
    tracking = connect(cfg.tracking_uri, cfg.experiment)  # a refused login or write: before the evaluation
    check_write_access(tracking, stops="Nothing was evaluated.")
    ckpt = Path(checkpoint) if checkpoint else phase1_source(study_run, cfg)
    ev = evaluate_checkpoint(cfg, phase, ckpt, splits)
    tags = {schema.ROLE: schema.Role.EVALUATE, schema.PHASE: phase, schema.CHECKPOINT_FILE: str(ckpt)}
    with command_run(tracking, f"evaluate-{phase}", tags) as run:
        log_evaluation(run, ev)
    return ev, run.id


def report_job(cfg: Config, out: str, data_digest: str | None) -> Path:
    """``dtl report``: the results table from the store, its files logged on one ``report`` run."""
    tracking = connect(cfg.tracking_uri, cfg.experiment)
    prov = {**report_mod.last_provenance(tracking), "report_command": command_line()}
    path = report_mod.build(tracking, out or cfg.report_dir, cfg.registered_model, data_digest,
                            provenance=prov, description=cfg.description)
    try:
        with command_run(tracking, "report", {schema.ROLE: schema.Role.REPORT}) as run:
            for f in ("results.md", "results.csv", "seed_table.csv", "report.html", "provenance.json"):
                run.log_artifact(path / f, "report")
    except Exception as e:
        denied = denied_message(e, tracking.uri)
        if not denied:
            raise
        print(f"note: the report is not logged to MLflow: {denied}", file=sys.stderr)  # a reader still gets the files
    return path


def single_phase(cfg: Config, phase: str, source: str = "", strategy: str = "double") -> dict:
    """``phase1`` or ``phase2`` alone (phase 2 from ``source`` when double transfer)."""
    tracking = connect(cfg.tracking_uri, cfg.experiment)
    check_write_access(tracking, cfg.registered_model if phase == "phase2" and strategy == cfg.register_strategy else "")
    with store.scope() as data:
        _check_inputs(cfg, (phase,), (strategy,))
        return _single_phase(cfg, tracking, data, phase, source, strategy)


def _single_phase(cfg: Config, tracking: Tracking, data: store.DataStore, phase: str, source: str,
                  strategy: str) -> dict:
    out = {}
    with root_run(tracking, cfg, phase) as root:
        for backbone in cfg.backbones:
            data.release()  # the previous backbone's split tensors
            if phase == "phase1":
                s = run_study(cfg, "phase1", backbone, tracking, root.id)
                evaluate_study(cfg, s, tracking)
            else:
                p1, src_id = None, source
                if STRATEGIES[strategy].from_phase1 and not source:  # the defaults: this experiment's latest phase 1
                    p1 = latest_phase1_study(cfg, tracking, backbone)
                    src_id = p1.run_id
                    root.set_tags({schema.phase1_source_key(backbone): p1.run_id})
                    print(f"phase 2 {backbone}: double transfer from phase-1 study run {p1.run_id} "
                          f"({p1.study_name}, best trial {p1.best_trial}, {p1.best_value:.4f})", flush=True)
                src = phase1_source(src_id, cfg) if STRATEGIES[strategy].from_phase1 else None
                s = run_phase2_strategy(cfg, tracking, root, backbone, strategy, None, src, f"phase1:{src_id}")
                if strategy != cfg.register_strategy:
                    print(f"note: the {strategy} model is not registered (register_strategy={cfg.register_strategy}; "
                          f"-o register_strategy={strategy} registers it)", flush=True)
                finish_phase2(cfg, tracking, s, register_it=strategy == cfg.register_strategy, pipeline_run=root.id)
            out[backbone] = s
    return out


def promotion_filter(cfg: Config) -> dict:
    """The registered versions that compete by default: trained on the recipe's phase-2 data (digest),
    split the same way and with the same annotation masking."""
    ds2 = dataset(cfg, "phase2")
    return {schema.DATA_DIGEST: ds2.digest, schema.SPLIT_PROTOCOL: ds2.protocol,
            schema.ANNOTATION_MASK: mask_state(cfg, "phase2")}


def mask_state(cfg: Config, phase: str) -> str:
    """``on`` or ``off``: whether the phase's images have their annotation stamp masked."""
    d = cfg.phase(phase).data
    return masked(d.mask_annotation, dataset(cfg, phase).kind, d.variant)


def studies_text(phase: str, studies: dict) -> str:
    """What ``dtl phase1`` / ``phase2`` / ``tune`` print: one line per backbone's study."""
    return "\n".join(f"{phase} {b}: study {s.study_name} run {s.run_id} best trial {s.best_trial} "
                     f"value {s.best_value:.4f} ({s.counts})" for b, s in studies.items())


def promote_job(cfg: Config, policy_path: str = "", model: str = "", data_digest: str = "", any_data: bool = False,
                force: bool = False) -> tuple[promotion.Decision, str]:
    """``dtl promote``: move the aliases by policy among the versions trained on the recipe's phase-2
    data, split protocol and masking (or on ``data_digest``, or on any data). Returns the decision
    and a line saying which versions competed."""
    policy = load_policy(policy_path or cfg.policy, model or cfg.registered_model)
    tracking = connect(cfg.tracking_uri, cfg.experiment)
    check_write_access(tracking, policy.registered_model, "No alias was moved.")
    note = ""
    if any_data:
        flt = None
    elif data_digest:
        flt = {schema.DATA_DIGEST: data_digest}
    else:
        flt = promotion_filter(cfg)
        note = (f"candidates: versions trained on {cfg.phase2.data.kind} data digest {flt[schema.DATA_DIGEST][:12]} "
                f"({flt[schema.SPLIT_PROTOCOL]} split, annotation mask {flt[schema.ANNOTATION_MASK]}); "
                "--data-digest D or --any-data to choose otherwise")
    return promotion.promote(tracking, policy, flt, force=force, cards_dir=Path(cfg.cards_dir)), note
