"""Promotion by policy (aliases): a pure selection function (:func:`select`) over the registered
versions, then one alias move. The champion never moves to a candidate that is worse on the
policy metric than the current champion over the same data digest, unless forced; the previous
champion is recorded in a tag; rerunning on the same runs creates no new versions. The card of
the promoted version is :mod:`dtl.tracking.cards`; logging and registration are
:mod:`dtl.tracking.registry`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dtl.evaluation.metrics import direction
from dtl.tracking import schema
from dtl.tracking.adapter import Tracking
from dtl.tracking.cards import write_card
from dtl.tracking.policy import Policy

CARDS_DIR = Path("registry/cards")


# What "trained on the same data" means for versions (their tags): same files and split, same preprocessing.
DATA_KEYS = (schema.DATA_DIGEST, schema.SPLIT_PROTOCOL, schema.ANNOTATION_MASK)


def same_data(tags: dict) -> dict:
    """A ``filter_tags`` for :func:`promote`: the versions trained on the data of a version with ``tags``."""
    return {k: tags[k] for k in DATA_KEYS if k in tags}


@dataclass(frozen=True)
class Candidate:
    version: str
    metrics: dict
    data_digest: str = ""
    synthetic: bool = False  # trained on the built-in demo data
    protocol: str = ""  # split protocol
    mask: str = ""  # annotation masking on/off
    calibrated_from: str = ""  # the version this one is the temperature-scaled copy of

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

    def to_json(self) -> str:
        return json.dumps({"champion": self.champion, "challenger": self.challenger, "moved": self.moved,
                           "reason": self.reason, "ranked": self.ranked}, indent=2)


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

    # a calibrated copy supersedes its source: the same model with better probabilities, never both
    superseded = {c.calibrated_from for c in candidates if c.calibrated_from and eligible(c)}
    pool = sorted((c for c in candidates if eligible(c) and c.version not in superseded),
                  key=lambda c: _key(c, policy), reverse=True)
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
    if best.calibrated_from == current.version:
        why = f"the temperature-scaled copy of champion v{current.version}"
    if force and same_data and _key(best, policy)[:-1] < _key(current, policy)[:-1]:
        why = "forced"
    return Decision(best.version, runner if runner != best.version else None, True, why, ranked)


def candidates(tracking: Tracking, name: str, filter_tags: dict | None = None) -> list[Candidate]:
    """The versions promotion chooses from: one per source (a concurrent duplicate that its job has
    not deleted yet is never chosen)."""
    out, seen = [], set()
    for v in sorted(tracking.client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        if filter_tags and any(v.tags.get(k) != str(val) for k, val in filter_tags.items()):
            continue
        src = v.tags.get(schema.SOURCE)
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
    metrics = {k[len(schema.METRIC_PREFIX):]: float(x) for k, x in mv.tags.items() if k.startswith(schema.METRIC_PREFIX)}
    return Candidate(str(mv.version), metrics, mv.tags.get(schema.DATA_DIGEST, ""),
                     mv.tags.get(schema.DATA_KIND, "").startswith("demo"), mv.tags.get(schema.SPLIT_PROTOCOL, ""),
                     mv.tags.get(schema.ANNOTATION_MASK, ""), mv.tags.get(schema.CALIBRATED_FROM, ""))


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


