"""Model cards: what a registered version is, on what data, how good, and what it cannot show;
written from the tags and metrics of the study run it came from. :func:`write_card` for the
softmax models (Markdown + JSON, logged on the run and shown on the registry page),
:func:`fuzzy_card` for the fuzzy head (shipped inside the model). Both take their warnings
from :func:`limitations`."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from dtl.fuzzy.report import verdict
from dtl.tracking import schema
from dtl.tracking.adapter import Tracking
from dtl.tracking.policy import Policy
from dtl.tracking.resolve import model_artifacts


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
        "backbone": t.get(schema.BACKBONE), "classes": classes, "input": spec.get("input", {}),
        "input_format": "column 'image': base64 image bytes, raw bytes or an H×W×3 uint8 RGB array, any size "
                        "(resized and centre-cropped inside the model); file paths only in local Python with "
                        "model_config={'allow_paths': True}, never over REST",
        "data": {"phase2": {"kind": t.get(schema.DATA_KIND), "digest": t.get(schema.DATA_DIGEST),
                            "split_protocol": t.get(schema.SPLIT_PROTOCOL),
                            "duplicates_removed": mv.tags.get(schema.DUPLICATES_REMOVED)},
                 "phase1": {"digest": mv.tags.get(schema.PHASE1_DATA_DIGEST), "kind": mv.tags.get(schema.PHASE1_DATA_KIND),
                            "split_protocol": mv.tags.get(schema.PHASE1_SPLIT_PROTOCOL)}},
        "metrics": metrics,
        "probabilities": _calibration(client, mv),
        "policy": {"metric": policy.metric, "direction": policy.direction, "min_value": policy.min_value},
        "lineage": {"phase1_run": mv.tags.get(schema.PHASE1_RUN), "phase2_run": mv.run_id, "study": t.get(schema.STUDY),
                    "git_commit": t.get(schema.GIT_COMMIT), "init": t.get(schema.INIT),
                    "strategy": t.get(schema.STRATEGY), "previous_champion": mv.tags.get(schema.PREVIOUS_CHAMPION),
                    "model_uri": mv.source},
        "limitations": limitations(t) + baseline_limitation(mv.tags),
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


def limitations(tags: dict) -> list[str]:
    """What the card must warn about, from the study run's own tags (split protocol, CI unit)."""
    protocol = tags.get(schema.SPLIT_PROTOCOL, "unknown")
    unit = tags.get(schema.CI_UNIT_PREFIX + "test", "image")
    out = []
    if protocol != "patient-level":
        out.append(f"The phase-2 data has no patient IDs: the split is {protocol} (images of one patient may be on "
                   "both sides), so test metrics are optimistic.")
    out.append("Trained on images from the sources named above; other stains, scanners and hospitals may differ.")
    out.append(f"Confidence intervals are bootstrap intervals resampling {CI_UNITS.get(unit, unit)}"
               + ("." if unit == "patient" else ", not patients."))
    return out


def baseline_limitation(version_tags: dict) -> list[str]:
    """The card's line on the shortcut baseline (from the version's tags; none for versions from
    before the baseline): the gap, and the flag where the gap's CI is not above 0."""
    gap = version_tags.get(schema.BASELINE_GAP)
    if not gap:
        return []
    flagged = version_tags.get(schema.BASELINE_FLAG) == "true"
    return [("FLAGGED: not shown to use more than global image statistics. " if flagged else "")
            + f"Test accuracy minus that of the strongest shortcut baseline of its data (global colour, "
              f"annotation-box or border statistics of the same input; run {version_tags.get(schema.BASELINE_RUN, '?')}): {gap} "
              "(paired bootstrap 95% CI)" + ("." if not flagged else ": the CI is not above 0.")]


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


def fuzzy_card(name: str, backbone: str, src, params: dict, results: dict, ds, coverage: float,
               floor: float) -> str:
    """What the registered fuzzy model is, in plain words, with its test comparison."""
    t = results["test"]
    d = t["diff"]["macro_f1"]
    return f"""# {name}: fuzzy Mamdani head on {backbone} (research use only, NOT for diagnosis)

**What it is.** The phase-2 double-transfer network `{backbone}` ({src.label}, phase-2 study run
`{src.run_id}`) up to the pooled output of its head block, followed by a Mamdani fuzzy inference
system instead of the last linear layer: PCA to k={params['k']} dims (fitted on train
only), fuzzy c-means with {params['n_clusters']} clusters (fuzzifier m={params['m']:.2f}), one
Gaussian membership function per cluster and dimension, one rule per cluster
("IF z1 is A_1j AND ... THEN class c is HIGH/LOW" with weights from the cluster/class
co-occurrence on train), {params['tnorm']} t-norm, max aggregation, centroid defuzzification.
Hyperparameters tuned by Optuna on the validation macro-F1.

**Input / output.** Column `image` (path, base64 bytes, raw bytes or H×W×3 uint8 RGB, any size;
the backbone's own preprocessing inside). Out: `class`, `p_<class>` (normalised crisp outputs,
not calibrated probabilities), `firing_strength` (strongest rule activation, 0–1; low means the
input is unlike the training data: abstain). {coverage:.1%} of the training images fire a rule at ≥ {floor:.3g}.

**Test ({ds.kind}, {ds.protocol} split, n={t['n']}).** accuracy fuzzy {t['fuzzy']['accuracy']:.4f} vs softmax
{t['softmax']['accuracy']:.4f}; macro-F1 {t['fuzzy']['macro_f1']:.4f} vs {t['softmax']['macro_f1']:.4f}
(difference {d['diff']:+.4f}, paired bootstrap 95% CI {d['ci_low']:+.4f} to {d['ci_high']:+.4f}: {verdict(d)}).
AUROC for detecting errors: firing strength {t['fuzzy']['abstain_auroc']:.3f}, softmax max-probability
{t['softmax']['abstain_auroc']:.3f}.

**Limitations.** {" ".join(limitations({**src.tags, schema.CI_UNIT_PREFIX + "test": "image"}))} The fuzzy head is only as good as the
features of the network below it.
"""
