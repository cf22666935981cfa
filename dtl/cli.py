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

from dtl import DTLError, config
from dtl.data import kinds
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

    print(pipeline.main(load_config(args)).text())
    return 0


def cmd_phase(args) -> int:
    from dtl import pipeline

    phase = args.phase if args.command == "tune" else args.command
    out = pipeline.single_phase(load_config(args), phase, getattr(args, "phase1", ""), getattr(args, "strategy", "double"))
    print(pipeline.studies_text(phase, out))
    return 0


def cmd_evaluate(args) -> int:
    from dtl import pipeline

    ev, run_id = pipeline.evaluate_job(load_config(args), args.phase, args.checkpoint, args.run,
                                       tuple(args.splits.split(",")))
    print(f"{ev.text()}\nlogged to run {run_id}")
    return 0


def cmd_promote(args) -> int:
    from dtl import pipeline

    d, note = pipeline.promote_job(load_config(args), args.policy, args.model, args.data_digest, args.any_data,
                                   args.force)
    print("\n".join(filter(None, [note, d.to_json()])))
    return 0


def cmd_report(args) -> int:
    from dtl import pipeline

    out = pipeline.report_job(load_config(args), args.out, args.data_digest or None)
    print((out / "results.md").read_text())
    print(f"written to {out}/ (results.md, results.csv, seed_table.csv, report.html)")
    return 0


def cmd_predict(args) -> int:
    from dtl.predict import predict_files

    cfg = load_config(args)
    failed = 0
    for _, line, ok in predict_files(args.model or f"models:/{cfg.registered_model}@champion",
                                     [f for spec in args.images for f in spec.split()], cfg.tracking_uri):
        print(line, file=sys.stdout if ok else sys.stderr)
        failed += not ok
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
    from dtl.data import audit

    dc, cache_dir = data_config(args)
    if args.action == "preview":
        print(audit.preview(dc, cache_dir, args.size, args.per_class, args.out))
        return 0
    ds, a = audit.audit(dc, cache_dir, args.probe, args.manifest_out)
    print(json.dumps(a, indent=2) if args.json else audit.audit_text(ds, a))
    if args.manifest_out and not args.json:
        print(f"manifest written to {args.manifest_out}")
    return 0


def cmd_fuzzy(args) -> int:
    from dtl.fuzzy.job import fuzzy_job
    from dtl.fuzzy.report import result_text

    if args.fuzzy_trials:
        args.override.append(f"fuzzy.n_trials={args.fuzzy_trials}")
    for r in fuzzy_job(load_config(args), args.source):
        print(result_text(r))
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
    from dtl.explain.job import explain_job

    print(explain_job(load_config(args), args.model, args.split, args.out).text())
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
        from dtl.tracking.access import denied_message
        from dtl.tracking.adapter import is_tracking_failure, redact

        denied = denied_message(e, os.environ.get("MLFLOW_TRACKING_URI", ""))
        if denied:  # a reader registering, a permission revoked mid-job: one line, no traceback
            print(f"error: {denied}", file=sys.stderr)
            return 2
        if not is_tracking_failure(e):
            raise
        uri = redact(os.environ.get("MLFLOW_TRACKING_URI", ""))
        print(f"error: lost the MLflow tracking server {uri} during the run ({type(e).__name__}: "
              f"{redact(str(e))[:300]}). Checkpoints are kept under the work_dir and finished trials in "
              "the Optuna storage: restart the server and rerun the same command to resume.", file=sys.stderr)
        return 3
    finally:
        distributed.release()
