"""The MLflow run schema, written down once: every tag key the project writes or reads, every
run role, and the builder of the filter strings that find runs by them.

The strings are frozen: stores written by earlier versions hold exactly these keys and
values, so a rename here would hide every old run. Add keys; never change one. Modules use
the names (``schema.ROLE``), never the strings: ``tests/test_structure.py`` fails on a tag
literal outside this module, and :func:`where` raises on a key it does not know, so a typo is
an error instead of an empty search.

Runs of one pipeline job, by role (``tags.dtl.role``):

* ``pipeline``: the job's root run (``dtl.job`` = main, phase1, phase2, ...).
* ``study``: one Optuna study (phase 1 or phase 2, one backbone and strategy), nested under
  the root; its ``trial`` runs are nested under it, and so are the final ``repeat`` (another
  seed) and ``fold`` (cross-validation) retrainings of its best trial.
* ``baseline``: the strongest shortcut baseline of the job's phase-2 data (global colour,
  annotation-box or border statistics of the models' input), a top-level run linked to its root by
  ``dtl.pipeline_run``, scored on the same items as the models.
* ``evaluate``, ``report``, ``explain-job``/``explain``, ``fuzzy-job``/``fuzzy-study``/
  ``fuzzy-trial``: the other commands' runs.
"""

from __future__ import annotations

# --- tag keys: the project's own --------------------------------------------------------------
ROLE = "dtl.role"
JOB = "dtl.job"
STUDY = "dtl.study"  # the study's name (= its Optuna study name)
STUDY_IDENTITY = "dtl.study_identity"  # JSON of what the study's identity is made of
PINNED = "dtl.pinned"  # search-space keys fixed by -o / flags
PIPELINE_RUN = "dtl.pipeline_run"  # on a study: the root run that created it
LAUNCHER_PID = "dtl.launcher_pid"
PID = "dtl.pid"
HOST = "dtl.host"
ENDED_BY = "dtl.ended_by"  # who ended a run this process did not finish (orphan clean-up)
FAIL_REASON = "dtl.fail_reason"
BEST_IS_STARTUP_DRAW = "dtl.best_is_startup_draw"
CHECKPOINT_TRIAL = "dtl.checkpoint_trial"  # the trial whose checkpoint the study keeps
EVALUATED_TRIAL = "dtl.evaluated_trial"
MODEL_CHECKPOINT = "dtl.model_checkpoint"
MODEL_URI = "dtl.model_uri"
MODEL_ID = "dtl.model_id"
REGISTERED = "dtl.registered"  # "name/version" of the registered model version
SOURCE = "dtl.source"  # on a model version: the study run it came from (register-then-reconcile)
CHECKPOINT = "dtl.checkpoint"  # on a logged model: digest of the checkpoint it was made from
CHAMPION = "dtl.champion"
PREVIOUS_CHAMPION = "dtl.previous_champion"
PROMOTION = "dtl.promotion"
PROMOTION_REASON = "dtl.promotion_reason"
REPEAT_SEED = "dtl.repeat_seed"
CV = "dtl.cv"  # "<folds>x<repeats>" on a study that was cross-validated
CV_ID = "dtl.cv_id"
CV_FOLD = "dtl.cv_fold"
CV_REPEAT = "dtl.cv_repeat"
WRITE_CHECKED = "dtl.write_checked"  # on an experiment or registered model: when a job last probed EDIT on it

# --- tag keys: the study's description (also its params) ---------------------------------------
PHASE = "phase"
BACKBONE = "backbone"
STRATEGY = "strategy"
DATA_DIGEST = "data_digest"
ANNOTATION_MASK = "annotation_mask"
HEAD = "head"
SPLIT_PROTOCOL = "split_protocol"
DATA_KIND = "data_kind"
INIT = "init"  # imagenet | scratch | file:<path> | phase1:<study run id>
INIT_DIGEST = "init_digest"
MONITOR = "monitor"  # the metric the study optimises
PREPROCESSING = "preprocessing"  # stain settings off their default ("colour=greyscale, hed=0.05"), else "default"
DIRECTION = "direction"  # maximize | minimize
PRETRAINED_TAG = "pretrained_tag"  # the timm tag whose input preprocessing the study uses ("resnet50.tv_in1k")
INPUT_PREPROCESSING = "input_preprocessing"  # that preprocessing in words: size, crop, interpolation, mean, std

# --- tag keys: results written on a study, trial or job run ------------------------------------
BEST_TRIAL = "best_trial"
BEST_TRIAL_RUN_ID = "best_trial_run_id"
BEST_PARAM_PREFIX = "best."  # + param name, on a fuzzy study: its best parameters
PRECISION = "precision"  # on a trial: the precision it really ran in (AMP may fall back)
DEVICE = "device"
SKIPPED_STEPS = "skipped_steps"  # AMP steps skipped for inf/nan gradients
WORLD_SIZE = "world_size"  # on a trial: DDP processes
CI_UNIT_PREFIX = "ci_unit."  # + split: what the bootstrap resampled (image, group, patient)
CHECKPOINT_FILE = "checkpoint"  # on an evaluate run: the file evaluated
MODEL = "model"  # on an explain run: the model reference explained
MODEL_VERSION = "model_version"
SPLIT = "split"
SHORTCUT_FLAGGED = "shortcut_flagged"

# --- tag keys: on registered model versions ------------------------------------------------------
METRIC_PREFIX = "metric."  # + metric name: the evaluation that promotion compares
PHASE2_RUN = "phase2_run"  # the study run the version (or a fuzzy study) came from
PHASE2_TRIAL = "phase2_trial"
VERSION_STUDY = "study"  # the study's name, on a version
VERSION_PIPELINE_RUN = "pipeline_run"
PHASE1_SOURCE = "phase1_source"  # what phase 2 started from: a phase-1 study run id, models:/ URI or file
PHASE1_RUN = "phase1_run"
PHASE1_TRIAL = "phase1_trial"
PHASE1_INIT = "phase1_init"
PHASE1_DATA_DIGEST = "phase1_data_digest"
PHASE1_DATA_KIND = "phase1_data_kind"
PHASE1_SPLIT_PROTOCOL = "phase1_split_protocol"
DUPLICATES_REMOVED = "duplicates_removed"
CALIBRATION_TEMPERATURE = "calibration.temperature"
CALIBRATED_FROM = "calibrated_from"  # on a version (and its logged model): the version it is the temperature-scaled copy of
BASELINE_VERSION = "dtl.baseline_version"  # on a baseline run: the version of what it fits
BASELINE_RUN = "dtl.baseline_run"  # the shortcut-baseline run the version was compared with
BASELINE_GAP = "dtl.baseline_gap"  # "+0.0120 [-0.0030, +0.0270]": test accuracy, model - baseline, paired CI
BASELINE_FLAG = "dtl.baseline_flag"  # "true": the gap's CI does not exclude 0 (or the model is worse)

# --- tag keys: MLflow's and Optuna's ----------------------------------------------------------
PARENT = "mlflow.parentRunId"
RUN_NAME = "mlflow.runName"
NOTE = "mlflow.note.content"  # the run's description in the UI
GIT_COMMIT = "mlflow.source.git.commit"
EXPERIMENT_KIND = "mlflow.experimentKind"  # on an experiment: custom_model_development opens the UI on its runs
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # + key, on an experiment: a runs-table view (?viewStateShareKey=key)
MODEL_VERSIONS = "mlflow.modelVersions"  # on a logged model: JSON list of its registered versions (the UI's column)
DATASET_CONTEXT = "mlflow.data.context"  # on a run input: train / val / test
OPTUNA_TRIAL = "optuna.trial"
OPTUNA_STATE = "optuna.state"
OPTUNA_STORAGE = "optuna.storage"
OPTUNA_RETRY_OF = "optuna.retry_of"
OPTUNA_PRUNED_EPOCH = "optuna.pruned_epoch"

PHASE1_SOURCE_PREFIX = "dtl.phase1_source."  # + backbone, on a root run: the phase-1 study phase 2 started from

KEYS = frozenset(v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str))


class Role:
    """Values of :data:`ROLE`."""

    PIPELINE = "pipeline"
    STUDY = "study"
    TRIAL = "trial"
    REPEAT = "repeat"
    FOLD = "fold"
    EVALUATE = "evaluate"
    REPORT = "report"
    EXPLAIN_JOB = "explain-job"
    EXPLAIN = "explain"
    FUZZY_JOB = "fuzzy-job"
    FUZZY_STUDY = "fuzzy-study"
    FUZZY_TRIAL = "fuzzy-trial"
    BASELINE = "baseline"  # the strongest shortcut baseline, fitted on train, scored on val and test


def phase1_source_key(backbone: str) -> str:
    return PHASE1_SOURCE_PREFIX + backbone


def _quote(value) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def where(tags: dict | None = None, *, status: str | None = None, **attributes) -> str:
    """An MLflow ``filter_string``: every tag equal to its value (keys from this module), the
    run status if given (``FINISHED``, ``RUNNING``), and ``attributes`` (e.g. ``source_run_id``)
    as they are. ``where({ROLE: Role.STUDY, PHASE: "phase1"}, status="FINISHED")``."""
    parts = []
    for key, value in (tags or {}).items():
        if key not in KEYS:
            raise ValueError(f"{key!r} is not a tag of the run schema (dtl.tracking.schema)")
        parts.append(f"tags.`{key}` = {_quote(value)}")
    parts += [f"{k} = {_quote(v)}" for k, v in attributes.items()]
    if status:
        parts.append(f"attributes.status = {_quote(status)}")
    return " and ".join(parts)


def study_query(phase: str, data_digest: str | None = None, tags: dict | None = None, status: str | None = None) -> str:
    """The study runs of one phase (of one dataset, with more tags, of one status if given)."""
    return where({ROLE: Role.STUDY, PHASE: phase, **({DATA_DIGEST: data_digest} if data_digest else {}), **(tags or {})},
                 status=status)


def children(parent_run_id: str, role: str | None = None, status: str | None = None) -> str:
    """The runs nested directly under ``parent_run_id`` (of one role, of one status, if given)."""
    return where({PARENT: parent_run_id, **({ROLE: role} if role else {})}, status=status)
