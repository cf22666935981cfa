"""Model references, resolved in one place. :func:`resolve` gives the classifier that
``dtl explain`` and ``dtl fuzzy`` examine, from ``models:/<name>@<alias>``,
``models:/<name>/<version>`` or a study run id; :func:`phase1_source` gives the checkpoint file
that ``dtl phase2`` starts from and ``dtl evaluate`` scores (also from ``models:/m-<id>``,
``runs:/<run>/<path>`` or a local file); :func:`model_artifacts` says where a logged model's
files are."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow

from dtl import DTLError
from dtl.model.preprocess import InputSpec
from dtl.model.pyfunc import ImageClassifier, load_classifier
from dtl.tracking import schema
from dtl.tracking.adapter import Tracking, download, redact
from dtl.train.engine import resolve_device
from dtl.train.weights import model_from_checkpoint

REFERENCE_FORMS = "models:/<name>@<alias>, models:/<name>/<version> or a study run id"


def model_artifacts(client, uri: str) -> str:
    """Where a logged model's files are, for ``models:/m-<id>``, ``models:/<name>@<alias>``,
    ``models:/<name>/<version>`` or ``runs:/<run>/<path>`` (MLflow 3 keeps logged models outside
    the run's artifacts, so ``models:/.../sub/path`` cannot be downloaded directly)."""
    if uri.startswith("runs:/"):
        return uri.rstrip("/")
    if not uri.startswith("models:/"):
        raise DTLError(f"{uri!r} is not a models:/ or runs:/ URI")
    rest = uri[len("models:/"):].strip("/")
    if rest.startswith("m-"):
        model_id = rest
    else:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = rest.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        model_id = getattr(mv, "model_id", None) or (mv.source[len("models:/"):] if mv.source.startswith("models:/m-") else None)
        if model_id is None:
            return mv.source.rstrip("/")
    return client.get_logged_model(model_id).artifact_location.rstrip("/")


def phase1_source(source: str, cfg) -> Path:
    """A phase-1 result for phase 2: a study run id (its best checkpoint), a ``models:/`` or
    ``runs:/`` model URI (its safetensors weights) or a local checkpoint file."""
    if not source:
        raise DTLError("no phase-1 source given: pass a study run id, a models:/ or runs:/ URI, or a checkpoint file")
    p = Path(source)
    if p.is_file():
        return p
    dst = Path(cfg.work_dir) / "phase1-sources" / source.replace("/", "_").replace(":", "_")
    try:
        if source.startswith(("models:/", "runs:/")):
            base = model_artifacts(mlflow.MlflowClient(), source)
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/dtl/weights.safetensors",
                                                            dst_path=str(dst)))
        return download(source, "checkpoint/best.pt", dst)
    except Exception as e:
        raise DTLError(f"cannot resolve phase-1 source {source!r} ({type(e).__name__}: {str(e)[:200]}). "
                       "Give a phase-1 study run id, a models:/ or runs:/ URI of a logged dtl model, "
                       "or a checkpoint file.") from None


def model_version(client, source: str):
    """The registered version a ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` names
    (read directly, so its aliases are filled in); a DTLError listing what exists otherwise."""
    rest = source[len("models:/"):]
    name, sep, ref = rest.partition("@") if "@" in rest else rest.rpartition("/")
    if not name or not ref:
        raise DTLError(f"{source!r}: give {REFERENCE_FORMS}")
    try:
        mv = client.get_model_version_by_alias(name, ref) if sep == "@" else client.get_model_version(name, ref)
        return client.get_model_version(mv.name, mv.version)
    except Exception:  # noqa: BLE001 - unknown name, alias or version: say what exists
        known = [f"{m.name} (aliases: {', '.join(sorted(m.aliases)) or 'none'})" for m in client.search_registered_models()]
        raise DTLError(f"{source!r} does not resolve in {redact(client.tracking_uri)}. Registered models: "
                       f"{'; '.join(known) or 'none'}") from None


def logged_model_id(mv) -> str | None:
    """The logged model (``m-<id>``) behind a registered version, where MLflow knows it."""
    return getattr(mv, "model_id", None) or (mv.source[len("models:/"):] if mv.source.startswith("models:/m-") else None)


@dataclass
class Resolved:
    """A model to examine or build on: where it came from, its study run and its classifier."""

    label: str  # what the user gave: models:/... or run:<id>
    run_id: str  # the study run it came from
    phase: str
    classifier: ImageClassifier
    tags: dict  # the study run's tags
    version: object | None = None  # the registered ModelVersion, for a models:/ reference
    model_id: str | None = None  # the logged model (where a temperature is stored)


def _download_dir(cfg, source: str) -> Path:
    """One folder per reference under the work dir, emptied first: a rerun downloads into the same
    place, and an alias that moved (or a temperature stored since) never mixes with old files."""
    d = Path(cfg.work_dir) / "model-sources" / source.replace("/", "_").replace(":", "_").replace("@", "_")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def study_tags(tracking: Tracking, run_id: str, label: str, phases: tuple[str, ...]) -> dict:
    """The tags of a study run of one of ``phases``; a DTLError saying what to give otherwise."""
    try:
        tags = tracking.client.get_run(run_id).data.tags
    except Exception:  # noqa: BLE001 - not a run id of this store
        raise DTLError(f"{label!r} is not a run of {redact(tracking.uri)}: give {REFERENCE_FORMS}") from None
    if tags.get(schema.ROLE) != schema.Role.STUDY or tags.get(schema.PHASE) not in phases:
        wanted = " or ".join(p.replace("phase", "phase-") for p in phases)
        raise DTLError(f"{label} does not lead to a {wanted} study run (run {run_id} has dtl.role="
                       f"{tags.get(schema.ROLE)!r}, phase={tags.get(schema.PHASE)!r}); give a study run id or a "
                       "model registered from one")
    return tags


def resolve(tracking: Tracking, cfg, source: str, phases: tuple[str, ...] = ("phase1", "phase2"),
            apply_temperature: bool = True) -> Resolved:
    """The classifier that ``source`` (a registered ``models:/`` reference or a study run id)
    names, on the config's device, with the study run it came from (which must be of ``phases``)."""
    device = str(resolve_device(cfg.device))
    if source.startswith("models:/"):
        mv = model_version(tracking.client, source)
        tags = study_tags(tracking, mv.run_id, source, phases)
        folder = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_artifacts(tracking.client, source)}/dtl",
                                                     dst_path=str(_download_dir(cfg, source)))
        clf = load_classifier(folder, device, apply_temperature=apply_temperature)
        return Resolved(source, mv.run_id, tags[schema.PHASE], clf, tags, mv, logged_model_id(mv))
    tags = study_tags(tracking, source, f"run {source}", phases)
    net, meta = model_from_checkpoint(phase1_source(source, cfg))  # the study's checkpoint/best.pt
    phase = tags[schema.PHASE]
    clf = ImageClassifier(net.to(device), list(net.spec.classes), InputSpec.from_dict(meta["input"]),
                          cfg.phase(phase).data.hsv_segment)
    return Resolved(f"run:{source}", source, phase, clf, tags)
