"""The explain job (``dtl explain``): what a model looks at, whether it survives other images,
and whether its probabilities are honest, for any registered model or study run.

One MLflow run nested under the model's study run (``dtl.role = explain``) holds the metrics,
the robustness table, the CAM grid, the shortcut table, the reliability diagram and the
per-item predictions of every evaluated set; the same files go to the report folder. The
temperature fitted on the validation split is stored, when asked or by default when the version
holds the ``champion`` alias, in a new logged model and version (``calibrated_from`` the explained
one, which never changes; ``dtl/calibration.json``); the aliases then move by the promotion policy
and the champion's card says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml

from dtl import DTLError
from dtl.config import Config
from dtl.evaluation import calibration, robustness
from dtl.evaluation.metrics import expected_calibration_error
from dtl.evaluation.stats import bootstrap_ci
from dtl.explain import core as explain
from dtl.model.mask import annotation_mask, apply_mask
from dtl.model.preprocess import prepare
from dtl.model.pyfunc import CALIBRATION_FILE, ImageClassifier
from dtl.report.tables import html_page, markdown_table
from dtl.tracking import schema
from dtl.tracking.access import check_write_access
from dtl.tracking.adapter import Run, Tracking, command_line, connect, ended, mark_outer, start_run
from dtl.tracking.policy import load_policy
from dtl.tracking.promotion import promote, same_data
from dtl.tracking.registry import register_calibrated
from dtl.tracking.resolve import Resolved, resolve
from dtl.train.phases import bootstrap_units, dataset, preprocessing_of


@dataclass
class Summary:
    """One model's explain results: what ``summary.json`` holds, what the report section reads
    back, and what the CLI prints. ``rows`` are the robustness table's rows (one dict per set),
    ``shortcut`` the Grad-CAM shortcut table's (one per true class, then ``all``)."""

    label: str
    backbone: str
    strategy: str
    split: str
    n: int
    rows: list
    mean_relative: dict
    shortcut: list
    calibration: dict
    classes: list = field(default_factory=list)  # summaries written before the class list: sorted labels
    phase: str = ""
    masked: str = "off"
    split_protocol: str | None = None
    ci_unit: str = "image"
    bootstrap: int = 0
    data: str = ""
    flagged: bool = False
    threshold: float = 0.0
    cam_layer: str = ""
    temperature_stored: bool = False
    temperature_not_stored: str = ""
    command: str = ""
    model_run: str = ""
    version: str = ""
    corruption_note: str = ""
    preprocessing: str = ""  # the study's colour / segmentation / stain-augmentation label ('' in summaries before it)

    @property
    def shortcut_all(self) -> dict:
        """The shortcut table's row over all classes."""
        return self.shortcut[-1]

    def to_dict(self) -> dict:
        return {**asdict(self), "shortcut_all": self.shortcut_all}  # shortcut_all: kept for readers of older files

    @classmethod
    def from_dict(cls, d: dict) -> Summary:
        """A ``summary.json`` of any version (keys it does not know are ignored)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class Result:
    """What ``dtl explain`` did: the summary, its MLflow run and the folder of its files."""

    summary: Summary
    run_id: str
    out: str

    def text(self) -> str:
        s = self.summary
        pre = "" if s.preprocessing == "default" else f", {s.preprocessing}"
        return "\n".join([f"explain {s.label} ({s.backbone}, {s.strategy}{pre}) on {s.split} (n={s.n}):", *summary_text(s),
                          f"logged to run {self.run_id} (under study run {s.model_run}); written to {self.out}/"])


def check_data(target: Resolved, ds, split: str) -> None:
    """The config's data must be the model's (same manifest digest) and hold ``split``."""
    digest = target.tags.get(schema.DATA_DIGEST, "")
    if digest and digest != ds.digest:
        raise DTLError(f"{target.label} was trained on {target.phase} data {digest[:12]}; the config's {target.phase} "
                       f"data is {ds.digest[:12]} ({ds.kind} at {ds.root}): use the same --config / data root as "
                       "its training run")
    if list(target.classifier.classes) != ds.classes:
        raise DTLError(f"{target.label} predicts {target.classifier.classes}, the data has {ds.classes}")
    splits = sorted(ds.manifest["split"].unique())
    if split not in splits:
        raise DTLError(f"--split {split!r} does not exist in {ds.kind} at {ds.root}; valid: {', '.join(splits)}")
    if "val" not in splits:
        raise DTLError(f"{ds.kind} at {ds.root} has no validation split: the temperature is fitted on val "
                       "(set data.val_fraction > 0, or val_dir for pre-split data)")
    if split == "val":
        raise DTLError("--split val: the temperature is fitted on val, so its calibration there would be in-sample; "
                       f"explain a held-out split ({', '.join(x for x in splits if x not in ('train', 'val'))})")


def probs_of(clf: ImageClassifier, images: list[np.ndarray]) -> np.ndarray:
    """Untempered softmax probabilities through the model's own preprocessing."""
    return calibration.softmax(clf.logits(images))


def stress(cfg: Config, clf: ImageClassifier, ds, split: str, raw: list[np.ndarray], clean: np.ndarray) -> tuple:
    """The robustness rows (clean, cross-variant, each corruption × severity, masked annotation)
    and per-item predicted classes of each evaluated set (for paired comparisons across models)."""
    y, (_, groups) = ds.label_ids(split), bootstrap_units(ds.split(split))
    nb, seed = cfg.bootstrap, cfg.seed

    def g(idx):
        return None if groups is None else groups[idx]

    rows = [robustness.score_row("clean", y, clean, clean, groups, nb, seed, kind="clean", severity=0,
                                 reference="clean")]
    preds = {"clean": clean.argmax(1)}
    ov = robustness.other_variant(ds, split)
    if ov.reason:
        rows.append({"set": "cross-variant", "kind": "cross-variant", "note": f"skipped: {ov.reason}"})
    else:
        other = probs_of(clf, robustness.read_images(ov.root, ds.split(split)["path"].iloc[ov.index]))
        rows.append(robustness.score_row(f"cross-variant ({ov.variant})", y[ov.index], other, clean[ov.index],
                                         g(ov.index), nb, seed, kind="cross-variant", severity=0, reference="clean"))
        preds["cross_variant"] = _scatter(len(y), ov.index, other.argmax(1))
    idx = robustness.subsample(len(y), cfg.explain.corruption_images, seed)
    sub = [raw[i] for i in idx]
    for kind in robustness.KINDS:
        for sev in robustness.SEVERITIES:
            p = probs_of(clf, robustness.corrupt_all(sub, kind, sev, seed))
            rows.append(robustness.score_row(f"{kind} {sev}", y[idx], p, clean[idx], g(idx), nb, seed, kind=kind,
                                             severity=sev, reference="clean"))
            preds[f"{kind}{sev}"] = _scatter(len(y), idx, p.argmax(1))
    rows.append(occlusion(cfg, clf, ds, y, raw, groups))
    return rows, preds


def _scatter(n: int, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.full(n, -1)
    out[idx] = values
    return out


def occlusion(cfg: Config, clf: ImageClassifier, ds, y: np.ndarray, raw: list[np.ndarray], groups) -> dict:
    """Predictions with the annotation box filled against the raw image, both through the model's
    preprocessing WITHOUT its own mask (a masked model then sees the stamp it never saw in
    training; an unmasked model shows whether it relies on it)."""
    if ds.kind not in ("aria", "demo-aria"):
        return {"set": "annotation masked vs unmasked", "kind": "occlusion",
                "note": f"skipped: {ds.kind} images carry no annotation stamp"}
    variant = "segmented" if Path(ds.root).name == "Segmented" else "original"
    mask = clf.spec.mask or annotation_mask("on", ds.kind, variant)
    bare = ImageClassifier(clf.net, clf.classes, replace(clf.spec, mask=None), clf.segment, clf.batch_size)
    unmasked = probs_of(bare, raw)
    masked = probs_of(bare, [apply_mask(im, mask) for im in raw])
    return robustness.score_row("annotation masked vs unmasked", y, masked, unmasked, groups, cfg.bootstrap,
                                cfg.seed, kind="occlusion", severity=0, reference="unmasked input")


def calibrate(cfg: Config, y_val: np.ndarray, z_val: np.ndarray, y: np.ndarray, z: np.ndarray, split: str,
              groups) -> dict:
    """Temperature fitted on the validation logits only; ECE (with a bootstrap CI on ``split``)
    and reliability curves before and after, on val and on ``split``."""
    t = calibration.fit_temperature(z_val, y_val)
    out = {"temperature": t, "curves": {}, "val_errors": int((z_val.argmax(1) != y_val).sum())}
    for name, yy, zz in (("val", y_val, z_val), (split, y, z)):
        before, after = calibration.softmax(zz), calibration.softmax(zz, t)
        out["curves"][name] = {"before": calibration.reliability(yy, before),
                               "after": calibration.reliability(yy, after)}
        out[f"{name}_ece_before"] = out["curves"][name]["before"]["ece"]
        out[f"{name}_ece_after"] = out["curves"][name]["after"]["ece"]
        out[f"{name}_argmax_unchanged"] = bool((before.argmax(1) == after.argmax(1)).all())
    for key, probs in (("before", calibration.softmax(z)), ("after", calibration.softmax(z, t))):
        ci = bootstrap_ci(y, probs, lambda a, b: {"ece": expected_calibration_error(a, b)},
                          cfg.bootstrap, cfg.seed, groups)["ece"]
        out[f"{split}_ece_{key}_ci_low"], out[f"{split}_ece_{key}_ci_high"] = ci
    return out


def cams(cfg: Config, clf: ImageClassifier, ds, split: str, raw: list[np.ndarray], probs: np.ndarray,
         title: str) -> tuple[list[dict], pd.DataFrame, object]:
    """Grad-CAM of the predicted class on the split's images as the model sees them: the
    shortcut table, per-image mass shares, and the grid of correct/wrong examples per class."""
    y, pred = ds.label_ids(split), probs.argmax(1)
    ex = explain.pick_examples(y, pred, len(clf.classes), cfg.explain.n_per_class)
    idx = robustness.subsample(len(y), cfg.explain.cam_images, cfg.seed)
    idx = np.union1d(idx, [i for e in ex.values() for v in e.values() for i in v]).astype(int)  # the grid's too
    s, off = clf.spec.size, (clf.spec.cache_size - clf.spec.size) // 2
    inputs = np.stack([_model_input(clf, raw[i])[off:off + s, off:off + s] for i in idx])
    x = clf.preprocess([raw[i] for i in idx])
    maps = explain.grad_cams(clf.net, x, pred[idx])
    regions = explain.region_maps(clf.spec)
    shares = explain.mass_shares(maps, cell_maps(clf, [raw[i] for i in idx], inputs), regions)
    table = explain.shortcut_table(shares, y[idx], clf.classes, cfg.explain.annotation_threshold)
    per_image = pd.DataFrame({"path": ds.split(split)["path"].to_numpy()[idx], "label": np.asarray(clf.classes)[y[idx]],
                              "predicted": np.asarray(clf.classes)[pred[idx]], **{k: v for k, v in shares.items()}})
    pos = {int(i): j for j, i in enumerate(idx)}
    ex_local = {c: {k: [pos[i] for i in v] for k, v in e.items()} for c, e in ex.items()}
    fig = explain.cam_grid_figure(inputs, maps, y[idx], probs[idx], clf.classes, ex_local, cfg.explain.n_per_class,
                                  title, regions["annotation"])
    return table, per_image, fig


def cell_maps(clf: ImageClassifier, raw: list[np.ndarray], inputs: np.ndarray) -> np.ndarray:
    """Where the stained cells are on each model input (``inputs``, cropped as the CAMs): the HSV
    rule on the input itself, or, where the input is greyscale or stain-normalised, on the same
    image preprocessed in its raw colour (on a greyscale input the rule finds no cell at all)."""
    if clf.spec.colour == "raw":
        return explain.foreground_maps(inputs)
    s, off = clf.spec.size, (clf.spec.cache_size - clf.spec.size) // 2
    spec = replace(clf.spec, colour="raw")
    return explain.foreground_maps(np.stack([prepare(im, spec, clf.segment)[off:off + s, off:off + s] for im in raw]))


def _model_input(clf: ImageClassifier, im: np.ndarray) -> np.ndarray:
    return prepare(im, clf.spec, clf.segment)


def _ci(r: dict, m: str, signed: bool = False) -> str:
    f = "{:+.4f}" if signed else "{:.4f}"
    v, lo, hi = r.get(m), r.get(f"{m}_ci_low"), r.get(f"{m}_ci_high")
    if v is None or v != v:
        return ""
    return f.format(v) + (f" [{f.format(lo)}, {f.format(hi)}]" if lo is not None and lo == lo else "")


def robustness_frame(rows: list[dict]) -> pd.DataFrame:
    """The robustness table as shown (Markdown / HTML): one row per evaluated set."""
    out = []
    for r in rows:
        out.append({"set": r["set"], "n": r.get("n", ""), "accuracy [95% CI]": _ci(r, "accuracy"),
                    "macro-F1 [95% CI]": _ci(r, "macro_f1"), "vs": r.get("reference", ""),
                    "Δaccuracy [95% paired CI]": _ci(r, "d_accuracy", True),
                    "ΔF1 [95% paired CI]": _ci(r, "d_macro_f1", True),
                    "relative accuracy": f"{r['relative_accuracy']:.3f}" if "relative_accuracy" in r else "",
                    "agreement": f"{r['agreement']:.3f}" if "agreement" in r else "", "note": r.get("note", "")})
    return pd.DataFrame(out)


def summary_text(s: Summary) -> list[str]:
    """Plain-words lines of one model's explain results (the Markdown page and the CLI)."""
    rows = {r["kind"]: r for r in s.rows if r.get("severity", 0) == 0}
    lines = []
    cv, occ = rows.get("cross-variant", {}), rows.get("occlusion", {})
    lines.append(f"- Cross-variant: {cv['note']}" if cv.get("note") else
                 f"- {cv['set'].capitalize()}: accuracy {cv['accuracy']:.4f}, change vs clean "
                 f"{_ci(cv, 'd_accuracy', True)} on n={cv['n']} (paired bootstrap over {s.ci_unit}s).")
    mr = s.mean_relative
    if mr:
        worst = min((k for k in mr if k != "mean"), key=mr.get)
        lines.append(f"- Corruptions (3 severities each{s.corruption_note}): mean relative accuracy "
                     f"{mr['mean']:.3f} (1 = as clean); worst: {robustness.LABELS[worst]} ({mr[worst]:.3f}).")
    lines.append(f"- Occlusion: {occ['note']}" if occ.get("note") else
                 f"- Occlusion (annotation box filled vs raw image, model's own mask off): agreement "
                 f"{occ['agreement']:.3f}, accuracy change {_ci(occ, 'd_accuracy', True)}.")
    sc = next(r for r in s.shortcut if r["class"] == "all")
    flagged = [r["class"] for r in s.shortcut if r["flagged"]]
    lines.append(f"- Grad-CAM mass ({s.cam_layer}, {sc['n']} images): {sc['foreground']:.1%} on the cells "
                 f"(area {sc['foreground_area']:.1%}), {sc['annotation']:.1%} on the annotation box (area "
                 f"{sc['annotation_area']:.1%}), {sc['corners']:.1%} on the four corners (area {sc['corners_area']:.1%}). "
                 + (f"FLAGGED: annotation mass above {s.threshold:g}x its area share for {', '.join(flagged)}."
                    if flagged else f"Not flagged (ratio {sc['annotation_ratio']:.2f}; threshold: mass share above "
                                    f"{s.threshold:g}x the box's area share)."))
    c, sp = s.calibration, s.split
    lines.append(f"- Calibration: temperature T={c['temperature']:.3f} fitted on val; ECE val {c['val_ece_before']:.4f} → "
                 f"{c['val_ece_after']:.4f}, {sp} {c[f'{sp}_ece_before']:.4f} → {c[f'{sp}_ece_after']:.4f} "
                 f"(95% CI after {c[f'{sp}_ece_after_ci_low']:.4f}–{c[f'{sp}_ece_after_ci_high']:.4f}); predicted "
                 f"classes unchanged: {c[f'{sp}_argmax_unchanged']}. Stored with the model: {s.temperature_stored}"
                 + (f" ({s.temperature_not_stored})." if s.temperature_not_stored else "."))
    return lines


def write_pages(out: Path, s: Summary, frame: pd.DataFrame, shortcut: pd.DataFrame) -> None:
    """robustness.md / robustness.html / robustness.csv and shortcut.csv in ``out``."""
    head = (f"# Explain and stress: {s.label} ({s.backbone}, {s.strategy}, {s.phase}, annotation mask "
            f"{s.masked})\n\n{s.data}; split `{s.split}` (n={s.n}); 95% CIs are bootstrap intervals "
            f"resampling {s.ci_unit}s ({s.bootstrap} resamples), Δ = set − reference on the same items.\n")
    body = ["", *summary_text(s), "", "## Robustness", "", markdown_table(frame), "## Grad-CAM shortcut score", "",
            f"Share of Grad-CAM mass per true class (the `_area` columns: share of the pixels); flagged when the "
            f"annotation mass share exceeds {s.threshold:g}× its area share (`annotation_ratio`).", "", markdown_table(shortcut), "## Figures", "",
            "![CAM grid](cam_grid.png)", "", "![reliability](reliability.png)", "", "## Command", "", "```",
            s.command, "```", ""]
    (out / "robustness.md").write_text(head + "\n".join(body))
    frame.to_csv(out / "robustness.csv", index=False)
    shortcut.to_csv(out / "shortcut.csv", index=False)
    figs = {n: (out / n).read_bytes() for n in ("cam_grid.png", "reliability.png") if (out / n).exists()}
    (out / "robustness.html").write_text(html_page(f"explain {s.label}", head + "\n".join(body), figs))


def store_temperature(tracking: Tracking, cfg: Config, target: Resolved, calib: dict, split: str) -> tuple[bool, str]:
    """Register the temperature-scaled model as a new logged model and version (``calibrated_from``
    the explained one, which never changes), move the aliases by the promotion policy and write the
    champion's card; returns (stored, why not / where). Only for registered versions
    (``explain.store_temperature`` on, or auto and the version is the champion) whose logged code
    applies a stored temperature, and only for a T the validation split can support."""
    mode, mv = cfg.explain.store_temperature, target.version
    if mv is None or target.model_id is None or mode == "off" or (mode == "auto" and "champion" not in mv.aliases):
        return False, "not a registered champion (explain.store_temperature=auto)" if mode == "auto" else f"mode {mode}"
    if mv.tags.get(schema.CALIBRATED_FROM):
        return False, f"v{mv.version} is already the calibrated copy of v{mv.tags[schema.CALIBRATED_FROM]}"
    if not _applies_temperature(tracking, target.model_id):
        return False, ("the logged model predates temperature support (its bundled code would ignore T): log it "
                       "again (retrain, or rerun `dtl main`) to serve scaled probabilities")
    if not calibration.supported(calib["temperature"], calib["val_errors"]):
        return False, (f"T={calib['temperature']:.3g} fitted on {calib['val_errors']} validation errors is not "
                       "supported by the data (near the search bound, or val is error-free)")
    doc = {"temperature": calib["temperature"], "fitted_on": "val", "val_ece_before": calib["val_ece_before"],
           "val_ece_after": calib["val_ece_after"], f"{split}_ece_before": calib[f"{split}_ece_before"],
           f"{split}_ece_after": calib[f"{split}_ece_after"]}
    scaled = {"val_ece": calib["val_ece_after"], f"{split}_ece": calib[f"{split}_ece_after"],
              **{f"{split}_ece_ci_{b}": calib[f"{split}_ece_after_ci_{b}"] for b in ("low", "high")
                 if f"{split}_ece_after_ci_{b}" in calib}}
    version = register_calibrated(tracking, mv, target.model_id, {f"dtl/{CALIBRATION_FILE}": json.dumps(doc, indent=2)},
                                  calib["temperature"], scaled)
    # among the explained version's own data only (digest, split protocol, masking), as `dtl main` promotes
    d = promote(tracking, load_policy(cfg.policy, mv.name), filter_tags=same_data(mv.tags), cards_dir=Path(cfg.cards_dir))
    return True, f"as {mv.name} v{version}, calibrated_from v{mv.version}; champion v{d.champion}"


def _applies_temperature(tracking: Tracking, model_id: str) -> bool:
    """Whether a logged model's pyfunc was saved by code that applies a stored temperature: its
    MLmodel then lists ``apply_temperature`` in the pyfunc flavor's config (MLflow loads the model's
    bundled copy of dtl, so an older model ignores a calibration file)."""
    loc = tracking.client.get_logged_model(model_id).artifact_location
    mlmodel = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{loc}/MLmodel")).read_text())
    return "apply_temperature" in (mlmodel.get("flavors", {}).get("python_function", {}).get("config") or {})


def log_results(run: Run, s: Summary, out: Path) -> None:
    """Metrics (``explain_*``, per set) and every file of ``out`` under ``explain/`` of the run."""
    m = {"temperature": s.calibration["temperature"], "cam_annotation_share": s.shortcut_all["annotation"],
         "cam_foreground_share": s.shortcut_all["foreground"], "cam_corners_share": s.shortcut_all["corners"],
         "shortcut_flagged": float(s.flagged), **{f"mean_relative_accuracy_{k}": v
                                                      for k, v in s.mean_relative.items()}}
    m.update({k: v for k, v in s.calibration.items() if "_ece_" in k})
    for r in s.rows:
        if "accuracy" in r:
            key = r["set"].split(" (")[0].replace(" ", "_").replace("-", "_")
            m.update({f"{key}_{k}": r[k] for k in ("accuracy", "macro_f1", "d_accuracy", "d_accuracy_ci_low",
                                                   "d_accuracy_ci_high", "relative_accuracy", "agreement")})
    run.log_metrics(m)
    for f in sorted(out.iterdir()):
        run.log_artifact(f, "explain")


def explain_job(cfg: Config, model: str = "", split: str = "test", out: str = "") -> Result:
    """``dtl explain``: ``model`` (default: the registered champion) on ``split``, files under ``out``
    (default: ``<report_dir>/explain``)."""
    tracking = connect(cfg.tracking_uri, cfg.experiment)
    check_write_access(tracking, stops="Nothing was explained.")  # its runs (and a stored T) need EDIT
    r = run_explain(cfg, tracking, model or f"models:/{cfg.registered_model}@champion", split,
                    Path(out or Path(cfg.report_dir) / "explain"), command=command_line())
    mark_outer(tracking, schema.Role.EXPLAIN_JOB)
    return r


def run_explain(cfg: Config, tracking: Tracking, source: str, split: str, out_root: Path, command: str = "") -> Result:
    """Explain and stress one model (see module docstring)."""
    target = resolve(tracking, cfg, source, apply_temperature=False)  # explain fits its own T on raw logits
    ds = dataset(cfg, target.phase)
    check_data(target, ds, split)
    clf, t = target.classifier, target.tags
    raw = robustness.read_images(ds.root, ds.split(split)["path"])
    z = clf.logits(raw)
    z_val = clf.logits(robustness.read_images(ds.root, ds.split("val")["path"]))
    unit, groups = bootstrap_units(ds.split(split))
    probs = calibration.softmax(z)
    rows, preds = stress(cfg, clf, ds, split, raw, probs)
    calib = calibrate(cfg, ds.label_ids("val"), z_val, ds.label_ids(split), z, split, groups)
    name = target.label.replace("models:/", "").replace("/", "-v").replace("@", "-").replace(":", "-")
    out = Path(out_root) / name
    out.mkdir(parents=True, exist_ok=True)
    layer = explain.target_layer(clf.net)[0]
    title = f"{target.label}: {clf.net.spec.backbone} ({t.get(schema.STRATEGY, '?')}), Grad-CAM at {layer}, {split} split"
    shortcut, per_image, fig = cams(cfg, clf, ds, split, raw, probs, title)
    _save(fig, out / "cam_grid.png")
    _save(calibration.reliability_figure({k: {"before scaling": v["before"], f"T={calib['temperature']:.2f}": v["after"]}
                                          for k, v in calib["curves"].items()},
                                         f"{target.label}: reliability ({clf.net.spec.backbone})"), out / "reliability.png")
    items = ds.split(split)[["path", "label"]].assign(bootstrap_unit=groups if groups is not None else
                                                      ds.split(split)["path"], **preds)
    items.to_csv(out / "predictions.csv", index=False)
    per_image.to_csv(out / "cam_shares.csv", index=False)
    stored, why_not = store_temperature(tracking, cfg, target, calib, split)
    s = Summary(label=target.label, backbone=clf.net.spec.backbone, strategy=t.get(schema.STRATEGY, ""),
                classes=list(clf.classes), phase=target.phase, masked=t.get(schema.ANNOTATION_MASK, "off"),
                split_protocol=t.get(schema.SPLIT_PROTOCOL), preprocessing=preprocessing_of(t, tracking.client.get_run(target.run_id).data.params),
                split=split, n=len(raw), ci_unit=unit,
                bootstrap=cfg.bootstrap, rows=rows,
                data=f"{ds.kind} data at {ds.root} ({ds.protocol} split, digest {ds.digest[:12]})",
                mean_relative=robustness.mean_relative(rows), shortcut=shortcut,
                flagged=any(r["flagged"] for r in shortcut), threshold=cfg.explain.annotation_threshold,
                cam_layer=layer, calibration={k: v for k, v in calib.items() if k != "curves"},
                temperature_stored=stored, temperature_not_stored=why_not, command=command, model_run=target.run_id,
                version=f"{target.version.name}/{target.version.version}" if target.version else "",
                corruption_note=(f"; on a seeded subsample of {cfg.explain.corruption_images} images"
                                 if 0 < cfg.explain.corruption_images < len(raw) else ""))
    write_pages(out, s, robustness_frame(rows), pd.DataFrame(shortcut))
    (out / "summary.json").write_text(json.dumps(s.to_dict(), indent=2, default=str))
    run = start_run(tracking, f"explain-{split}", {
        schema.ROLE: schema.Role.EXPLAIN, schema.PHASE: target.phase, schema.BACKBONE: s.backbone,
        schema.STRATEGY: s.strategy, schema.ANNOTATION_MASK: s.masked, schema.DATA_DIGEST: ds.digest,
        schema.SPLIT: split, schema.MODEL: target.label, schema.MODEL_VERSION: s.version,
        schema.SHORTCUT_FLAGGED: str(s.flagged).lower()}, parent=target.run_id)
    with ended(run):  # a failure while logging ends the run FAILED, not RUNNING for ever
        log_results(run, s, out)
    return Result(s, run.id, str(out))


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt  # deferred: plotting, only when a figure is drawn

    fig.savefig(path, dpi=110)
    plt.close(fig)
