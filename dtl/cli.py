"""Command line: ``dtl <command>`` (also ``python -m dtl``). The only reader of ``sys.argv``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dtl import DTLError

EPILOG = """Config: a recipe from experiments/ (demo, real, resnet50, ...) or a YAML file; any key can be
overridden with -o key.sub=value (e.g. -o phase2.epochs=20 -o tune.pruner=hyperband).
Tracking: MLFLOW_TRACKING_URI or --tracking-uri (default: sqlite:///mlflow.db here)."""


def _int(v: str) -> int:
    return int(float(v))


def _common(p: argparse.ArgumentParser, phases: tuple[str, ...] = ("phase1", "phase2")) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--config", default="demo", help="recipe name in experiments/ or a YAML path (default: demo)")
    g.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, repeatable (e.g. phase2.lr_head=3e-4)")
    g.add_argument("--overrides", default="", metavar="'K=V K=V'",
                   help="several overrides in one whitespace-separated string (MLproject's -P overrides=...)")
    g.add_argument("--backbones", default="", help="comma-separated timm names (resnet50,efficientnet_b3,inception_v3)")
    g.add_argument("--n-trials", type=_int, default=0, help="Optuna trials per study (0 = recipe value)")
    g.add_argument("--epochs", type=_int, default=0, help="epochs per trial (0 = recipe value)")
    g.add_argument("--device", default="", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--precision", default="", help="auto | fp32 | fp16 | bf16")
    g.add_argument("--storage", default="", help="Optuna storage URL: sqlite:///optuna.db (default), "
                                                 "postgresql://..., journal:PATH")
    g.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    g.add_argument("--experiment", default="", help="MLflow experiment name (ignored under `mlflow run`)")
    g.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed in the run) instead of stopping")
    g.add_argument("--quiet", action="store_true", help="no live progress lines (errors and the final summary only)")
    if "phase1" in phases:
        g.add_argument("--phase1-root", default="", help="C-NMC root (folder holding training_data/)")
        g.add_argument("--phase1-kind", default="", help="cnmc | imagefolder | presplit | demo-cnmc")
        g.add_argument("--phase1-init", default="", help="imagenet | scratch | file:PATH")
    if "phase2" in phases:
        g.add_argument("--phase2-root", default="", help="Aria ALL root (holding Original/ and Segmented/)")
        g.add_argument("--phase2-kind", default="", help="aria | imagefolder | presplit | demo-aria")
        g.add_argument("--phase2-variant", default="", help="original | segmented")
        g.add_argument("--strategies", default="", help="phase-2 starts to compare: double,single,scratch")


def _config(args):
    from dtl import config

    o = list(args.override) + getattr(args, "overrides", "").split()
    if args.backbones:
        o.append(f"backbones=[{args.backbones}]")
    for ph in ("phase1", "phase2"):
        if args.n_trials:
            o.append(f"{ph}.n_trials={args.n_trials}")
        if args.epochs:
            o.append(f"{ph}.epochs={args.epochs}")
        if getattr(args, "skip_bad", False):
            o.append(f"{ph}.data.skip_bad=true")
        root, kind = getattr(args, f"{ph}_root", ""), getattr(args, f"{ph}_kind", "")
        if root:
            o.append(f"{ph}.data.root={root}")
            if not kind:
                kind = {"phase1": "cnmc", "phase2": "aria"}[ph]
        if kind:
            o.append(f"{ph}.data.kind={kind}")
    if getattr(args, "phase1_init", ""):
        o.append(f"phase1.init={args.phase1_init}")
    if getattr(args, "phase2_variant", ""):
        o.append(f"phase2.data.variant={args.phase2_variant}")
    if getattr(args, "strategies", ""):
        o.append(f"strategies=[{args.strategies}]")
    for key, attr in (("device", "device"), ("precision", "precision"), ("tune.storage", "storage"),
                      ("tracking_uri", "tracking_uri"), ("experiment", "experiment")):
        if getattr(args, attr, ""):
            o.append(f"{key}={getattr(args, attr)}")
    return config.load([args.config], o)


def cmd_main(args) -> int:
    from dtl import pipeline

    cfg = _config(args)
    res = pipeline.main(cfg)
    if res.report_dir:
        import pandas as pd

        from dtl.progress import summary_table

        print(summary_table(pd.read_csv(Path(res.report_dir) / "results.csv")))
    print(f"pipeline run {res.run_id}: registered {res.versions}, champion v{res.champion}")
    if res.report_dir:
        print(f"report: {res.report_dir}/results.md")
    return 0


def cmd_phase(args) -> int:
    from dtl import pipeline

    cfg = _config(args)
    phase = args.phase if args.command == "tune" else args.command
    out = pipeline.single_phase(cfg, phase, getattr(args, "phase1", ""), getattr(args, "strategy", "double"))
    for b, s in out.items():
        print(f"{phase} {b}: study {s.study_name} run {s.run_id} best trial {s.best_trial} "
              f"value {s.best_value:.4f} ({s.counts})")
    return 0


def cmd_evaluate(args) -> int:
    from dtl import pipeline, tracking
    from dtl.phases import evaluate_checkpoint

    cfg = _config(args)
    if not args.checkpoint and not args.run:
        raise DTLError("evaluate needs --checkpoint FILE or --run <study run id>")
    ckpt = Path(args.checkpoint) if args.checkpoint else pipeline.phase1_source(args.run, cfg)
    ev = evaluate_checkpoint(cfg, args.phase, ckpt, tuple(args.splits.split(",")))
    t = tracking.connect(cfg.tracking_uri, cfg.experiment)
    run = tracking.Run(t, t.outer_run_id) if t.outer_run_id else tracking.start_run(
        t, f"evaluate-{args.phase}", {"dtl.role": "evaluate", "phase": args.phase, "checkpoint": str(ckpt)})
    tracking.log_evaluation(run, ev)
    if not t.outer_run_id:
        run.end()
    keys = [k for k in ev["metrics"] if k.split("_", 1)[1] in ("accuracy", "balanced_accuracy", "macro_f1",
                                                                   "weighted_f1", "roc_auc", "ece")]
    for k in keys:
        lo, hi = ev["metrics"].get(f"{k}_ci_low"), ev["metrics"].get(f"{k}_ci_high")
        print(f"{k:28s} {ev['metrics'][k]:.4f}" + (f"  (95% CI {lo:.4f}–{hi:.4f})" if lo is not None else ""))
    print(f"logged to run {run.id}")
    return 0


def cmd_promote(args) -> int:
    from dtl import config, registry, tracking

    cfg = config.load([args.config], args.override)
    pol = registry.load_policy(args.policy or cfg.policy, args.model or cfg.registered_model)
    t = tracking.connect(args.tracking_uri or cfg.tracking_uri, cfg.experiment)
    if args.any_data:
        flt = None
    elif args.data_digest:
        flt = {"data_digest": args.data_digest}
    else:  # only versions trained on the recipe's phase-2 data and split protocol compete
        from dtl.data.datasets import load_dataset
        from dtl.data.mask import mask_state

        ds = load_dataset(cfg.phase2.data, cfg.cache_dir)
        mask = mask_state(cfg.phase2.data.mask_annotation, ds.kind, cfg.phase2.data.variant)
        flt = {"data_digest": ds.digest, "split_protocol": ds.protocol, "annotation_mask": mask}
        print(f"candidates: versions trained on {ds.kind} data digest {ds.digest[:12]} ({ds.protocol} split, "
              f"annotation mask {mask}); --data-digest D or --any-data to choose otherwise")
    d = registry.promote(t, pol, flt, force=args.force, cards_dir=Path(cfg.cards_dir))
    print(json.dumps({"champion": d.champion, "challenger": d.challenger, "moved": d.moved, "reason": d.reason,
                      "ranked": d.ranked}, indent=2))
    return 0


def cmd_report(args) -> int:
    from dtl import config, report, tracking

    cfg = config.load([args.config], args.override)
    t = tracking.connect(args.tracking_uri or cfg.tracking_uri, cfg.experiment)
    prov = {**report.last_provenance(t), "report_command": "dtl " + " ".join(sys.argv[1:])}
    out = report.build(t, args.out or cfg.report_dir, cfg.registered_model, args.data_digest or None,
                       provenance=prov, description=cfg.description)
    r = tracking.Run(t, t.outer_run_id) if t.outer_run_id else tracking.start_run(t, "report", {"dtl.role": "report"})
    for f in ("results.md", "results.csv", "seed_table.csv", "report.html", "provenance.json"):
        r.log_artifact(out / f, "report")
    if not t.outer_run_id:
        r.end()
    print((out / "results.md").read_text())
    print(f"written to {out}/ (results.md, results.csv, seed_table.csv, report.html)")
    return 0


def cmd_predict(args) -> int:
    import os

    import mlflow.pyfunc

    from dtl.serving import InputPolicy, image_from_value
    from dtl.tracking import DEFAULT_TRACKING_URI

    mlflow.set_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    files = [f for spec in args.images for f in spec.split()]
    if not files:
        raise DTLError("predict needs at least one image file")
    try:
        model = mlflow.pyfunc.load_model(args.model)
    except Exception as e:
        raise DTLError(f"cannot load model {args.model}: {str(e)[:300]}") from None
    failed = 0
    for f in files:
        try:
            if not Path(f).exists():
                raise DTLError("no such file")
            arr = image_from_value(f, InputPolicy(allow_paths=True))  # the user's own files, read here
            row = model.predict({"image": [arr]}).iloc[0]
        except DTLError as e:
            print(f"{f}: ERROR: {e}", file=sys.stderr)
            failed += 1
            continue
        probs = {k[2:]: round(float(v), 4) for k, v in row.items() if k.startswith("p_")}
        print(f"{f}: {row['class']} {json.dumps(probs)}")
    return 1 if failed else 0


def cmd_data(args) -> int:
    from dtl.config import DataConfig, validate_data
    from dtl.data.datasets import load_dataset

    dc = DataConfig(kind=args.kind, root=args.root, variant=args.variant, skip_bad=args.skip_bad,
                    val_fraction=args.val_fraction, test_fraction=args.test_fraction, split_seed=args.seed,
                    val_fold=args.val_fold, protocol=args.protocol, block_size=args.block_size,
                    mask_annotation=args.mask_annotation)
    validate_data(dc, "data")
    ds = load_dataset(dc, args.cache_dir)
    if args.action == "preview":
        return _preview(ds, args)
    a = ds.audit()
    a["shortcut_probe"] = _probe(ds, dc, args)
    if args.manifest_out:
        ds.manifest[["path", "label", "group", "split", "sha256"]].to_csv(args.manifest_out, index=False)
    if args.json:
        print(json.dumps(a, indent=2))
        return 0
    print(f"{ds.kind} at {ds.root}  ({ds.protocol} split, digest {ds.digest[:12]})")
    print(f"{'split':8s}" + "".join(f"{c:>10s}" for c in ds.classes) + f"{'total':>8s}{'patients':>10s}")
    for s in sorted(a["splits"]):
        byc = a["class_by_split"].get(s, {})
        print(f"{s:8s}" + "".join(f"{byc.get(c, 0):>10d}" for c in ds.classes) + f"{a['splits'][s]:>8d}"
              f"{str(a['n_patients'].get(s)):>10s}")
    print(f"images {a['n_images']}, duplicates removed {a['duplicates_removed']}, patient overlap "
          f"{a['patient_overlap']}, unreadable {len(a['unreadable'])}, listed but missing {a['missing_listed']}, "
          f"near-duplicate pairs across splits {a['near_duplicates']}")
    print("sizes: " + ", ".join(f"{k} ({v})" for k, v in a["sizes"].items()))
    print(f"groups {a['groups']} (near-duplicate pairs linked {a['near_duplicates_linked']}); group sizes: "
          + ", ".join(f"{n}x{size}" for size, n in a["group_sizes"].items()))
    p = a["shortcut_probe"]
    if p:
        print(f"shortcut probe (logistic regression, {p['n_images']} images, grouped 5-fold CV): annotation box "
              f"rows {p['region']['rows']} cols {p['region']['cols']}: {p['annotation']:.3f} unmasked, "
              f"{p['annotation_masked']:.3f} masked; central box {p['centre']:.3f}; field colour "
              f"{p['field_colour']:.3f}; majority class {p['majority']:.3f}")
    if args.manifest_out:
        print(f"manifest written to {args.manifest_out}")
    return 0


def _probe(ds, dc, args) -> dict | None:
    """The shortcut probe when asked (--probe), or by default where the annotation mask is on."""
    from dtl.data.mask import annotation_mask
    from dtl.data.probe import shortcut_probe

    mask = annotation_mask(dc.mask_annotation, ds.kind, dc.variant)
    if not (args.probe or (args.probe is None and mask is not None)):
        return None
    return shortcut_probe(ds, mask, args.cache_dir, seed=args.seed)


def _preview(ds, args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from dtl.config import AugmentConfig
    from dtl.data.cache import decode
    from dtl.data.transforms import InputSpec, train_transform

    spec = InputSpec(args.size, int(round(args.size / 0.875)), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    n = args.per_class
    fig, axes = plt.subplots(len(ds.classes), n, figsize=(1.6 * n, 1.7 * len(ds.classes)), squeeze=False)
    gen = torch.Generator().manual_seed(0)
    train = ds.split("train")
    for i, c in enumerate(ds.classes):
        rows = train[train["label"] == c].head(n)
        imgs = torch.from_numpy(__import__("numpy").stack([decode(ds.root / p, spec.cache_size) for p in rows["path"]]))
        x = train_transform(imgs, spec, AugmentConfig(), gen).permute(0, 2, 3, 1).clamp(0, 1).numpy()
        for j in range(n):
            ax = axes[i][j]
            ax.set_axis_off()
            if j < len(x):
                ax.imshow(x[j])
            if j == 0:
                ax.set_title(c, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


def cmd_fuzzy(args) -> int:
    from dtl import tracking
    from dtl.data.mask import mask_state
    from dtl.fuzzy_job import phase2_studies, run_fuzzy
    from dtl.fuzzy_report import verdict
    from dtl.phases import dataset

    if args.fuzzy_trials:
        args.override.append(f"fuzzy.n_trials={args.fuzzy_trials}")
    cfg = _config(args)
    t = tracking.connect(cfg.tracking_uri, cfg.experiment)
    d2 = dataset(cfg, "phase2")
    mask = mask_state(cfg.phase2.data.mask_annotation, d2.kind, cfg.phase2.data.variant)
    sources = [args.source] if args.source else phase2_studies(t, d2.digest, mask=mask)
    if not sources:
        raise DTLError("no finished double-transfer phase-2 study on this config's phase-2 data in experiment "
                       f"{cfg.experiment!r}: run `dtl main` (or `dtl phase2`) first, or pass --source")
    for src in sources:
        r = run_fuzzy(cfg, t, src)
        line = (f"fuzzy {r['backbone']}: study {r['study']} run {r['run_id']} best val macro-F1 "
                f"{r['best_value']:.4f} {r['best_params']} ({r['counts']}) -> {r['registered']}")
        print(line)
        for s, v in (r["results"] or {}).items():
            d = v["diff"]["macro_f1"]
            print(f"  {s:10s} n={v['n']:4d} acc {v['fuzzy']['accuracy']:.4f} vs softmax {v['softmax']['accuracy']:.4f}; "
                  f"macro-F1 {v['fuzzy']['macro_f1']:.4f} vs {v['softmax']['macro_f1']:.4f} "
                  f"(diff {d['diff']:+.4f}, 95% CI {d['ci_low']:+.4f}..{d['ci_high']:+.4f}: {verdict(d)}); "
                  f"error AUROC firing {v['fuzzy']['abstain_auroc']:.3f} vs maxprob {v['softmax']['abstain_auroc']:.3f}")
    if t.outer_run_id:
        tracking.Run(t, t.outer_run_id).set_tags({"dtl.role": "fuzzy-job"})
    return 0


def cmd_explain(args) -> int:
    from dtl import tracking
    from dtl.explain_job import run_explain, summary_text

    cfg = _config(args)
    t = tracking.connect(cfg.tracking_uri, cfg.experiment)
    model = args.model or f"models:/{cfg.registered_model}@champion"
    out = Path(args.out or Path(cfg.report_dir) / "explain")
    r = run_explain(cfg, t, model, args.split, out, command="dtl " + " ".join(sys.argv[1:]))
    print(f"explain {r['label']} ({r['backbone']}, {r['strategy']}) on {r['split']} (n={r['n']}):")
    print("\n".join(summary_text(r)))
    print(f"logged to run {r['run_id']} (under study run {r['model_run']}); written to {r['out']}/")
    if t.outer_run_id:
        tracking.Run(t, t.outer_run_id).set_tags({"dtl.role": "explain-job"})
    return 0


def _explain_parser(sub) -> None:
    ex = sub.add_parser("explain", help="Grad-CAM, shortcut check, cross-variant and corruption robustness, "
                                        "calibration of a registered model",
                        description="Explain and stress one model: Grad-CAM maps and a shortcut score (CAM mass on "
                                    "the cells, the annotation box, the corners), predictions with the annotation "
                                    "masked vs unmasked, the other Aria variant of the same test items, 5 "
                                    "corruptions x 3 severities, reliability and ECE before/after temperature "
                                    "scaling (fitted on val). Logged under the model's study run and written to "
                                    "<report_dir>/explain/<model>/.")
    _common(ex)
    ex.add_argument("--model", default="", help="models:/<name>@<alias> | models:/<name>/<version> | a phase-1 or "
                                                "phase-2 study run id (default: models:/<registered_model>@champion)")
    ex.add_argument("--split", default="test", help="split to explain and stress (default: test); val fits the "
                                                    "temperature")
    ex.add_argument("--out", default="", help="output folder (default: <report_dir>/explain)")
    ex.set_defaults(fn=cmd_explain)


def _registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="demo")
    p.add_argument("-o", "--override", action="append", default=[])
    p.add_argument("--data-digest", default="", help="only models/runs trained on this data digest")
    p.add_argument("--tracking-uri", default="")


def _fuzzy_parser(sub) -> None:
    fz = sub.add_parser("fuzzy", help="fit, tune and compare a Mamdani fuzzy head on phase-2 models' features",
                        description="For each phase-2 model (default: the latest double-transfer study per backbone "
                                    "on this config's phase-2 data): Optuna study of the fuzzy system on val, nested "
                                    "under the phase-2 study run; comparison with the softmax head on test, "
                                    "Segmented and corrupted test images; registered as <registered_model>-fuzzy.")
    _common(fz, ("phase2",))
    fz.add_argument("--source", default="", help="a phase-2 study run id or models:/<name>@<alias> | /<version>")
    fz.add_argument("--fuzzy-trials", type=_int, default=0, help="Optuna trials of the fuzzy study (0 = recipe value)")
    fz.set_defaults(fn=cmd_fuzzy)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtl", description="Double transfer learning for ALL cell images, tracked in MLflow.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("main", help="tune both phases per backbone, evaluate, register, promote, report")
    _common(m)
    m.set_defaults(fn=cmd_main)
    for ph in ("phase1", "phase2"):
        s = sub.add_parser(ph, help=f"tune and train {ph} alone")
        _common(s, (ph,))
        if ph == "phase2":
            s.add_argument("--phase1", default="", help="phase-1 result: study run id, models:/ or runs:/ URI, or checkpoint file")
            s.add_argument("--strategy", default="double", choices=["double", "single", "scratch"])
        s.set_defaults(fn=cmd_phase)
    t = sub.add_parser("tune", help="one Optuna study per backbone for one phase (same as phase1/phase2)",
                       description="Tune one phase. Knobs: --n-trials, --storage (sqlite/postgresql/journal), "
                                   "-o tune.pruner=median|hyperband|threshold|none, -o tune.search_space=FILE, "
                                   "-o phaseN.search=[lr_head,unfreeze] (tune only these; the rest keeps the config value).")
    _common(t)
    t.add_argument("--phase", choices=["phase1", "phase2"], required=True)
    t.add_argument("--phase1", default="", help="phase-2 double transfer: the phase-1 source")
    t.add_argument("--strategy", default="double", choices=["double", "single", "scratch"])
    t.set_defaults(fn=cmd_phase)
    e = sub.add_parser("evaluate", help="evaluate a checkpoint (or a study run's best) with bootstrap CIs")
    _common(e)
    e.add_argument("--phase", default="phase2", choices=["phase1", "phase2"])
    e.add_argument("--checkpoint", default="")
    e.add_argument("--run", default="", help="study run id whose best checkpoint to evaluate")
    e.add_argument("--splits", default="val,test")
    e.set_defaults(fn=cmd_evaluate)
    pr = sub.add_parser("promote", help="move the champion/challenger aliases by the policy")
    _registry_args(pr)
    pr.add_argument("--policy", default="")
    pr.add_argument("--model", default="", help="registered model name (default: the policy's)")
    pr.add_argument("--force", action="store_true", help="move even to a worse candidate")
    pr.add_argument("--any-data", action="store_true",
                    help="let versions trained on any data compete (default: the recipe's phase-2 data digest "
                         "and split protocol only)")
    pr.set_defaults(fn=cmd_promote)
    r = sub.add_parser("report", help="results table and figures from an MLflow search")
    _registry_args(r)
    r.add_argument("--out", default="", help="output folder (default: the config's report_dir, outputs/report)")
    r.set_defaults(fn=cmd_report)
    _fuzzy_parser(sub)
    _explain_parser(sub)
    pd_ = sub.add_parser("predict", help="classify image files with a logged or registered model")
    pd_.add_argument("images", nargs="+")
    pd_.add_argument("--model", default="models:/all-dtl@champion")
    pd_.add_argument("--tracking-uri", default="")
    pd_.set_defaults(fn=cmd_predict)
    d = sub.add_parser("data", help="audit a dataset or preview its augmentations")
    d.add_argument("action", choices=["audit", "preview"])
    d.add_argument("root", nargs="?", default="")
    d.add_argument("--kind", required=True, choices=["cnmc", "aria", "imagefolder", "demo-cnmc", "demo-aria"])
    d.add_argument("--variant", default="original", choices=["original", "segmented"])
    d.add_argument("--json", action="store_true")
    d.add_argument("--skip-bad", action="store_true")
    d.add_argument("--val-fraction", type=float, default=0.15)
    d.add_argument("--test-fraction", type=float, default=0.15)
    d.add_argument("--val-fold", type=int, default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--cache-dir", default=".dtl/cache")
    d.add_argument("--protocol", default="auto", help="split protocol: auto, near-duplicate-groups, "
                   "acquisition-blocks, image-level (folder sets); patient-level (C-NMC)")
    d.add_argument("--block-size", type=int, default=20, help="acquisition-blocks: file numbers per block")
    d.add_argument("--mask-annotation", default="auto", choices=["auto", "on", "off"])
    d.add_argument("--manifest-out", default="", help="write the per-image split manifest (CSV: path, label, "
                   "group, split, sha256) here")
    d.add_argument("--probe", action=argparse.BooleanOptionalAction, default=None,
                   help="run the annotation shortcut probe (default: where the annotation mask is on)")
    d.add_argument("--out", default="preview.png")
    d.add_argument("--size", type=int, default=160)
    d.add_argument("--per-class", type=int, default=8)
    d.set_defaults(fn=cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    # Optuna marks heartbeat/retry helpers experimental; MLflow warns on every dataset source.
    warnings.filterwarnings("ignore", message=".*(experimental|ExperimentalWarning).*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(mlflow|optuna)\..*")
    try:
        from optuna.exceptions import ExperimentalWarning

        warnings.filterwarnings("ignore", category=ExperimentalWarning)
    except ImportError:
        pass
    from dtl import distributed as dd

    if dd.world_size() > 1 and args.command in ("main", "phase1", "phase2", "tune"):
        dd.init()
        if not dd.is_main():
            return dd.follow()
    from dtl import progress

    progress.QUIET = bool(getattr(args, "quiet", False))
    if not progress.live():  # MLflow's own download bars: carriage-return noise in a log
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return args.fn(args)
    except DTLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if _is_tracking_failure(e):
            from dtl.tracking import redact

            uri = redact(os.environ.get("MLFLOW_TRACKING_URI", ""))
            print(f"error: lost the MLflow tracking server {uri} during the run ({type(e).__name__}: "
                  f"{redact(str(e))[:300]}). Checkpoints are kept under the work_dir and finished trials in "
                  "the Optuna storage: restart the server and rerun the same command to resume.", file=sys.stderr)
            return 3
        raise
    finally:
        dd.release()


def _is_tracking_failure(e: BaseException) -> bool:
    import requests
    from mlflow.exceptions import MlflowException

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, requests.exceptions.ConnectionError) or (
                isinstance(e, MlflowException) and ("API request" in str(e) or "Max retries" in str(e))):
            return True
        e = e.__cause__ or e.__context__
    return False
