"""Model logging (a checkpoint -> an MLflow logged model of the served package) and registration
(one model version per study run and checkpoint, safe under concurrent jobs). Promotion by
policy is :mod:`dtl.tracking.promotion`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import yaml
from mlflow.entities import LoggedModelOutput, Metric
from mlflow.models import Model

from dtl.model.preprocess import InputSpec
from dtl.tracking import schema
from dtl.tracking.adapter import Run, Tracking
from dtl.tracking.logged import SOFTMAX_FLAVOR
from dtl.train.weights import model_from_checkpoint

# What defines a results row: the logged model's params (with the best parameters) and its tags.
ROW_KEYS = (schema.PHASE, schema.BACKBONE, schema.STRATEGY, schema.INIT, schema.SPLIT_PROTOCOL, schema.ANNOTATION_MASK,
            schema.PREPROCESSING, schema.DATA_KIND, schema.MONITOR)
MODEL_TAG_KEYS = ROW_KEYS + (schema.DATA_DIGEST, schema.STUDY)


def model_name(tags: dict) -> str:
    """What a logged model is called in the UI: ``<backbone>-<strategy>`` (``test_efficientnet-double``),
    then what sets its row apart from the recipe's default, so that the variants of one backbone
    differ on the Models page: ``-unmasked`` (annotation mask off) and its colour / stain settings
    (``test_resnet-double-hed_0.2``, ``...-colour_greyscale``)."""
    parts = [tags.get(schema.BACKBONE), tags.get(schema.STRATEGY)]
    if tags.get(schema.ANNOTATION_MASK) == "off":
        parts.append("unmasked")
    pre = tags.get(schema.PREPROCESSING, "default")
    if pre and pre != "default":
        parts += [x.replace("=", "_") for x in pre.split(", ")]
    return "-".join(x for x in parts if x) or "model"


def model_description(tags: dict) -> tuple[dict, dict]:
    """(params, tags) of the logged model of a study run with ``tags``: the best parameters and
    the settings that define its row; strategy, init, split protocol, masking and data digest."""
    params = {k[len(schema.BEST_PARAM_PREFIX):]: v for k, v in tags.items() if k.startswith(schema.BEST_PARAM_PREFIX)}
    params.update({k: tags[k] for k in ROW_KEYS if tags.get(k)})
    return params, {k: tags[k] for k in MODEL_TAG_KEYS if tags.get(k)}


def new_logged_model(run: Run, name: str, params: dict, tags: dict, model_type: str = "image-classifier") -> str:
    """A logged model in ``run``'s own experiment (MLflow would otherwise put it in the active,
    Default, one), logged from ``run`` and listed among its outputs; returns its id. Its metrics
    are only those logged with its id (``Model.log(run_id=...)`` would copy every metric of the
    run, system metrics and study bookkeeping included, so it is never given the run)."""
    logged = run.client.create_logged_model(run.t.experiment_id, name=name, source_run_id=run.id, model_type=model_type,
                                            params={k: str(v) for k, v in params.items()},
                                            tags={k: str(v) for k, v in tags.items()})
    run.client.log_outputs(run.id, [LoggedModelOutput(logged.model_id, 0)])
    return logged.model_id


def log_model(run: Run, checkpoint: Path, hsv_segment: bool = False) -> str:
    """Log the best checkpoint as an MLflow model (pytorch + image pyfunc) on ``run``; returns its URI.
    Idempotent: a run that already logged this checkpoint returns the same model."""
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:16]
    tags = run.client.get_run(run.id).data.tags
    if tags.get(schema.MODEL_CHECKPOINT) == digest and tags.get(schema.MODEL_URI):
        return tags[schema.MODEL_URI]
    net, meta = model_from_checkpoint(checkpoint)
    ispec = InputSpec.from_dict(meta["input"])

    example = (np.random.default_rng(0).integers(0, 255, (ispec.size, ispec.size, 3))).astype(np.uint8)
    card_meta = {"spec": net.spec.to_dict(), "input": meta["input"], "hsv_segment": hsv_segment,
                  "phase": meta.get("phase"), "init": meta.get("init"), "data_digest": meta.get("data_digest"),
                  "protocol": meta.get("protocol")}
    params, model_tags = model_description({schema.BACKBONE: net.spec.backbone, schema.PHASE: str(meta.get("phase")), **tags})
    name = model_name({schema.BACKBONE: net.spec.backbone, **tags})
    model_id = new_logged_model(run, name, params, {**model_tags, schema.CHECKPOINT: digest})
    Model.log(artifact_path=None, name=name, flavor=SOFTMAX_FLAVOR, model_id=model_id,
              net=net, meta=card_meta, example_image=example)
    run.client.finalize_logged_model(model_id, "READY")
    model_id = _one_logged_model(run, digest, model_id)
    uri = f"models:/{model_id}"
    run.set_tags({schema.MODEL_URI: uri, schema.MODEL_CHECKPOINT: digest, schema.MODEL_ID: model_id})
    return uri


def _one_logged_model(run: Run, digest: str, mine: str, wait_s: float = 300) -> str:
    """The logged model of ``run`` for checkpoint ``digest``: two jobs on one study may both have
    logged it; the oldest wins (once READY), and the job whose model lost deletes its own."""
    flt = schema.where({schema.CHECKPOINT: digest}, source_run_id=run.id)
    deadline = time.monotonic() + wait_s
    while True:
        models = [m for m in run.client.search_logged_models([run.t.experiment_id], filter_string=flt)
                  if m.status.name != "FAILED"]
        winner = min(models, key=lambda m: (m.creation_timestamp, m.model_id))
        if winner.model_id == mine:
            return mine
        if winner.status.name == "READY":
            run.client.delete_logged_model(mine)
            return winner.model_id
        if time.monotonic() > deadline:  # the older one never finished (its job died): keep ours
            return mine
        time.sleep(1)


def register(tracking: Tracking, name: str, model_uri: str, source_run: str, tags: dict, key: str | None = None) -> str:
    """The model version of ``source_run``'s best checkpoint (``dtl.model_checkpoint`` on the run),
    created unless one exists; returns its version. Concurrent jobs on one store may both create
    one (check-then-create is a race no client can close): each then reconciles, the lowest
    version wins and a job whose version lost deletes it, so one version per study run remains."""
    client = tracking.client
    try:
        client.get_registered_model(name)
    except Exception:
        try:
            client.create_registered_model(name, description="ALL double-transfer classifiers (research use only)")
        except Exception:
            pass  # created concurrently
    key = key or source_key(client, source_run, model_uri)
    found = _versions_of(client, name, key, model_uri)
    if found:
        return found[0]
    mv = _register_logged(client, name, model_uri, source_run, {**tags, schema.MODEL_URI: model_uri, schema.SOURCE: key})
    winner = _versions_of(client, name, key, model_uri)[0]  # versions are numbered in commit order: all see the same lowest
    if winner != str(mv.version):
        client.delete_model_version(name, str(mv.version))
        _unlist(client, model_uri, name, str(mv.version))
    return winner


def _register_logged(client, name: str, model_uri: str, source_run: str, tags: dict):
    """MLflow's own registration of a logged model (``mlflow.register_model("models:/<model_id>")``):
    the logged model lists the version in ``mlflow.modelVersions`` (the UI's "Registered models"
    column) and the version's source is the logged model. (MLflow 3.17's SQL registry store keeps
    no ``ModelVersion.model_id``: :func:`dtl.tracking.resolve.logged_model_id` reads it from the source.)"""
    tags = {k: str(v) for k, v in tags.items()}
    if not model_uri.startswith("models:/m-"):
        return client.create_model_version(name, model_uri, run_id=source_run, tags=tags)
    return mlflow.register_model(model_uri, name, tags=tags)


def _unlist(client, model_uri: str, name: str, version: str) -> None:
    """Drop a deleted version from its logged model's ``mlflow.modelVersions`` list."""
    if model_uri.startswith("models:/m-"):
        model_id = model_uri[len("models:/"):]
        listed = json.loads(client.get_logged_model(model_id).tags.get(schema.MODEL_VERSIONS) or "[]")
        keep = [v for v in listed if (v.get("name"), str(v.get("version"))) != (name, version)]
        client.set_logged_model_tags(model_id, {schema.MODEL_VERSIONS: json.dumps(keep)})


def source_key(client, run_id: str, model_uri: str) -> str:
    """What one version stands for: the study run and the checkpoint it logged (another checkpoint
    of the same run, after its study grew, is another version)."""
    tags = client.get_run(run_id).data.tags
    return f"{run_id}:{tags.get(schema.MODEL_CHECKPOINT) or model_uri}"


def _versions_of(client, name: str, key: str, model_uri: str) -> list[str]:
    """Versions of ``name`` registered for ``key``, lowest first (versions from before the key was
    recorded match on their model URI)."""
    out = [v for v in client.search_model_versions(f"name='{name}'")
           if v.tags.get(schema.SOURCE) == key or (schema.SOURCE not in v.tags and v.tags.get(schema.MODEL_URI) == model_uri)]
    return [str(v.version) for v in sorted(out, key=lambda v: int(v.version))]


# Version tags that belong to one version's history, not to a copy of it.
_NOT_COPIED = (schema.SOURCE, schema.MODEL_URI, schema.PREVIOUS_CHAMPION, schema.PROMOTION_REASON, schema.CHAMPION)
# Metrics a temperature changes (calibration error; one-vs-rest AUC compares one class's probability
# across items): not copied onto a calibrated model. Argmax, so accuracy and F1, does not change.
_SCALE_DEPENDENT = ("_ece", "roc_auc")


def scale_free(key: str) -> bool:
    """Whether metric ``key`` (``test_accuracy``, ``val_ece_ci_low``) is the same after temperature scaling."""
    return not any(s in key for s in _SCALE_DEPENDENT)


def register_calibrated(tracking: Tracking, mv, model_id: str, files: dict[str, str], temperature: float,
                        calibrated: dict[str, float] | None = None) -> str:
    """A registered version never changes: a temperature-scaled model is a new logged model (the
    source's files plus ``files``, its params, tags and the evaluation metrics a temperature leaves
    alone, plus ``calibrated``: the scaled model's own values of those it changes, e.g. ``test_ece``;
    tag ``calibrated_from``) and a new version of ``mv.name`` tagged ``calibrated_from`` = ``mv.version``;
    returns the version (the existing one when this version was calibrated before: one calibrated
    copy per version, whatever temperature a rerun fits)."""
    client, t, calibrated = tracking.client, f"{temperature:.6g}", calibrated or {}
    key = f"{mv.tags.get(schema.SOURCE) or mv.source}:calibrated"
    found = _versions_of(client, mv.name, key, "") or [
        str(v.version) for v in client.search_model_versions(f"name='{mv.name}'")
        if v.tags.get(schema.CALIBRATED_FROM) == str(mv.version)]  # copies registered before the key changed
    if found:
        return found[0]
    src = client.get_logged_model(model_id)
    run = Run(tracking, src.source_run_id or mv.run_id)
    tags = {k: v for k, v in src.tags.items() if not k.startswith("mlflow.")}
    new_id = new_logged_model(run, f"{src.name}-calibrated", src.params,
                              {**tags, schema.CALIBRATED_FROM: f"{mv.name}/{mv.version}", schema.CALIBRATION_TEMPERATURE: t},
                              model_type=src.model_type or "image-classifier")
    with tempfile.TemporaryDirectory() as d:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=src.artifact_location, dst_path=d))
        for rel, text in files.items():
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            (local / rel).write_text(text)
        _own_model_id(local / "MLmodel", new_id)
        client.log_model_artifacts(new_id, str(local))
    client.finalize_logged_model(new_id, "READY")
    _link_calibrated_metrics(client, run.id, new_id, src.metrics or [], calibrated)
    version_tags = {**{k: v for k, v in mv.tags.items() if k not in _NOT_COPIED
                       and not (k.startswith(schema.METRIC_PREFIX) and not scale_free(k))},
                    **{schema.METRIC_PREFIX + k: round(float(v), 6) for k, v in calibrated.items()},
                    schema.CALIBRATED_FROM: str(mv.version), schema.CALIBRATION_TEMPERATURE: t}
    return register(tracking, mv.name, f"models:/{new_id}", mv.run_id, version_tags, key=key)


def _link_calibrated_metrics(client, run_id: str, model_id: str, source: list, calibrated: dict[str, float]) -> None:
    """The source model's scale-free evaluation metrics and the calibrated values, linked to the new
    model (each with the dataset its source metric was linked to)."""
    by_key = {m.key: m for m in source}
    now = int(time.time() * 1000)
    out = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, dataset_name=m.dataset_name,
                  dataset_digest=m.dataset_digest) for m in source if scale_free(m.key)]
    for k, v in calibrated.items():
        m = by_key.get(k)
        out.append(Metric(k, float(v), now, 0, model_id=model_id, dataset_name=m.dataset_name if m else None,
                          dataset_digest=m.dataset_digest if m else None))
    if out:
        client.log_batch(run_id, metrics=out)


def _own_model_id(mlmodel: Path, model_id: str) -> None:
    """The copied MLmodel names the new logged model: loading the copy makes IT MLflow's active model
    (traces and evaluations attach to it), not the source it was copied from."""
    if not mlmodel.is_file():
        return
    doc = yaml.safe_load(mlmodel.read_text()) or {}
    if doc.get("model_id"):
        doc["model_id"] = model_id
        mlmodel.write_text(yaml.safe_dump(doc, sort_keys=False))
