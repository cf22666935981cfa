"""Model logging (a checkpoint -> an MLflow logged model of the served package) and registration
(one model version per study run and checkpoint, safe under concurrent jobs). Promotion by
policy is :mod:`dtl.tracking.promotion`.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
from mlflow.models import Model

from dtl.model.preprocess import InputSpec
from dtl.tracking import schema
from dtl.tracking.adapter import Run, Tracking
from dtl.tracking.logged import SOFTMAX_FLAVOR
from dtl.train.weights import model_from_checkpoint


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
    # Created in the run's own experiment: MLflow would otherwise put it in the active (Default) one.
    logged = run.client.create_logged_model(run.t.experiment_id, name="model", source_run_id=run.id,
                                            model_type="image-classifier",
                                            tags={schema.BACKBONE: net.spec.backbone, schema.PHASE: str(meta.get("phase")),
                                                  schema.CHECKPOINT: digest})
    Model.log(artifact_path=None, name="model", flavor=SOFTMAX_FLAVOR, run_id=run.id, model_id=logged.model_id,
              net=net, meta=card_meta, example_image=example)
    run.client.finalize_logged_model(logged.model_id, "READY")
    model_id = _one_logged_model(run, digest, logged.model_id)
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


def register(tracking: Tracking, name: str, model_uri: str, source_run: str, tags: dict) -> str:
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
    key = source_key(client, source_run, model_uri)
    found = _versions_of(client, name, key, model_uri)
    if found:
        return found[0]
    model_id = model_uri[len("models:/"):] if model_uri.startswith("models:/m-") else None
    mv = client.create_model_version(name, model_uri, run_id=source_run, model_id=model_id,
                                     tags={k: str(v) for k, v in {**tags, schema.MODEL_URI: model_uri,
                                                                  schema.SOURCE: key}.items()})
    winner = _versions_of(client, name, key, model_uri)[0]  # versions are numbered in commit order: all see the same lowest
    if winner != str(mv.version):
        client.delete_model_version(name, str(mv.version))
    return winner


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
