"""One Optuna study per (experiment, phase, strategy, backbone, data digest).

A trial maps Optuna's suggestions to config overrides and calls the same ``run_phase``. The
study is an MLflow parent run; each trial a nested run with per-epoch curves and a state tag.
Storage is persistent (``load_if_exists``), so rerunning a command resumes: finished trials
are kept, the study continues to ``n_trials`` in total, and trials killed mid-way are found
by Optuna's heartbeat, marked failed and retried (from their last checkpoint).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import socket
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback as RetryCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from dtl import DTLError
from dtl.config import Config, flatten, read_search_space, to_dict, with_phase
from dtl.evaluation.metrics import direction
from dtl.model.mask import mask_state
from dtl.model.net import DTLNet, ModelSpec
from dtl.progress import StudyProgress
from dtl.tracking import schema
from dtl.tracking.adapter import (
    Run,
    Tracking,
    end_orphans,
    find_run,
    log_data,
    pid_alive,
    reachable,
    redact,
    start_run,
    system_metrics,
)
from dtl.train import distributed, faults
from dtl.train.engine import NonFiniteLoss
from dtl.train.phases import dataset, init_digest, preprocessing_label, run_phase, training_config
from dtl.train.weights import preprocessing_note, resolve_input_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)
DEFAULT_STORAGE = "sqlite:///optuna.db"


@dataclass
class StudyResult:
    study_name: str
    run_id: str  # the study's MLflow parent run
    phase: str
    backbone: str
    strategy: str
    best_trial: int
    best_value: float
    best_params: dict
    checkpoint: Path
    best_trial_run_id: str
    counts: dict = field(default_factory=dict)
    init_from: Path | None = None  # the weights file the trials started from (double transfer)
    init_label: str = ""


def load_search_space(cfg: Config, phase: str) -> dict:
    """The phase's search space: the file's block, limited to ``phaseN.search`` when it is set,
    minus the keys ``phaseN.pinned`` holds at their config value."""
    path, space = read_search_space(cfg)
    block = space.get(phase, {}) or {}
    pc = cfg.phase(phase)
    if pc.search:
        unknown = sorted(set(pc.search) - set(block))
        if unknown:
            raise DTLError(f"{phase}.search names {unknown}, not in {path} (valid: {sorted(block)})")
        block = {k: v for k, v in block.items() if k in pc.search}
    valid = {f.name for f in dataclasses.fields(pc)}
    bad = sorted(set(block) - valid)
    if bad:
        raise DTLError(f"{path}: {phase} keys {bad} are not phase settings (valid: {sorted(valid)})")
    return {k: v for k, v in block.items() if k not in pc.pinned}


def check_fixed_values(cfg: Config, phase: str, backbone: str) -> None:
    """The values the trials use as they are (pinned, or not in the search space) checked against
    the backbone before any training: an ``unfreeze`` beyond its stage groups is a DTLError here,
    not a failed trial after phase 1 has trained."""
    if "unfreeze" not in load_search_space(cfg, phase):
        try:
            DTLNet(ModelSpec(backbone, ("a", "b"))).set_unfreeze(cfg.phase(phase).unfreeze)
        except DTLError as e:
            raise DTLError(f"{phase}.{e}") from None


def startup_trials(cfg: Config, phase: str) -> int:
    """TPE's random start-up draws: the recipe's ``tune.startup_trials``, or (-1) a third of the
    phase's budget and at least 2, so most of a budget is spent on proposals, not on dice."""
    n = cfg.tune.startup_trials
    return n if n >= 0 else max(2, cfg.phase(phase).n_trials // 3)


def suggest(trial: optuna.Trial, space: dict, n_stages: int) -> dict:
    """Optuna suggestions -> config overrides. ``unfreeze`` high=-1 means all stages."""
    out = {}
    for name, s in space.items():
        kind = s.get("type", "float")
        if kind == "float":
            out[name] = trial.suggest_float(name, float(s["low"]), float(s["high"]), log=bool(s.get("log")))
        elif kind == "int":
            high = n_stages if int(s["high"]) < 0 else int(s["high"])
            out[name] = trial.suggest_int(name, int(s["low"]), max(int(s["low"]), high))
        elif kind == "categorical":
            out[name] = trial.suggest_categorical(name, list(s["choices"]))
        else:
            raise DTLError(f"search space {name}: type must be float, int or categorical, not {kind!r}")
    return out


def make_storage(url: str, heartbeat_s: int):
    """An Optuna storage from a URL: ``sqlite:///...``, ``postgresql://...`` (RDB, with
    heartbeats) or ``journal:PATH`` (a journal file shared by processes on one machine)."""
    try:
        if url.startswith("journal:"):
            path = url[len("journal:"):].removeprefix("//")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(path))
        if "://" not in url:
            raise ValueError("no scheme")
        reachable(url, "Optuna storage")  # a driver would retry a dead host for minutes
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        for attempt in range(5):  # workers starting together race to create the tables: the loser retries
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s,
                                                  grace_period=3 * heartbeat_s,
                                                  heartbeat_stale_trial_callback=RetryCallback(max_retry=2))
            except Exception as e:
                if attempt == 4 or not any(w in str(e).lower() for w in ("already exists", "duplicate", "locked")):
                    raise
                time.sleep(0.5 + attempt)
    except DTLError:
        raise
    except Exception as e:
        raise DTLError(f"Optuna storage {redact(url)!r} is not usable ({type(e).__name__}: {redact(str(e))[:200]}). "
                       "Valid forms: sqlite:///optuna.db, postgresql://user:pass@127.0.0.1/db, "
                       "journal:./optuna.journal") from None


def make_pruner(cfg: Config, phase: str):
    """The configured pruner. It never judges a trial inside the LR warm-up (the metric there says
    little about the learning rate), and the median pruner waits for ``pruner_startup_trials``
    completed trials, so early trials are not pruned against one lucky start."""
    t, pc = cfg.tune, cfg.phase(phase)
    warmup = max(t.pruner_warmup_epochs, pc.warmup_epochs)
    if t.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=t.pruner_startup_trials, n_warmup_steps=warmup)
    if t.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min(warmup + 1, pc.epochs), max_resource=pc.epochs)
    if t.pruner == "threshold":
        bound = {"lower" if direction(pc.monitor) == "maximize" else "upper": t.threshold}
        return optuna.pruners.ThresholdPruner(**bound, n_warmup_steps=warmup)
    return optuna.pruners.NopPruner()


def study_identity(cfg: Config, phase: str, data_digest: str, init: str) -> str:
    """Hash of what a study's trials compute from: the data (manifest digest, so the split too), what
    training starts from (:func:`dtl.phases.init_digest`: the hash of the weights, never of the file
    that holds them) and the training settings of the phase (:func:`dtl.phases.training_config`: no
    paths, no budget, no measured figures). A study is reopened only when all of them are the same;
    n_trials may grow without a new study. Keys pinned on the command line are part of it."""
    training = training_config(to_dict(cfg))
    ident = {"data": data_digest, "init": init, "phase": training[phase], "seed": cfg.seed, "image_size": cfg.image_size,
             "augment": training["augment"], "deterministic": cfg.deterministic}
    if training["augment"].get("hed", 0.0) > 0:  # studies from when the HED shift was 13.8x too strong: not reopened
        ident["hed_shift"] = "optical-density"
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def study_name(phase: str, backbone: str, strategy: str, identity: str, experiment: str) -> str:
    parts = [experiment, phase] + ([strategy] if phase == "phase2" else []) + [backbone, identity[:10]]
    return ".".join(parts)


def create_or_load(name: str, storage, direction: str, sampler_seed: int, what: str, **sampler_kw) -> optuna.Study:
    """Create or reopen an Optuna study (phase, fuzzy) with a TPE sampler seeded per study name:
    reproducible, yet backbones do not all start from the same draws. ``sampler_kw`` go to the
    sampler, ``pruner`` to the study; ``what`` names the objective in the direction error."""
    pruner = sampler_kw.pop("pruner", None)
    sampler = optuna.samplers.TPESampler(seed=sampler_seed + zlib.crc32(name.encode()) % 10**6, **sampler_kw)
    try:
        return optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction=direction,
                                   sampler=sampler, pruner=pruner)
    except ValueError as e:  # an existing study with the other direction
        raise DTLError(f"Optuna study {name} exists with another direction than {direction} ({what}): {e}") from None


def open_optuna_study(cfg: Config, name: str, phase: str, storage) -> optuna.Study:
    """Create or reopen a phase study; its direction follows the monitored metric."""
    return create_or_load(name, storage, direction(cfg.phase(phase).monitor), cfg.tune.sampler_seed,
                          cfg.phase(phase).monitor, n_startup_trials=startup_trials(cfg, phase),
                          pruner=make_pruner(cfg, phase))


# A trial that fails with one of these is recorded FAIL and the study goes on with the next.
TRIAL_ERRORS = (NonFiniteLoss, torch.cuda.OutOfMemoryError, DTLError)


@dataclass
class Study:
    """An opened study: the Optuna study, its MLflow parent run and what its trials share."""

    name: str
    optuna: optuna.Study
    run: Run
    tags: dict  # the study run's tags; trial runs start from them
    cfg: Config
    phase: str
    backbone: str
    strategy: str
    init_from: Path | None
    init_label: str
    workroot: Path  # trial-<n>/ folders with their checkpoints
    storage: object = None  # the Optuna storage (RDB storages have heartbeats)


def open_study(cfg: Config, phase: str, backbone: str, tracking: Tracking, parent_run: str | None = None,
               strategy: str = "double", init_from: Path | None = None, init_label: str | None = None) -> Study:
    """Create or reopen the study of (phase, backbone, strategy, identity) and its MLflow run;
    trials of a previous process that died are failed (and retried), their runs ended."""
    pc = cfg.phase(phase)
    ds = dataset(cfg, phase)
    start = init_digest(init_from if init_from else pc.init)
    identity = study_identity(cfg, phase, ds.digest, start)
    name = study_name(phase, backbone, strategy, identity, cfg.experiment)
    storage_url = cfg.tune.storage or DEFAULT_STORAGE
    storage = make_storage(storage_url, cfg.tune.heartbeat_s)
    study = open_optuna_study(cfg, name, phase, storage)
    if isinstance(storage, optuna.storages.RDBStorage):  # heartbeats: RDB storages only
        optuna.storages.fail_stale_trials(study)
    _fail_dead_trials(study, tracking)
    init = init_label or pc.init
    ispec = resolve_input_spec(backbone, cfg.image_size)
    note = preprocessing_note(backbone, init, ispec)
    if note:
        print(note, flush=True)
    tags = {schema.ROLE: schema.Role.STUDY, schema.STUDY: name, schema.PHASE: phase, schema.BACKBONE: backbone,
            schema.STRATEGY: strategy, schema.INIT: init, schema.INIT_DIGEST: start, schema.STUDY_IDENTITY: identity,
            schema.MONITOR: pc.monitor, schema.DIRECTION: direction(pc.monitor), schema.DATA_DIGEST: ds.digest,
            schema.DATA_KIND: ds.kind, schema.SPLIT_PROTOCOL: ds.protocol,
            schema.ANNOTATION_MASK: mask_state(pc.data.mask_annotation, ds.kind, pc.data.variant),
            schema.PREPROCESSING: preprocessing_label(cfg, phase),
            schema.PRETRAINED_TAG: ispec.pretrained, schema.INPUT_PREPROCESSING: ispec.describe(),
            schema.PRECISION: cfg.precision, schema.OPTUNA_STORAGE: redact(storage_url),
            schema.PINNED: ",".join(f"{k}={getattr(pc, k)}" for k in pc.pinned) or "-"}
    run = _study_run(cfg, tracking, tags, ds, parent_run)
    link_study(study, run.id, tags)
    alive = {t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    end_orphans(tracking, parent=run.id, alive=alive)
    return Study(name, study, run, tags, cfg, phase, backbone, strategy, init_from, init,
                 Path(cfg.work_dir) / name, storage)


def link_study(study: optuna.Study, run_id: str, tags: dict) -> None:
    """Name the study's objective (``optuna-dashboard`` shows it) and link the study to its MLflow
    run through user attributes: run id, backbone, phase, strategy, data digest, split protocol."""
    if study.metric_names != [tags[schema.MONITOR]]:
        study.set_metric_names([tags[schema.MONITOR]])
    want = {"mlflow_run_id": run_id, **{k: tags[k] for k in (schema.PHASE, schema.BACKBONE, schema.STRATEGY, schema.DATA_DIGEST,
                                                              schema.SPLIT_PROTOCOL, schema.INIT)}}
    for k, v in want.items():
        if study.user_attrs.get(k) != v:
            study.set_user_attr(k, v)


def trial_dir(workroot: Path, trial: optuna.trial.FrozenTrial) -> Path:
    """A trial's folder. A retry of a killed trial continues in the killed trial's folder, from its last.pt."""
    origin = RetryCallback.retried_trial_number(trial)
    return workroot / f"trial-{origin if origin is not None else trial.number}"


class Objective:
    """One trial, as in Optuna's examples: suggest, train (``run_phase``), report each epoch, prune.
    Each trial is a nested MLflow run under the study's run, tagged with its Optuna state."""

    def __init__(self, study: Study, tracking: Tracking, bar: StudyProgress):
        self.s, self.tracking, self.bar = study, tracking, bar
        self.space = load_search_space(study.cfg, study.phase)
        self.n_stages = _n_stages(study.backbone)
        self.monitor = study.cfg.phase(study.phase).monitor

    def __call__(self, trial: optuna.Trial) -> float:
        s = self.s
        overrides = suggest(trial, self.space, self.n_stages)
        tcfg = with_phase(s.cfg, s.phase, **overrides)
        frozen = _frozen(trial.study, trial.number)
        trun = start_run(self.tracking, f"trial-{trial.number}",
                         {**s.tags, schema.ROLE: schema.Role.TRIAL, schema.OPTUNA_TRIAL: trial.number, schema.OPTUNA_STATE: "RUNNING",
                          schema.OPTUNA_RETRY_OF: RetryCallback.retried_trial_number(frozen),
                          schema.WORLD_SIZE: distributed.world_size()}, parent=s.run.id)
        trial.set_user_attr("mlflow_run_id", trun.id)
        trun.log_params({**flatten(tcfg), **{f"trial.{k}": v for k, v in overrides.items()}})
        try:
            faults.kill_point(f"{s.phase}:trial{trial.number}:start")
            faults.oom_point(f"{s.phase}:trial{trial.number}")
            res = run_phase(tcfg, s.phase, s.backbone, trial_dir(s.workroot, frozen), init_from=s.init_from,
                            report=lambda epoch, row: self._report(trial, trun, epoch, row), init_label=s.init_label)
        except optuna.TrialPruned:
            _quietly(trun.end, "FINISHED")
            raise
        except BaseException as e:
            # the tracking server may be what failed: record what we can, never mask the cause
            if isinstance(e, TRIAL_ERRORS):
                _free_memory()
            _quietly(trun.set_tags, {schema.OPTUNA_STATE: "FAIL", schema.FAIL_REASON: f"{type(e).__name__}: {str(e)[:500]}"})
            _quietly(trun.end, "FAILED" if isinstance(e, Exception) else "KILLED")
            raise
        trial.set_user_attr("checkpoint", str(res.checkpoint))
        trial.set_user_attr("best_epoch", res.best_epoch)
        trun.set_tags({schema.OPTUNA_STATE: "COMPLETE", schema.PRECISION: res.precision, schema.DEVICE: res.device,
                       schema.SKIPPED_STEPS: res.skipped_steps})
        trun.log_metrics({f"best_{self.monitor}": res.best_value, "best_epoch": res.best_epoch})
        trun.end("FINISHED")
        return res.best_value

    def _report(self, trial: optuna.Trial, trun: Run, epoch: int, row: dict) -> None:
        trun.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        self.bar.epoch(trial.number, epoch)
        faults.kill_point(f"{self.s.phase}:trial{trial.number}:epoch{epoch}")
        trial.report(row[self.monitor], epoch)
        if trial.should_prune():
            trun.set_tags({schema.OPTUNA_STATE: "PRUNED", schema.OPTUNA_PRUNED_EPOCH: epoch})
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")


def keep_best_only(study: optuna.Study, workroot: Path) -> None:
    """Delete the checkpoints of finished trials that are not the best (running ones stay)."""
    try:
        best = study.best_trial.number
    except ValueError:
        best = None
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.number != best:
            shutil.rmtree(trial_dir(workroot, t), ignore_errors=True)


def run_study(cfg: Config, phase: str, backbone: str, tracking: Tracking, parent_run: str | None = None,
              strategy: str = "double", init_from: Path | None = None, init_label: str | None = None) -> StudyResult:
    """Tune one (phase, backbone, strategy) to ``n_trials`` completed trials; returns the best
    trial and its checkpoint. A rerun reopens the study and continues it."""
    s = open_study(cfg, phase, backbone, tracking, parent_run, strategy, init_from, init_label)
    pc = cfg.phase(phase)
    n_complete = len(s.optuna.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    bar = StudyProgress(f"{phase} {strategy} {backbone}" if phase == "phase2" else f"{phase} {backbone}",
                        pc.n_trials, n_complete, pc.epochs)
    monitor, t0 = system_metrics(s.run.id), time.time()
    try:
        _optimize(s, Objective(s, tracking, bar), bar, tracking)
        keep_best_only(s.optuna, s.workroot)
        result = summarise(s, time.time() - t0)
    except BaseException as e:
        _quietly(s.run.set_tags, {schema.FAIL_REASON: f"{type(e).__name__}: {str(e)[:400]}"})
        _quietly(s.run.end, "FAILED" if isinstance(e, Exception) else "KILLED")
        raise
    finally:
        monitor.finish()
        bar.close()
    s.run.end("FINISHED")
    return result


def budget_left(study: optuna.Study, n_trials: int, cap: int) -> tuple[bool, int]:
    """(whether this worker may start a trial now, trials other workers are running). ``n_trials``
    counts COMPLETE trials; a RUNNING trial counts as one that will complete, so N workers on one
    study do not all start the last trial (Optuna's MaxTrialsCallback counts finished states only
    and lets N workers overshoot by N - 1). A WAITING trial (the retry of a dead one) is always
    taken; ``cap`` bounds trials of any state (a study whose trials all prune or fail ends)."""
    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    if complete >= n_trials or len(trials) >= cap:
        return False, 0
    return waiting or complete + running < n_trials, running


def _optimize(s: Study, objective: Objective, bar: StudyProgress, tracking: Tracking) -> None:
    """Run trials one at a time until the study holds ``n_trials`` COMPLETE trials (or ``cap``
    trials of any state), counting the trials other workers are running before each start.
    A worker with nothing to start waits for those trials: one of them may prune or fail and
    leave a trial to run, and every worker then summarises the same, finished study."""
    pc = s.cfg.phase(s.phase)
    cap = s.cfg.tune.max_trials or 3 * pc.n_trials
    while True:
        start, running = budget_left(s.optuna, pc.n_trials, cap)
        if start:
            s.optuna.optimize(objective, n_trials=1, catch=TRIAL_ERRORS, gc_after_trial=True,
                              callbacks=[lambda st, _t: keep_best_only(st, s.workroot),
                                         lambda st, t: _show(bar, st, t)])
        elif running:
            time.sleep(2)  # another worker's trial: heartbeats (RDB) or its pid (this host) end a dead one
            if isinstance(s.storage, optuna.storages.RDBStorage):
                optuna.storages.fail_stale_trials(s.optuna)
            _fail_dead_trials(s.optuna, tracking)
        else:
            return


def _show(bar: StudyProgress, study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
    done = any(x.state == TrialState.COMPLETE for x in study.get_trials(deepcopy=False))
    bar.trial_done(t.number, t.state.name, t.value, study.best_value if done else None)


def _study_run(cfg: Config, tracking: Tracking, tags: dict, ds, parent_run: str | None) -> Run:
    """The study's MLflow parent run: found again by its ``dtl.study`` tag and reopened, or created
    (with the config params and the data) when two workers race, the oldest run wins."""
    name, phase, strategy, backbone = tags[schema.STUDY], tags[schema.PHASE], tags[schema.STRATEGY], tags[schema.BACKBONE]
    run = find_run(tracking, {schema.STUDY: name})
    if run is not None:
        run.reopen()
        run.set_tags({schema.PID: os.getpid()})
        return run
    # a top-level run: the MLflow runs table shows nested runs only under an expanded parent, so a
    # study nested under its pipeline (or `mlflow run`'s launcher) would hide every row of the comparison;
    # the pipeline run stays one click away through the tag and the run's description
    link = {schema.PIPELINE_RUN: parent_run or "",
            schema.NOTE: f"Study `{name}`; started by pipeline run [{parent_run}]"
                                   f"(#/experiments/{tracking.experiment_id}/runs/{parent_run})" if parent_run else ""}
    run = start_run(tracking, f"{phase}-{strategy}-{backbone}" if phase == "phase2" else f"{phase}-{backbone}",
                    {**tags, **{k: v for k, v in link.items() if v}})
    winner = find_run(tracking, {schema.STUDY: name})  # two workers may have raced: the oldest wins
    if winner.id != run.id:
        tracking.client.delete_run(run.id)
        return winner
    run.log_params({**flatten(cfg), "study": name})
    log_data(run, ds, phase)
    return run


def _fail_dead_trials(study: optuna.Study, tracking: Tracking) -> int:
    """Trials still RUNNING whose process is gone from this host (its MLflow run records host
    and pid) are failed and retried at once, on any storage: journal storage has no
    heartbeat, and an RDB heartbeat may not have gone stale yet when the command is rerun."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue  # killed before its run existed: the heartbeat (RDB) is the only witness
        tags = tracking.client.get_run(run_id).data.tags
        if tags.get(schema.HOST) != socket.gethostname() or pid_alive(int(tags.get(schema.PID, "0") or 0)):
            continue
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        RetryCallback(max_retry=2)(study, _frozen(study, t.number))
        n += 1
    return n


def _frozen(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """Trial ``number`` as stored now (public API: trial numbers index ``get_trials``)."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def summarise(s: Study, wall: float) -> StudyResult:
    """The study's outcome on its MLflow run (best trial, counts, plots, the best checkpoint) and
    as a :class:`StudyResult`; a study without a completed trial is an error naming why."""
    trials = s.optuna.get_trials(deepcopy=False)
    counts = {st.name.lower(): sum(t.state == st for t in trials)
              for st in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    try:
        best = s.optuna.best_trial
    except ValueError:
        raise DTLError(f"study {s.name}: no trial completed ({counts}); see the trial runs' dtl.fail_reason tags")
    ckpt = Path(best.user_attrs["checkpoint"])
    if not ckpt.exists():
        raise DTLError(f"study {s.name}: the best trial's checkpoint {ckpt} is gone (work_dir cleaned?). "
                       "Rerun with a new work_dir or delete the study to retrain.")
    run = s.run
    run.log_metrics({"best_value": best.value, "n_complete": counts["complete"], "n_pruned": counts["pruned"],
                     "n_failed": counts["fail"], "study_wall_s": wall})
    # TPE draws its first ``startup_trials`` at random: a best trial among them was never proposed
    # by the model of the objective, so its "best parameters" are one lucky draw, not a tuning result.
    startup_best = best.number < startup_trials(s.cfg, s.phase) and bool(best.params)  # nothing tuned: nothing to flag
    run.set_tags({schema.BEST_TRIAL: best.number, schema.BEST_TRIAL_RUN_ID: best.user_attrs.get("mlflow_run_id", ""),
                  schema.BEST_IS_STARTUP_DRAW: str(startup_best).lower(),
                  **{schema.BEST_PARAM_PREFIX + k: v for k, v in best.params.items()}})
    run.log_dict({"best_trial": best.number, "best_value": best.value, "params": best.params, "counts": counts,
                  "best_is_startup_draw": startup_best, "direction": s.optuna.direction.name.lower()},
                 "study/best.json")
    _log_plots(s.optuna, run)
    if run.client.get_run(run.id).data.tags.get(schema.CHECKPOINT_TRIAL) != str(best.number):
        run.log_artifact(ckpt, "checkpoint")
        run.set_tags({schema.CHECKPOINT_TRIAL: best.number})
    return StudyResult(s.name, run.id, s.phase, s.backbone, s.strategy, best.number, float(best.value),
                       dict(best.params), ckpt, best.user_attrs.get("mlflow_run_id", ""), counts,
                       s.init_from, s.init_label)


def _log_plots(study, run: Run) -> None:
    import matplotlib  # deferred: plotting, only when a figure is drawn

    matplotlib.use("Agg")

    from optuna.visualization import matplotlib as ovm  # deferred: plotting, only when a figure is drawn

    plots = {"optimization_history": ovm.plot_optimization_history,
             "param_importances": ovm.plot_param_importances,
             "parallel_coordinate": ovm.plot_parallel_coordinate}
    for fname, fn in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            run.log_figure(fig, f"study/{fname}.png")
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError):
            continue  # e.g. importances need two completed trials with varying params


def _n_stages(backbone: str) -> int:
    return len(DTLNet(ModelSpec(backbone, ("a", "b"))).stage_groups())


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - best effort while another error propagates
        pass


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
