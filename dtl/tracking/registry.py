"""Model logging, registration and promotion by policy (aliases); the cards are :mod:`dtl.tracking.cards`.

Promotion = a pure selection function (:func:`select`) + registration + one alias move. The
champion never moves to a candidate that is worse on the policy metric than the current
champion over the same data digest, unless forced; the previous champion is recorded in a
tag; rerunning on the same runs creates no new versions.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.models import Model

from dtl.evaluation.metrics import direction
from dtl.model.preprocess import InputSpec
from dtl.tracking import schema
from dtl.tracking.adapter import Run, Tracking
from dtl.tracking.cards import write_card
from dtl.tracking.logged import SOFTMAX_FLAVOR
from dtl.tracking.policy import Policy
from dtl.train.weights import model_from_checkpoint

CARDS_DIR = Path("registry/cards")


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


