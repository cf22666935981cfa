"""Model logging, registration and promotion by policy (aliases), and model cards.

Promotion = a pure selection function (:func:`select`) + registration + one alias move. The
champion never moves to a candidate that is worse on the policy metric than the current
champion over the same data digest, unless forced; the previous champion is recorded in a
tag; rerunning on the same runs creates no new versions.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import yaml
from mlflow.models import Model

from dtl import DTLError
from dtl.evaluation.metrics import direction
from dtl.model.preprocess import InputSpec
from dtl.tracking import schema
from dtl.tracking.adapter import Run, Tracking, download
from dtl.tracking.logged import SOFTMAX_FLAVOR
from dtl.train.weights import model_from_checkpoint

CARDS_DIR = Path("registry/cards")


@dataclass(frozen=True)
class Policy:
    registered_model: str = "all-dtl"
    metric: str = "val_macro_f1"
    direction: str = "maximize"  # maximize | minimize; must agree with the metric (losses, ECE: minimize)
    min_value: float | None = None
    tie_breaks: tuple[str, ...] = ("val_balanced_accuracy", "val_accuracy")


def load_policy(path: str | Path, registered_model: str = "") -> Policy:
    p = Path(path)
    raw = {}
    if p.exists():
        raw = yaml.safe_load(p.read_text()) or {}
    elif str(path) != "registry/policy.yaml":
        raise DTLError(f"promotion policy {p} does not exist")
    known = set(Policy.__dataclass_fields__)
    bad = sorted(set(raw) - known)
    if bad:
        raise DTLError(f"{p}: unknown policy key(s) {bad}; valid: {sorted(known)}")
    metric = str(raw.get("metric", Policy.metric))
    if not metric.startswith("val_"):
        raise DTLError(f"{p}: metric={metric!r} is not a validation metric. Promotion selects on validation "
                       "(val_macro_f1, val_balanced_accuracy, val_loss, ...); selecting on test would make the "
                       "test figures of the champion optimistic.")
    raw.setdefault("direction", direction(metric))
    if raw["direction"] not in ("maximize", "minimize"):
        raise DTLError(f"{p}: direction must be maximize or minimize")
    if raw["direction"] != direction(metric):
        raise DTLError(f"{p}: direction={raw['direction']} contradicts metric {metric} "
                       f"({'lower' if direction(metric) == 'minimize' else 'higher'} is better); "
                       f"use direction: {direction(metric)} or leave it out")
    if "tie_breaks" in raw:
        raw["tie_breaks"] = tuple(raw["tie_breaks"] or ())
        bad = [t for t in raw["tie_breaks"] if not str(t).startswith("val_")]
        if bad:
            raise DTLError(f"{p}: tie_breaks {bad} are not validation metrics")
    pol = Policy(**raw)
    if registered_model:
        pol = Policy(registered_model, pol.metric, pol.direction, pol.min_value, pol.tie_breaks)
    return pol


@dataclass(frozen=True)
class Candidate:
    version: str
    metrics: dict
    data_digest: str = ""
    synthetic: bool = False  # trained on the built-in demo data
    protocol: str = ""  # split protocol
    mask: str = ""  # annotation masking on/off

    @property
    def data_key(self) -> tuple[str, str, str]:
        """What "trained on the same data" means: same files and split, same preprocessing."""
        return self.data_digest, self.protocol, self.mask


@dataclass
class Decision:
    champion: str | None
    challenger: str | None
    moved: bool
    reason: str
    ranked: list[str] = field(default_factory=list)


def _key(c: Candidate, policy: Policy) -> tuple:
    """Sort key, larger is better: each metric signed by its own direction, a missing one last."""
    out = []
    for i, name in enumerate((policy.metric,) + tuple(policy.tie_breaks)):
        sign = 1 if (policy.direction if i == 0 else direction(name)) == "maximize" else -1
        v = c.metrics.get(name, float("nan"))
        out.append(sign * v if v == v else -math.inf)
    return tuple(out) + (int(c.version),)


def select(candidates: list[Candidate], policy: Policy, current: Candidate | None = None,
           force: bool = False) -> Decision:
    """Pure promotion decision. Candidates below ``min_value`` (or lacking the metric) are out;
    the best by (metric, tie-breaks, newest version) is champion, the runner-up challenger."""
    def eligible(c: Candidate) -> bool:
        v = c.metrics.get(policy.metric)
        if v is None or v != v:
            return False
        if policy.min_value is None:
            return True
        return v >= policy.min_value if policy.direction == "maximize" else v <= policy.min_value

    pool = sorted((c for c in candidates if eligible(c)), key=lambda c: _key(c, policy), reverse=True)
    ranked = [c.version for c in pool]
    if not pool:
        return Decision(current.version if current else None, None, False,
                        f"no candidate has {policy.metric} meeting min_value={policy.min_value}", ranked)
    best = pool[0]
    runner = pool[1].version if len(pool) > 1 else None
    if current is None:
        return Decision(best.version, runner, True, "no champion yet", ranked)
    if best.version == current.version:
        return Decision(best.version, runner, False, "the champion is still the best candidate", ranked)
    if best.synthetic and not current.synthetic and not force:
        return Decision(current.version, None, False,
                        f"v{best.version} was trained on the synthetic demo data; it never replaces champion "
                        f"v{current.version}, trained on real data (use --force to move anyway)", ranked)
    same_data = current.data_key == best.data_key
    if same_data and eligible(current) and _key(best, policy)[:-1] < _key(current, policy)[:-1] and not force:
        return Decision(current.version, best.version, False,
                        f"best candidate v{best.version} is worse than champion v{current.version} on "
                        f"{policy.metric} over the same data (use --force to move anyway)", ranked)
    why = ("better than the champion" if same_data
           else "champion was trained on other data (digest, split protocol or masking differs)")
    if force and same_data and _key(best, policy)[:-1] < _key(current, policy)[:-1]:
        why = "forced"
    return Decision(best.version, runner if runner != best.version else None, True, why, ranked)


# ----------------------------------------------------------------------------- MLflow side

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
                                            tags={"backbone": net.spec.backbone, "phase": str(meta.get("phase")),
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
                                                                  SOURCE_KEY: key}.items()})
    winner = _versions_of(client, name, key, model_uri)[0]  # versions are numbered in commit order: all see the same lowest
    if winner != str(mv.version):
        client.delete_model_version(name, str(mv.version))
    return winner


SOURCE_KEY = schema.SOURCE  # version tag: "<study run id>:<checkpoint digest>", one version per value


def source_key(client, run_id: str, model_uri: str) -> str:
    """What one version stands for: the study run and the checkpoint it logged (another checkpoint
    of the same run, after its study grew, is another version)."""
    tags = client.get_run(run_id).data.tags
    return f"{run_id}:{tags.get(schema.MODEL_CHECKPOINT) or model_uri}"


def _versions_of(client, name: str, key: str, model_uri: str) -> list[str]:
    """Versions of ``name`` registered for ``key``, lowest first (versions from before the key was
    recorded match on their model URI)."""
    out = [v for v in client.search_model_versions(f"name='{name}'")
           if v.tags.get(SOURCE_KEY) == key or (SOURCE_KEY not in v.tags and v.tags.get(schema.MODEL_URI) == model_uri)]
    return [str(v.version) for v in sorted(out, key=lambda v: int(v.version))]


def candidates(tracking: Tracking, name: str, filter_tags: dict | None = None) -> list[Candidate]:
    """The versions promotion chooses from: one per source (a concurrent duplicate that its job has
    not deleted yet is never chosen)."""
    out, seen = [], set()
    for v in sorted(tracking.client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        if filter_tags and any(v.tags.get(k) != str(val) for k, val in filter_tags.items()):
            continue
        src = v.tags.get(SOURCE_KEY)
        if src and src in seen:
            continue
        seen.add(src)
        out.append(_candidate(v))
    return out


def current_champion(tracking: Tracking, name: str) -> Candidate | None:
    try:
        mv = tracking.client.get_model_version_by_alias(name, "champion")
    except Exception:
        return None
    return _candidate(mv)


def _candidate(mv) -> Candidate:
    metrics = {k[len("metric."):]: float(x) for k, x in mv.tags.items() if k.startswith("metric.")}
    return Candidate(str(mv.version), metrics, mv.tags.get("data_digest", ""),
                     mv.tags.get("data_kind", "").startswith("demo"), mv.tags.get("split_protocol", ""),
                     mv.tags.get("annotation_mask", ""))


def promote(tracking: Tracking, policy: Policy, filter_tags: dict | None = None, force: bool = False,
            cards_dir: Path | None = CARDS_DIR) -> Decision:
    """Select by policy, move ``champion``/``challenger`` aliases, record the previous champion,
    and write a model card for the promoted version.

    Two jobs promoting at once each move the aliases, then read them back and decide again: an
    alias set from an older view of the registry is corrected, so the aliases end on the policy's
    choice over all versions (each pass moves them only where that choice differs)."""
    name = policy.registered_model
    d = _promote_once(tracking, policy, filter_tags, force)
    for _ in range(3):
        again = _promote_once(tracking, policy, filter_tags, force=False)
        if not again.moved:
            break
        d = again
    if d.champion and cards_dir is not None:
        write_card(tracking, name, d.champion, policy, cards_dir)
    return d


def _promote_once(tracking: Tracking, policy: Policy, filter_tags: dict | None, force: bool) -> Decision:
    """One decision on the registry as it is now, and its alias moves."""
    name = policy.registered_model
    current = current_champion(tracking, name)
    d = select(candidates(tracking, name, filter_tags), policy, current, force)
    client = tracking.client
    if d.moved and d.champion:
        if current is not None:
            client.set_model_version_tag(name, d.champion, schema.PREVIOUS_CHAMPION, current.version)
        client.set_registered_model_alias(name, "champion", d.champion)
        client.set_model_version_tag(name, d.champion, schema.PROMOTION_REASON, d.reason)
    if d.challenger and d.challenger != d.champion:
        client.set_registered_model_alias(name, "challenger", d.challenger)
    return d


def write_card(tracking: Tracking, name: str, version: str, policy: Policy, cards_dir: Path) -> Path:
    """Model card (Markdown + JSON) of a version, written to ``cards_dir`` and logged on its run."""
    client = tracking.client
    mv = client.get_model_version(name, version)
    run = client.get_run(mv.run_id)
    t, m = run.data.tags, run.data.metrics
    spec = _model_spec(client, mv)
    classes = spec.get("spec", {}).get("classes", [])
    metrics = {k: v for k, v in sorted(m.items()) if k.startswith(("test_", "val_")) and "precision_" not in k
               and "recall_" not in k}
    card = {
        "name": name, "version": version, "aliases": list(mv.aliases),
        "intended_use": "Research on acute lymphoblastic leukemia image classification. NOT for diagnosis "
                        "or any clinical decision.",
        "backbone": t.get("backbone"), "classes": classes, "input": spec.get("input", {}),
        "input_format": "column 'image': base64 image bytes, raw bytes or an H×W×3 uint8 RGB array, any size "
                        "(resized and centre-cropped inside the model); file paths only in local Python with "
                        "model_config={'allow_paths': True}, never over REST",
        "data": {"phase2": {"kind": t.get("data_kind"), "digest": t.get("data_digest"),
                            "split_protocol": t.get("split_protocol"),
                            "duplicates_removed": mv.tags.get("duplicates_removed")},
                 "phase1": {"digest": mv.tags.get("phase1_data_digest"), "kind": mv.tags.get("phase1_data_kind"),
                            "split_protocol": mv.tags.get("phase1_split_protocol")}},
        "metrics": metrics,
        "probabilities": _calibration(client, mv),
        "policy": {"metric": policy.metric, "direction": policy.direction, "min_value": policy.min_value},
        "lineage": {"phase1_run": mv.tags.get("phase1_run"), "phase2_run": mv.run_id, "study": t.get(schema.STUDY),
                    "git_commit": t.get(schema.GIT_COMMIT), "init": t.get("init"),
                    "strategy": t.get("strategy"), "previous_champion": mv.tags.get(schema.PREVIOUS_CHAMPION),
                    "model_uri": mv.source},
        "limitations": _limitations(t),
    }
    md = _card_markdown(card)
    cards_dir.mkdir(parents=True, exist_ok=True)
    stem = cards_dir / f"{name}-v{version}"
    stem.with_suffix(".json").write_text(json.dumps(card, indent=2, default=str))
    stem.with_suffix(".md").write_text(md)
    client.log_dict(mv.run_id, card, f"model_card/{name}-v{version}.json")
    client.log_text(mv.run_id, md, f"model_card/{name}-v{version}.md")
    # The registry page of the version shows its card (descriptions hold at most 5,000 characters).
    client.update_model_version(name, version, description=md if len(md) <= 5000 else md[:4950] + "\n\n(truncated; "
                                f"the full card is the run artifact model_card/{name}-v{version}.md)")
    return stem.with_suffix(".md")


def _mask_text(mask: dict | None) -> str:
    if not mask:
        return "none"
    return (f"bottom-right {mask['height']:.3f} × {mask['width']:.3f} of the image filled with RGB {mask['fill']} "
            "(in training and in this model's preprocessing)")


CI_UNITS = {"patient": "patients", "group": "near-duplicate groups (one smear field each)", "image": "test images"}


def _limitations(tags: dict) -> list[str]:
    """What the card must warn about, from the study run's own tags (split protocol, CI unit)."""
    protocol = tags.get("split_protocol", "unknown")
    unit = tags.get("ci_unit.test", "image")
    out = []
    if protocol != "patient-level":
        out.append(f"The phase-2 data has no patient IDs: the split is {protocol} (images of one patient may be on "
                   "both sides), so test metrics are optimistic.")
    out.append("Trained on images from the sources named above; other stains, scanners and hospitals may differ.")
    out.append(f"Confidence intervals are bootstrap intervals resampling {CI_UNITS.get(unit, unit)}"
               + ("." if unit == "patient" else ", not patients."))
    return out


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


def _calibration(client, mv) -> dict | None:
    """``dtl/calibration.json`` of a version's logged model (the temperature `dtl explain` stored), or None."""
    try:
        base = model_artifacts(client, f"models:/{mv.name}/{mv.version}")
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/dtl/calibration.json")
    except Exception:  # noqa: BLE001 - no temperature stored: raw softmax probabilities
        return None
    return json.loads(Path(path).read_text())


def _probabilities_text(cal: dict | None) -> str:
    if not cal:
        return "softmax of the logits (no temperature stored)"
    eces = ", ".join(f"{k.replace('_ece_', ' ECE ')} {v:.4f}" for k, v in cal.items() if "_ece_" in k)
    return (f"temperature-scaled: softmax(logits / {cal['temperature']:.3f}), T fitted on the validation split by "
            f"`dtl explain` ({eces}); load with model_config={{'apply_temperature': False}} for raw softmax "
            "(models logged before this option: mlflow.pytorch.load_model gives the raw logits)")


def _model_spec(client, mv) -> dict:
    """``dtl/spec.json`` of a version's logged model (classes, input spec, lineage)."""
    try:
        base = model_artifacts(client, f"models:/{mv.name}/{mv.version}")
        return json.loads(Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/dtl/spec.json")).read_text())
    except Exception as e:  # noqa: BLE001 - a card without the spec still says what it can
        return {"error": f"spec.json not readable: {type(e).__name__}"}


def _card_markdown(c: dict) -> str:
    def ci(k):
        v = c["metrics"].get(k)
        lo, hi = c["metrics"].get(f"{k}_ci_low"), c["metrics"].get(f"{k}_ci_high")
        if v is None:
            return "n/a"
        return f"{v:.4f}" + (f" (95% CI {lo:.4f}–{hi:.4f})" if lo is not None and hi is not None else "")

    rows = "\n".join(f"| {k} | {ci(k)} |" for k in ("test_accuracy", "test_balanced_accuracy", "test_macro_f1",
                                                    "test_weighted_f1", "test_roc_auc", "test_ece", "val_macro_f1"))
    lin = "\n".join(f"- {k}: `{v}`" for k, v in c["lineage"].items())
    lim = "\n".join(f"- {x}" for x in c["limitations"])
    return f"""# Model card: {c['name']} v{c['version']} ({', '.join(c['aliases']) or 'no alias'})

**Intended use.** {c['intended_use']}

| | |
|---|---|
| backbone | {c['backbone']} |
| classes | {', '.join(c['classes'])} |
| input | {c['input'].get('size')} px, mean {c['input'].get('mean')}, std {c['input'].get('std')} |
| annotation mask | {_mask_text(c['input'].get('mask'))} |
| probabilities | {_probabilities_text(c.get('probabilities'))} |
| input format | {c['input_format']} |
| phase-2 data | {c['data']['phase2']['kind']}, digest `{str(c['data']['phase2']['digest'])[:16]}`, split {c['data']['phase2']['split_protocol']}, duplicates removed: {c['data']['phase2']['duplicates_removed']} |
| phase-1 data | {c['data']['phase1']['kind']}, digest `{str(c['data']['phase1']['digest'])[:16]}`, split {c['data']['phase1']['split_protocol']} |
| policy | {c['policy']['metric']} ({c['policy']['direction']}) |

## Metrics

| metric | value |
|---|---|
{rows}

## Lineage

{lin}

## Limitations

{lim}
"""


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
