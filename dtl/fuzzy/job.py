"""The fuzzy-head job (``dtl fuzzy``): features of a phase-2 model -> Optuna study of the
Mamdani system on val -> one final comparison with the softmax head on the same test items
(in-distribution, cross-variant, corrupted) -> a logged and registered pyfunc model.

The fuzzy study is an MLflow run nested under the phase-2 study run it reads the model
from, with one nested run per trial; its Optuna study lives in the same storage as the
others (``load_if_exists``), so a rerun resumes and adds no trials once ``n_trials`` are done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import yaml
from mlflow.models import Model

from dtl import DTLError
from dtl.config import EXPERIMENTS_DIR, Config, flatten
from dtl.data.cache import BatchLoader
from dtl.evaluation import robustness
from dtl.evaluation.metrics import accuracy_macro_f1, point_metrics
from dtl.evaluation.stats import paired_difference
from dtl.fuzzy import core as fuzzy
from dtl.fuzzy.report import CORRUPTIONS, risk_coverage_figure
from dtl.model.fuzzy import FuzzySystem, features_and_probs
from dtl.model.mask import mask_state
from dtl.model.preprocess import InputSpec, eval_transform, prepare
from dtl.model.pyfunc import ImageClassifier
from dtl.tracking import schema
from dtl.tracking.access import check_write_access
from dtl.tracking.adapter import Run, Tracking, connect, end_orphans, find_run, find_runs, mark_outer, redact, start_run
from dtl.tracking.cards import fuzzy_card
from dtl.tracking.logged import FUZZY_FLAVOR
from dtl.tracking.registry import model_description, new_logged_model, register
from dtl.tracking.resolve import Resolved, resolve
from dtl.train.engine import resolve_device
from dtl.train.phases import dataset, loader
from dtl.train.tune import DEFAULT_STORAGE, create_or_load, make_storage, suggest

SPACE_KEYS = ("k", "n_clusters", "m", "tnorm")
COMPLETE = (optuna.trial.TrialState.COMPLETE,)  # the fuzzy study never prunes: completed trials count


def embed(net, images: np.ndarray | BatchLoader, spec: InputSpec, device, batch_size: int = 128):
    """Features and softmax probabilities of uint8 images (an array or a split's loader)."""
    ld = images if isinstance(images, BatchLoader) else BatchLoader(images, np.zeros(len(images)), batch_size,
                                                                     device, shuffle=False)
    net.eval()
    feats, probs = [], []
    for x_u8, _ in ld:
        f, p = features_and_probs(net, eval_transform(x_u8, spec))
        feats.append(f)
        probs.append(p)
    return np.concatenate(feats), np.concatenate(probs)


def macro_f1(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    return accuracy_macro_f1(y, np.eye(k)[pred])["macro_f1"]


def compare(y: np.ndarray, fz: tuple[np.ndarray, np.ndarray], sm: np.ndarray, n_boot: int, seed: int) -> dict:
    """Fuzzy vs softmax on the same items: point metrics, abstention metrics (firing strength
    vs max probability), paired bootstrap CIs of the accuracy and macro-F1 differences, and
    risk-coverage curves (50 points) for the figure."""
    probs, strength = fz
    k = sm.shape[1]
    out: dict = {"n": int(len(y))}
    for name, p, conf in (("fuzzy", probs, strength), ("softmax", sm, sm.max(1))):
        correct = p.argmax(1) == y
        m = point_metrics(y, p)
        m.update({key[len(name) + 1:]: v for key, v in fuzzy.abstention_metrics(correct, conf, name).items()})
        cov, risk = fuzzy.risk_coverage(correct, conf)
        pick = np.unique(np.linspace(0, len(cov) - 1, 50).astype(int))
        out[name] = {**m, "curve": [cov[pick].round(4).tolist(), risk[pick].round(4).tolist()]}
    out["diff"] = {
        "accuracy": paired_difference(y, probs.argmax(1), sm.argmax(1), lambda t, q: float((t == q).mean()),
                                     n_boot, seed),
        "macro_f1": paired_difference(y, probs.argmax(1), sm.argmax(1), lambda t, q: macro_f1(t, q, k), n_boot, seed),
    }
    return out


def flat_metrics(results: dict) -> dict[str, float]:
    """``{set}_{fuzzy|softmax}_{metric}`` and ``{set}_diff_{metric}`` (+ ``_ci_low/_ci_high``)."""
    out = {}
    for s, r in results.items():
        for head in ("fuzzy", "softmax"):
            out.update({f"{s}_{head}_{k}": v for k, v in r[head].items() if k != "curve"})
        for k, d in r["diff"].items():
            out[f"{s}_diff_{k}"], out[f"{s}_diff_{k}_ci_low"], out[f"{s}_diff_{k}_ci_high"] = \
                d["diff"], d["ci_low"], d["ci_high"]
    return out


def search_space(cfg: Config) -> dict:
    """The ``fuzzy`` block of the recipe's search-space file (the project's default file when
    that one has none), checked against the system's hyperparameters."""
    path = Path(cfg.tune.search_space)
    if not path.is_absolute() and not path.exists():
        path = EXPERIMENTS_DIR / path
    block = (yaml.safe_load(path.read_text()) or {}).get("fuzzy") if path.exists() else None
    if not block:
        path = EXPERIMENTS_DIR / "search_space.yaml"
        block = yaml.safe_load(path.read_text())["fuzzy"]
    bad = sorted(set(block) - set(SPACE_KEYS))
    if bad:
        raise DTLError(f"{path}: fuzzy keys {bad} are not fuzzy-head hyperparameters (valid: {list(SPACE_KEYS)})")
    return block


def study_name(parent_tags: dict) -> str:
    """``<phase-2 study>.fuzzy.t<trial>``: one fuzzy study per phase-2 model (its best trial)."""
    return f"{parent_tags[schema.STUDY]}.fuzzy.t{parent_tags.get(schema.CHECKPOINT_TRIAL) or parent_tags.get('best_trial', 0)}"


def _objective(cfg: Config, tracking: Tracking, run: Run, tags: dict, space: dict, data: dict, classes: list[str]):
    """An Optuna objective: fit on train features, score macro-F1 on val; one nested run per trial."""
    (xt, yt), (xv, yv) = data["train"], data["val"]

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space, 0)
        trun = start_run(tracking, f"trial-{trial.number}", {**tags, schema.ROLE: schema.Role.FUZZY_TRIAL,
                                                             schema.OPTUNA_TRIAL: trial.number, schema.OPTUNA_STATE: "RUNNING"},
                         parent=run.id)
        trial.set_user_attr("mlflow_run_id", trun.id)
        trun.log_params({f"trial.{k}": v for k, v in params.items()})
        try:
            t0 = time.perf_counter()
            fs = fuzzy.fit(xt, yt, classes, seed=cfg.seed, **params)
            fit_s = time.perf_counter() - t0
            probs, strength = fs.predict_proba(xv)
            m = point_metrics(yv, probs)
        except Exception as e:
            trun.set_tags({schema.OPTUNA_STATE: "FAIL", schema.FAIL_REASON: f"{type(e).__name__}: {str(e)[:400]}"})
            trun.end("FAILED")
            raise
        trun.log_metrics({"val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"], "val_ece": m["ece"],
                          "val_firing_median": float(np.median(strength)), "fit_s": fit_s})
        trun.set_tags({schema.OPTUNA_STATE: "COMPLETE"})
        trun.end("FINISHED")
        return m["macro_f1"]

    return objective


def _open_study(cfg: Config, tracking: Tracking, src: Resolved, ds, backbone: str) -> tuple:
    """The Optuna study (same storage as the phase studies) and its MLflow run, nested under
    the phase-2 study run; both found again on a rerun."""
    ptags = tracking.client.get_run(src.run_id).data.tags
    if ptags.get(schema.DATA_DIGEST) != ds.digest:
        raise DTLError(f"the phase-2 model of run {src.run_id} was trained on data {ptags.get(schema.DATA_DIGEST, '')[:12]}, "
                       f"the config's phase-2 data is {ds.digest[:12]} ({ds.kind} at {ds.root}): use the same "
                       "--config / --phase2-root as the run")
    name = study_name(ptags)
    url = cfg.tune.storage or DEFAULT_STORAGE
    study = create_or_load(name, make_storage(url, cfg.tune.heartbeat_s), "maximize", cfg.tune.sampler_seed,
                           "validation macro-F1 of the fuzzy head")
    tags = {schema.ROLE: schema.Role.FUZZY_STUDY, schema.STUDY: name, schema.PHASE: "fuzzy", schema.HEAD: "fuzzy",
            schema.BACKBONE: backbone, schema.STRATEGY: ptags.get(schema.STRATEGY), schema.INIT: ptags.get(schema.INIT),
            schema.DATA_DIGEST: ds.digest, schema.DATA_KIND: ds.kind, schema.SPLIT_PROTOCOL: ds.protocol,
            schema.ANNOTATION_MASK: ptags.get(schema.ANNOTATION_MASK), schema.PHASE2_RUN: src.run_id,
            schema.OPTUNA_STORAGE: redact(url)}
    run = find_run(tracking, {schema.STUDY: name})
    if run is None:
        run = start_run(tracking, f"fuzzy-{backbone}", tags, parent=src.run_id)
        run.log_params({**{f"fuzzy.{k}": v for k, v in flatten(cfg.fuzzy).items()}, "study": name,
                        "source": src.label, "seed": cfg.seed, "bootstrap": cfg.bootstrap})
    else:
        run.reopen()
    end_orphans(tracking, parent=run.id)
    return study, run, tags


def evaluate_sets(cfg: Config, ds, clf: ImageClassifier, fs: FuzzySystem, device) -> dict:
    """Fuzzy vs softmax on the test split, on the other Aria variant's images of the same test
    items (cross-variant) and on blurred / JPEG-compressed copies of the test images."""
    y, paths = ds.label_ids("test"), ds.split("test")["path"]
    ft, pt = embed(clf.net, loader(cfg, "phase2", "test", clf.spec, device, cfg.eval_batch_size, False), clf.spec, device)
    results = {"test": compare(y, fs.predict_proba(ft), pt, cfg.bootstrap, cfg.seed)}
    ov = robustness.other_variant(ds, "test") if cfg.fuzzy.cross_variant else None
    if ov is not None and not ov.reason:  # the same items in the other variant, raw, then the model's preprocessing
        f, p = embed(clf.net, _preprocessed(clf, robustness.read_images(ov.root, paths.iloc[ov.index])), clf.spec, device)
        results[ov.variant] = compare(y[ov.index], fs.predict_proba(f), p, cfg.bootstrap, cfg.seed)
    if cfg.fuzzy.corruptions:  # robustness' corruptions of the raw test images, as `dtl explain` applies them
        raw = robustness.read_images(ds.root, paths)
        for kind, severity in CORRUPTIONS:
            f, p = embed(clf.net, _preprocessed(clf, robustness.corrupt_all(raw, kind, severity, cfg.seed)), clf.spec,
                         device)
            results[f"{kind}_{severity}"] = compare(y, fs.predict_proba(f), p, cfg.bootstrap, cfg.seed)
    return results


def _preprocessed(clf: ImageClassifier, raw: list[np.ndarray]) -> np.ndarray:
    """Raw RGB images as the model's cache holds them: annotation mask, colour, segmentation, resize."""
    return np.stack([prepare(im, clf.spec, clf.segment) for im in raw])


def _finish(cfg: Config, tracking: Tracking, run: Run, src: Resolved, ds, best, data: dict, device) -> dict:
    """Refit the best system, evaluate it once against softmax, log and register the model."""
    clf, backbone = src.classifier, src.classifier.net.spec.backbone
    fs = fuzzy.fit(*data["train"], ds.classes, seed=cfg.seed, **best.params)
    coverage = float((fs.infer(data["train"][0])[1] >= fs.cover_floor * (1 - 1e-9)).mean())
    results = evaluate_sets(cfg, ds, clf, fs, device)
    run.log_metrics({**flat_metrics(results), "best_value": best.value, "train_coverage": coverage})
    run.log_dict({"backbone": backbone, "params": best.params, "best_trial": best.number, "best_value": best.value,
                  "train_coverage": coverage, "sets": results}, "fuzzy/comparison.json")
    run.log_text(fs.rules_text(), "fuzzy/rules.txt")
    run.log_figure(risk_coverage_figure(results, backbone), "fuzzy/risk_coverage.png")
    name = fuzzy_model_name(cfg)
    card = fuzzy_card(name, backbone, src, best.params, results, ds, coverage, fs.cover_floor)
    run.log_text(card, "fuzzy/model_card.md")
    meta = {"spec": clf.net.spec.to_dict(), "input": clf.spec.to_dict(), "hsv_segment": clf.segment,
            "head": "fuzzy", "fuzzy": best.params, "phase2_run": src.run_id}
    example = np.random.default_rng(0).integers(0, 255, (clf.spec.size, clf.spec.size, 3)).astype(np.uint8)
    params, model_tags = model_description({**run.client.get_run(run.id).data.tags, schema.BACKBONE: backbone})
    model_id = new_logged_model(run, f"{backbone}-fuzzy", {**best.params, **params},
                                {**model_tags, schema.HEAD: "fuzzy"}, model_type="image-classifier-fuzzy")
    info = Model.log(artifact_path=None, name=f"{backbone}-fuzzy", flavor=FUZZY_FLAVOR, model_id=model_id, net=clf.net,
                     meta=meta, system=fs, example_image=example, card=card)
    run.client.finalize_logged_model(model_id, "READY")
    clf.net.to(device)  # save_model moved it to the CPU
    t = results["test"]
    version = register(tracking, name, info.model_uri, run.id, {
        schema.HEAD: "fuzzy", schema.BACKBONE: backbone, schema.PHASE2_RUN: src.run_id, schema.DATA_DIGEST: ds.digest,
        schema.DATA_KIND: ds.kind, schema.SPLIT_PROTOCOL: ds.protocol,
        schema.VERSION_STUDY: run.client.get_run(run.id).data.tags[schema.STUDY],
        schema.METRIC_PREFIX + "val_macro_f1": round(best.value, 6),
        schema.METRIC_PREFIX + "test_accuracy": round(t["fuzzy"]["accuracy"], 6),
        schema.METRIC_PREFIX + "test_macro_f1": round(t["fuzzy"]["macro_f1"], 6)})
    tracking.client.update_model_version(name, version, description=card)
    tracking.client.update_registered_model(name, description="Fuzzy Mamdani heads on ALL double-transfer features "
                                                              "(research use only, not for diagnosis)")
    run.set_tags({schema.EVALUATED_TRIAL: best.number, schema.MODEL_URI: info.model_uri,
                  schema.REGISTERED: f"{name}/{version}"})
    return {"results": results, "registered": f"{name}/{version}", "model_uri": info.model_uri}


def fuzzy_model_name(cfg: Config) -> str:
    """The registered model of the fuzzy heads."""
    return cfg.fuzzy.registered_model or f"{cfg.registered_model}-fuzzy"


@dataclass
class FuzzyResult:
    """One fuzzy study: its MLflow run and Optuna study, the best validation macro-F1 and
    parameters, trial counts, the registered version and, when it was (re)fitted now, the test
    comparison with the softmax head per evaluated set (None when found finished and registered)."""

    run_id: str
    study: str
    backbone: str
    best_value: float
    best_params: dict
    counts: dict
    registered: str
    model_uri: str | None = None
    results: dict | None = None


def fuzzy_job(cfg: Config, source: str = "") -> list[FuzzyResult]:
    """``dtl fuzzy``: the fuzzy study of ``source``, or of the latest double-transfer phase-2 study
    per backbone on the config's phase-2 data and masking; one result per source."""
    tracking = connect(cfg.tracking_uri, cfg.experiment)
    check_write_access(tracking, fuzzy_model_name(cfg))
    d2 = dataset(cfg, "phase2")
    mask = mask_state(cfg.phase2.data.mask_annotation, d2.kind, cfg.phase2.data.variant)
    sources = [source] if source else phase2_studies(tracking, d2.digest, mask=mask)
    if not sources:
        raise DTLError("no finished double-transfer phase-2 study on this config's phase-2 data in experiment "
                       f"{cfg.experiment!r}: run `dtl main` (or `dtl phase2`) first, or pass --source")
    out = [run_fuzzy(cfg, tracking, src) for src in sources]
    mark_outer(tracking, schema.Role.FUZZY_JOB)
    return out


def run_fuzzy(cfg: Config, tracking: Tracking, source: str) -> FuzzyResult:
    """Tune, evaluate, log and register the fuzzy head of one phase-2 model (resumable)."""
    src = resolve(tracking, cfg, source, phases=("phase2",))
    ds = dataset(cfg, "phase2")
    clf = src.classifier
    if list(clf.classes) != ds.classes:
        raise DTLError(f"{src.label} predicts {clf.classes}, the phase-2 data has {ds.classes}")
    backbone = clf.net.spec.backbone
    study, run, tags = _open_study(cfg, tracking, src, ds, backbone)
    try:
        device = resolve_device(cfg.device)
        data = {}
        for s in ("train", "val"):
            ld = loader(cfg, "phase2", s, clf.spec, device, cfg.eval_batch_size, train=False)
            data[s] = (embed(clf.net, ld, clf.spec, device)[0], ds.label_ids(s))
        remaining = cfg.fuzzy.n_trials - len(study.get_trials(deepcopy=False, states=COMPLETE))
        t0 = time.time()
        if remaining > 0:
            study.optimize(_objective(cfg, tracking, run, tags, search_space(cfg), data, ds.classes),
                           n_trials=remaining + 2,  # +2: room for failed fits
                           callbacks=[optuna.study.MaxTrialsCallback(cfg.fuzzy.n_trials, states=COMPLETE)],
                           catch=(ValueError, np.linalg.LinAlgError))
        best = study.best_trial
        done = run.client.get_run(run.id).data.tags
        if done.get(schema.EVALUATED_TRIAL) == str(best.number) and done.get(schema.REGISTERED):
            out = {"registered": done[schema.REGISTERED], "model_uri": done.get(schema.MODEL_URI), "results": None}
        else:
            out = _finish(cfg, tracking, run, src, ds, best, data, device)
        counts = {s.name.lower(): sum(t.state == s for t in study.get_trials(deepcopy=False))
                  for s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)}
        run.log_metrics({"n_complete": counts["complete"], "n_failed": counts["fail"], "study_wall_s": time.time() - t0})
        run.set_tags({schema.BEST_TRIAL: best.number, **{schema.BEST_PARAM_PREFIX + k: v for k, v in best.params.items()}})
    except BaseException as e:
        run.set_tags({schema.FAIL_REASON: f"{type(e).__name__}: {str(e)[:400]}"})
        run.end("FAILED" if isinstance(e, Exception) else "KILLED")
        raise
    run.end("FINISHED")
    return FuzzyResult(run.id, study.study_name, backbone, best.value, best.params, counts, **out)


def phase2_studies(tracking: Tracking, data_digest: str, strategy: str = "double", mask: str = "") -> list[str]:
    """The latest phase-2 study run per backbone on this data and annotation masking (the default
    sources of ``dtl fuzzy``): a study of the same files without the mask is another model."""
    flt = schema.study_query("phase2", data_digest, {schema.STRATEGY: strategy, **({schema.ANNOTATION_MASK: mask} if mask else {})})
    latest: dict = {}
    for r in find_runs(tracking, flt):
        if schema.CHECKPOINT_TRIAL in r.data.tags:  # finished, with its best checkpoint logged
            latest[r.data.tags.get(schema.BACKBONE)] = r.info.run_id  # runs come oldest first
    return [latest[b] for b in sorted(latest)]
