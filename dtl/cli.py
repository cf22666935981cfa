"""Command line: ``dtl <command>`` (also ``python -m dtl``). The only reader of ``sys.argv``.

Every subcommand loads its configuration the same way (:func:`load_config`): the recipe
(``--config``), the flags turned into overrides, then ``-o`` overrides, validated before
anything runs. The training, tracking and plotting modules are imported inside the command
that needs them, deliberately: they pull in torch, timm, MLflow and matplotlib (about 6 s),
which ``dtl --help`` and a mistyped flag should not wait for.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from dtl import DTLError, config
from dtl.data import kinds
from dtl.tracking import schema
from dtl.train.strategies import STRATEGIES

EPILOG = """Config: a recipe from experiments/ (demo, real, resnet50, ...) or a YAML file; any key can be
overridden with -o key.sub=value (e.g. -o phase2.epochs=20 -o tune.pruner=hyperband).
Tracking: MLFLOW_TRACKING_URI or --tracking-uri (default: sqlite:///mlflow.db here)."""
TRAINING_COMMANDS = ("main", "phase1", "phase2", "tune")

# flag attribute -> config key, for flags that set one key when given (empty = the recipe's value)
FLAG_KEYS = {"device": "device", "precision": "precision", "storage": "tune.storage", "tracking_uri": "tracking_uri",
             "experiment": "experiment", "phase1_init": "phase1.init", "phase2_variant": "phase2.data.variant"}
# `dtl data` flags -> keys of the data block (phase1.data or phase2.data, by the kind)
DATA_FLAG_KEYS = {"variant": "variant", "val_fraction": "val_fraction", "test_fraction": "test_fraction",
                  "val_fold": "val_fold", "seed": "split_seed", "protocol": "protocol", "block_size": "block_size",
                  "mask_annotation": "mask_annotation"}


def _int(v: str) -> int:
    return int(float(v))


def _config_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The configuration options every subcommand takes."""
    g = p.add_argument_group("configuration")
    g.add_argument("--config", default="demo", help="recipe name in experiments/ or a YAML path (default: demo)")
    g.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, repeatable (e.g. phase2.lr_head=3e-4)")
    g.add_argument("--overrides", default="", metavar="'K=V K=V'",
                   help="several overrides in one whitespace-separated string (MLproject's -P overrides=...)")
    g.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    g.add_argument("--experiment", default="", help="MLflow experiment name (ignored under `mlflow run`)")
    g.add_argument("--quiet", action="store_true", help="no live progress lines (errors and the final summary only)")
    return g


def _training_args(p: argparse.ArgumentParser, phases: tuple[str, ...] = ("phase1", "phase2")) -> None:
    """The options of the commands that train (main, phase1, phase2, tune, evaluate, fuzzy)."""
    g = _config_args(p)
    g.add_argument("--backbones", default="", help="comma-separated timm names (resnet50,efficientnet_b3,inception_v3)")
    g.add_argument("--n-trials", type=_int, default=0, help="Optuna trials per study (0 = recipe value)")
    g.add_argument("--epochs", type=_int, default=0, help="epochs per trial (0 = recipe value)")
    g.add_argument("--device", default="", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--precision", default="", help="auto | fp32 | fp16 | bf16")
    g.add_argument("--storage", default="", help="Optuna storage URL: sqlite:///optuna.db (default), "
                                                 "postgresql://..., journal:PATH")
    g.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed in the run) instead of stopping")
    for ph in phases:
        g.add_argument(f"--{ph}-root", default="", help=f"{ph} data root (default kind: {kinds.default_kind(ph)})")
        g.add_argument(f"--{ph}-kind", default="", choices=["", *kinds.names()], metavar="KIND",
                       help=f"{ph} data kind: " + ", ".join(kinds.names()))
    if "phase1" in phases:
        g.add_argument("--phase1-init", default="", help=config.INITS)
    if "phase2" in phases:
        g.add_argument("--phase2-variant", default="", help="original | segmented")
        g.add_argument("--strategies", default="", help="phase-2 starts to compare: " + ", ".join(STRATEGIES))


def _flag_overrides(args) -> list[str]:
    """The training flags as config overrides."""
    o = []
    if getattr(args, "backbones", ""):
        o.append(f"backbones=[{args.backbones}]")
    if getattr(args, "strategies", ""):
        o.append(f"strategies=[{args.strategies}]")
    for ph in ("phase1", "phase2"):
        if getattr(args, "n_trials", 0):
            o.append(f"{ph}.n_trials={args.n_trials}")
        if getattr(args, "epochs", 0):
            o.append(f"{ph}.epochs={args.epochs}")
        if getattr(args, "skip_bad", False):
            o.append(f"{ph}.data.skip_bad=true")
        root, kind = getattr(args, f"{ph}_root", ""), getattr(args, f"{ph}_kind", "")
        if root:
            o.append(f"{ph}.data.root={root}")
        if kind or root:  # a root holding train/ and val/ is pre-split, whatever the phase's default kind
            o.append(f"{ph}.data.kind={kind or ('presplit' if kinds.is_presplit_root(root) else kinds.default_kind(ph))}")
    o += [f"{key}={getattr(args, attr)}" for attr, key in FLAG_KEYS.items() if getattr(args, attr, "")]
    return o


def load_config(args, extra: list[str] | tuple[str, ...] = ()) -> config.Config:
    """The one way every subcommand gets its config: the recipe, then ``-o``/``--overrides``, then the
    flags and ``extra`` (a flag given explicitly wins over an override string of the same key)."""
    return config.load([args.config], list(args.override) + args.overrides.split() + _flag_overrides(args)
                       + list(extra), check_files=args.command in TRAINING_COMMANDS)


def cmd_main(args) -> int:
    from dtl import pipeline

    cfg = load_config(args)
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

    cfg = load_config(args)
    phase = args.phase if args.command == "tune" else args.command
    out = pipeline.single_phase(cfg, phase, getattr(args, "phase1", ""), getattr(args, "strategy", "double"))
    for b, s in out.items():
        print(f"{phase} {b}: study {s.study_name} run {s.run_id} best trial {s.best_trial} "
              f"value {s.best_value:.4f} ({s.counts})")
    return 0


def cmd_evaluate(args) -> int:
    from dtl import pipeline

    ev, run_id = pipeline.evaluate_job(load_config(args), args.phase, args.checkpoint, args.run,
                                       tuple(args.splits.split(",")))
    keys = [k for k in ev.metrics if k.split("_", 1)[1] in ("accuracy", "balanced_accuracy", "macro_f1",
                                                                   "weighted_f1", "roc_auc", "ece")]
    for k in keys:
        lo, hi = ev.metrics.get(f"{k}_ci_low"), ev.metrics.get(f"{k}_ci_high")
        print(f"{k:28s} {ev.metrics[k]:.4f}" + (f"  (95% CI {lo:.4f}–{hi:.4f})" if lo is not None else ""))
    print(f"logged to run {run_id}")
    return 0


def cmd_promote(args) -> int:
    from dtl import pipeline
    from dtl.tracking import adapter as tracking
    from dtl.tracking import registry
    from dtl.tracking.policy import load_policy

    cfg = load_config(args)
    pol = load_policy(args.policy or cfg.policy, args.model or cfg.registered_model)
    t = tracking.connect(cfg.tracking_uri, cfg.experiment)
    if args.any_data:
        flt = None
    elif args.data_digest:
        flt = {"data_digest": args.data_digest}
    else:  # only versions trained on the recipe's phase-2 data, split protocol and masking compete
        flt = pipeline.promotion_filter(cfg)
        print(f"candidates: versions trained on {cfg.phase2.data.kind} data digest {flt['data_digest'][:12]} "
              f"({flt['split_protocol']} split, annotation mask {flt['annotation_mask']}); "
              "--data-digest D or --any-data to choose otherwise")
    d = registry.promote(t, pol, flt, force=args.force, cards_dir=Path(cfg.cards_dir))
    print(json.dumps({"champion": d.champion, "challenger": d.challenger, "moved": d.moved, "reason": d.reason,
                      "ranked": d.ranked}, indent=2))
    return 0


def cmd_report(args) -> int:
    from dtl import pipeline

    out = pipeline.report_job(load_config(args), args.out, args.data_digest or None)
    print((out / "results.md").read_text())
    print(f"written to {out}/ (results.md, results.csv, seed_table.csv, report.html)")
    return 0


def cmd_predict(args) -> int:
    import mlflow.pyfunc

    from dtl.model.decode import InputPolicy, image_from_value
    from dtl.tracking.adapter import DEFAULT_TRACKING_URI

    cfg = load_config(args)
    mlflow.set_tracking_uri(cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    uri = args.model or f"models:/{cfg.registered_model}@champion"
    files = [f for spec in args.images for f in spec.split()]
    if not files:
        raise DTLError("predict needs at least one image file")
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as e:
        raise DTLError(f"cannot load model {uri}: {str(e)[:300]}") from None
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


def data_config(args) -> tuple[config.DataConfig, str]:
    """``dtl data``'s data block and cache dir. The recipe's block of the phase whose data is of
    ``--kind`` (so ``--config real --kind aria`` audits exactly the real recipe's split); for a
    kind the recipe does not use, that phase's default block (never another kind's root). The
    flags given are applied on top and the block is validated like any config."""
    overrides = list(args.override) + args.overrides.split()
    data_keys = [o for o in overrides if o.startswith(("phase1.data.", "phase2.data."))]
    cfg = config.load([args.config], [o for o in overrides if o not in data_keys], check_files=False)
    ph = next((p for p in ("phase1", "phase2") if cfg.phase(p).data.kind == args.kind), kinds.phase_of(args.kind))
    dc = cfg.phase(ph).data if cfg.phase(ph).data.kind == args.kind else config.Config().phase(ph).data
    given = {}  # `-o phaseN.data.KEY=V` of that phase apply to the audited --kind block, whatever the recipe's kind
    for o in data_keys:
        given.update((config.parse_override(o).get(ph) or {}).get("data") or {})
    dc = config.build_block(dc, {k: v for k, v in given.items() if k != "kind"}, f"{ph}.data.")
    changes = {key: getattr(args, attr) for attr, key in DATA_FLAG_KEYS.items() if getattr(args, attr) is not None}
    dc = replace(dc, kind=args.kind, **({"root": args.root} if args.root else {}),
                 **({"skip_bad": True} if args.skip_bad else {}), **changes)
    config.validate_data(dc, f"{ph}.data")
    return dc, args.cache_dir or cfg.cache_dir


def cmd_data(args) -> int:
    from dtl.data.datasets import load_dataset

    dc, cache_dir = data_config(args)
    ds = load_dataset(dc, cache_dir)
    if args.action == "preview":
        return _preview(ds, args)
    a = ds.audit()
    a["shortcut_probe"] = _probe(ds, dc, args, cache_dir)
    a["shortcut_baselines"] = _baselines(ds, dc, args, cache_dir)
    if args.manifest_out:
        ds.manifest[["path", "label", "group", "split", "sha256"]].to_csv(args.manifest_out, index=False)
    if args.json:
        print(json.dumps(a, indent=2))
        return 0
    _print_audit(ds, a)
    if args.manifest_out:
        print(f"manifest written to {args.manifest_out}")
    return 0


def _print_audit(ds, a: dict) -> None:
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
    turned = ", ".join(f"{name} {n}" for name, n in a["near_duplicates_linked_turned"].items())
    turned = f"; of them turned or mirrored: {turned}" if turned else ""
    print(f"groups {a['groups']} (near-duplicate pairs linked {a['near_duplicates_linked']}{turned}); group sizes: "
          + ", ".join(f"{n}x{size}" for size, n in a["group_sizes"].items()))
    _print_pairs(a)
    p = a["shortcut_probe"]
    if p:
        print(f"shortcut probe (logistic regression, {p['n_images']} images, grouped 5-fold CV): annotation box "
              f"rows {p['region']['rows']} cols {p['region']['cols']}: {p['annotation']:.3f} unmasked, "
              f"{p['annotation_masked']:.3f} masked; central box {p['centre']:.3f}; field colour "
              f"{p['field_colour']:.3f}; majority class {p['majority']:.3f}")
    if a["shortcut_baselines"]:
        b0 = a["shortcut_baselines"][0]
        print(f"shortcut baselines ({b0['folds']}-fold CV grouped by {b0['grouping']}; majority class "
              f"{b0['majority']:.3f}): what a model could score without looking at the cells")
        for b in a["shortcut_baselines"]:
            print(f"  {b['name']:18s} {b['model']:9s} accuracy {b['accuracy']:.3f}  macro-F1 {b['macro_f1']:.3f}")


def _print_pairs(a: dict, most: int = 10) -> None:
    """The first near-duplicate pairs across splits, each with how the second image was made from
    the first where it is a turned or mirrored copy."""
    for first, second, split_a, split_b, ncc, _, transform in a["near_duplicate_pairs"][:most]:
        print(f"  {first} ({split_a}) ~ {second} ({split_b}): ncc {ncc:.2f}" + (f", {transform}" if transform else ""))
    if a["near_duplicates"] > most:
        print(f"  ... and {a['near_duplicates'] - most} more near-duplicate pairs across splits")


def _probe(ds, dc, args, cache_dir: str) -> dict | None:
    """The shortcut probe when asked (--probe), or by default where the annotation mask is on."""
    from dtl.data.probe import shortcut_probe
    from dtl.model.mask import annotation_mask

    mask = annotation_mask(dc.mask_annotation, ds.kind, dc.variant)
    if not (args.probe or (args.probe is None and mask is not None)):
        return None
    return shortcut_probe(ds, mask, cache_dir, seed=dc.split_seed)


def _baselines(ds, dc, args, cache_dir: str) -> list[dict]:
    """The shortcut baselines, unless --no-probe."""
    from dtl.data.probe import audit_baselines
    from dtl.model.mask import annotation_mask

    if args.probe is False:
        return []
    return audit_baselines(ds, annotation_mask(dc.mask_annotation, ds.kind, dc.variant), cache_dir, seed=dc.split_seed)


def _preview(ds, args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from dtl.config import AugmentConfig
    from dtl.model.preprocess import InputSpec, decode
    from dtl.train.augment import train_transform

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
    from dtl.fuzzy.job import phase2_studies, run_fuzzy
    from dtl.fuzzy.report import verdict
    from dtl.model.mask import mask_state
    from dtl.tracking import adapter as tracking
    from dtl.train.phases import dataset

    if args.fuzzy_trials:
        args.override.append(f"fuzzy.n_trials={args.fuzzy_trials}")
    cfg = load_config(args)
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
        tracking.Run(t, t.outer_run_id).set_tags({schema.ROLE: schema.Role.FUZZY_JOB})
    return 0


def _phase_parsers(sub) -> None:
    m = sub.add_parser("main", help="tune both phases per backbone, evaluate, register, promote, report")
    _training_args(m)
    m.set_defaults(fn=cmd_main)
    strategy_help = "; ".join(f"{k}: {v.help}" for k, v in STRATEGIES.items())
    for ph in ("phase1", "phase2"):
        s = sub.add_parser(ph, help=f"tune and train {ph} alone")
        _training_args(s, (ph,))
        if ph == "phase2":
            s.add_argument("--phase1", default="", help="phase-1 result: study run id, models:/ or runs:/ URI, or checkpoint file")
            s.add_argument("--strategy", default="double", choices=list(STRATEGIES), help=strategy_help)
        s.set_defaults(fn=cmd_phase)
    t = sub.add_parser("tune", help="one Optuna study per backbone for one phase (same as phase1/phase2)",
                       description="Tune one phase. Knobs: --n-trials, --storage (sqlite/postgresql/journal), "
                                   "-o tune.pruner=median|hyperband|threshold|none, -o tune.search_space=FILE, "
                                   "-o phaseN.search=[lr_head,unfreeze] (tune only these; the rest keeps the config value).")
    _training_args(t)
    t.add_argument("--phase", choices=["phase1", "phase2"], required=True)
    t.add_argument("--phase1", default="", help="phase-2 double transfer: the phase-1 source")
    t.add_argument("--strategy", default="double", choices=list(STRATEGIES), help=strategy_help)
    t.set_defaults(fn=cmd_phase)
    e = sub.add_parser("evaluate", help="evaluate a checkpoint (or a study run's best) with bootstrap CIs")
    _training_args(e)
    e.add_argument("--phase", default="phase2", choices=["phase1", "phase2"])
    e.add_argument("--checkpoint", default="")
    e.add_argument("--run", default="", help="study run id whose best checkpoint to evaluate")
    e.add_argument("--splits", default="val,test")
    e.set_defaults(fn=cmd_evaluate)


def _registry_parsers(sub) -> None:
    pr = sub.add_parser("promote", help="move the champion/challenger aliases by the policy")
    _config_args(pr)
    pr.add_argument("--data-digest", default="", help="only versions trained on this data digest")
    pr.add_argument("--policy", default="", help="policy YAML (default: the config's policy)")
    pr.add_argument("--model", default="", help="registered model name (default: the policy's)")
    pr.add_argument("--force", action="store_true", help="move even to a worse candidate")
    pr.add_argument("--any-data", action="store_true",
                    help="let versions trained on any data compete (default: the recipe's phase-2 data digest, "
                         "split protocol and annotation masking only)")
    pr.set_defaults(fn=cmd_promote)
    r = sub.add_parser("report", help="results table and figures from an MLflow search")
    _config_args(r)
    r.add_argument("--data-digest", default="", help="only runs trained on this data digest")
    r.add_argument("--out", default="", help="output folder (default: the config's report_dir, outputs/report)")
    r.set_defaults(fn=cmd_report)
    pd_ = sub.add_parser("predict", help="classify image files with a logged or registered model")
    _config_args(pd_)
    pd_.add_argument("images", nargs="+")
    pd_.add_argument("--model", default="", help="model URI (default: models:/<registered_model>@champion)")
    pd_.set_defaults(fn=cmd_predict)


def _data_parser(sub) -> None:
    d = sub.add_parser("data", help="audit a dataset or preview its augmentations",
                       description="The dataset as the recipe (--config) would read and split it, with the "
                                   "flags below applied. Kinds: " + kinds.help_text())
    _config_args(d)
    d.add_argument("action", choices=["audit", "preview"])
    d.add_argument("root", nargs="?", default="")
    d.add_argument("--kind", required=True, choices=list(kinds.names()))
    d.add_argument("--variant", default=None, choices=["original", "segmented"])
    d.add_argument("--json", action="store_true")
    d.add_argument("--skip-bad", action="store_true")
    d.add_argument("--val-fraction", type=float, default=None)
    d.add_argument("--test-fraction", type=float, default=None)
    d.add_argument("--val-fold", type=int, default=None)
    d.add_argument("--seed", type=int, default=None, help="split seed (data.split_seed)")
    d.add_argument("--cache-dir", default="", help="decoded-image cache (default: the config's cache_dir)")
    d.add_argument("--protocol", default=None, help="split protocol: auto, near-duplicate-groups, "
                   "acquisition-blocks, image-level (folder sets); patient-level (C-NMC)")
    d.add_argument("--block-size", type=int, default=None, help="acquisition-blocks: file numbers per block")
    d.add_argument("--mask-annotation", default=None, choices=["auto", "on", "off"])
    d.add_argument("--manifest-out", default="", help="write the per-image split manifest (CSV: path, label, "
                   "group, split, sha256) here")
    d.add_argument("--probe", action=argparse.BooleanOptionalAction, default=None,
                   help="run the annotation shortcut probe (default: where the annotation mask is on); "
                        "--no-probe also skips the shortcut baselines (colour, size, annotation, border)")
    d.add_argument("--out", default="preview.png")
    d.add_argument("--size", type=int, default=160)
    d.add_argument("--per-class", type=int, default=8)
    d.set_defaults(fn=cmd_data)

def cmd_explain(args) -> int:
    from dtl.explain.job import run_explain, summary_text
    from dtl.tracking import adapter as tracking

    cfg = load_config(args)
    t = tracking.connect(cfg.tracking_uri, cfg.experiment)
    model = args.model or f"models:/{cfg.registered_model}@champion"
    out = Path(args.out or Path(cfg.report_dir) / "explain")
    r = run_explain(cfg, t, model, args.split, out, command=tracking.command_line())
    print(f"explain {r['label']} ({r['backbone']}, {r['strategy']}) on {r['split']} (n={r['n']}):")
    print("\n".join(summary_text(r)))
    print(f"logged to run {r['run_id']} (under study run {r['model_run']}); written to {r['out']}/")
    if t.outer_run_id:
        tracking.Run(t, t.outer_run_id).set_tags({schema.ROLE: schema.Role.EXPLAIN_JOB})
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
    _training_args(ex)
    ex.add_argument("--model", default="", help="models:/<name>@<alias> | models:/<name>/<version> | a phase-1 or "
                                                "phase-2 study run id (default: models:/<registered_model>@champion)")
    ex.add_argument("--split", default="test", help="split to explain and stress (default: test); val fits the "
                                                    "temperature")
    ex.add_argument("--out", default="", help="output folder (default: <report_dir>/explain)")
    ex.set_defaults(fn=cmd_explain)


def _fuzzy_parser(sub) -> None:
    fz = sub.add_parser("fuzzy", help="fit, tune and compare a Mamdani fuzzy head on phase-2 models' features",
                        description="For each phase-2 model (default: the latest double-transfer study per backbone "
                                    "on this config's phase-2 data): Optuna study of the fuzzy system on val, nested "
                                    "under the phase-2 study run; comparison with the softmax head on test, "
                                    "Segmented and corrupted test images; registered as <registered_model>-fuzzy.")
    _training_args(fz, ("phase2",))
    fz.add_argument("--source", default="", help="a phase-2 study run id or models:/<name>@<alias> | /<version>")
    fz.add_argument("--fuzzy-trials", type=_int, default=0, help="Optuna trials of the fuzzy study (0 = recipe value)")
    fz.set_defaults(fn=cmd_fuzzy)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtl", description="Double transfer learning for ALL cell images, tracked in MLflow.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    _phase_parsers(sub)
    _registry_parsers(sub)
    _fuzzy_parser(sub)
    _explain_parser(sub)
    _data_parser(sub)
    return p


def _quiet_warnings() -> None:
    # Optuna marks heartbeat/retry helpers experimental; MLflow warns on every dataset source.
    warnings.filterwarnings("ignore", message=".*(experimental|ExperimentalWarning).*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(mlflow|optuna)\..*")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_warnings()
    from dtl import progress  # torch and pandas: after parsing, so `--help` stays instant
    from dtl.train import distributed  # torch and pandas: after parsing, so `--help` stays instant

    if distributed.world_size() > 1 and args.command in TRAINING_COMMANDS:
        distributed.init()
        if not distributed.is_main():
            from dtl.train.phases import follower_job

            return distributed.follow(follower_job)
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
        if not _is_tracking_failure(e):
            raise
        from dtl.tracking.adapter import redact

        uri = redact(os.environ.get("MLFLOW_TRACKING_URI", ""))
        print(f"error: lost the MLflow tracking server {uri} during the run ({type(e).__name__}: "
              f"{redact(str(e))[:300]}). Checkpoints are kept under the work_dir and finished trials in "
              "the Optuna storage: restart the server and rerun the same command to resume.", file=sys.stderr)
        return 3
    finally:
        distributed.release()


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
