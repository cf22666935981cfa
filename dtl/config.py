"""One frozen configuration object, loaded from YAML recipes plus command-line overrides.

The defaults live in one place: the dataclasses below (one comment per field). A recipe
(``experiments/<name>.yaml``) states only what differs from them; ``load(["demo"],
["phase2.epochs=3"])`` applies the recipe (and its ``include:`` list), then the dotted
overrides, validates every key and value, and returns a :class:`Config`; nothing runs before
that. The CLI's flags and MLproject's parameters are turned into such overrides (``dtl.cli``).
Trials derive variants with :func:`dataclasses.replace`; :func:`flatten` gives the flat dict
that is logged once per run as MLflow params.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dtl import DTLError
from dtl.data import kinds
from dtl.model.colour import METHODS as COLOURS
from dtl.train import strategies

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"

DATA_KINDS = kinds.names()
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamax")
HEADS = ("linear", "pbs")
STRATEGIES = tuple(strategies.STRATEGIES)
PRUNERS = ("median", "hyperband", "threshold", "none")
MASK_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class DataConfig:
    kind: str = "cnmc"  # one of DATA_KINDS (dtl.data.kinds)
    root: str = ""  # dataset root; empty for the demo sets (generated into cache_dir)
    variant: str = "original"  # Aria: original | segmented
    val_fraction: float = 0.15  # share of training patients (C-NMC) or images (others) for validation
    test_fraction: float = 0.15  # share held out for test where the dataset has no test set
    val_fold: int | None = None  # C-NMC: use this official fold as validation instead of a random split
    split_seed: int = 0  # the split depends on this seed and the data only
    hsv_segment: bool = False  # remove the background by HSV thresholding, once, before caching
    skip_bad: bool = False  # skip unreadable images (listed and logged) instead of stopping
    train_dir: str = ""  # presplit: class-per-folder training set
    val_dir: str = ""
    test_dir: str = ""
    classes: tuple[str, ...] = ()  # expected class names; empty = take them from the data
    protocol: str = "auto"  # split protocol, one of SPLIT_PROTOCOLS; auto = the kind's default
    block_size: int = 20  # acquisition-blocks: consecutive file numbers per class kept together
    mask_annotation: str = "auto"  # on | off | auto (= on for Aria, whose corner stamp leaks the label)
    colour: str = "raw"  # raw | greyscale | reinhard (stain normalisation to a fixed reference; dtl.model.colour)
    cv_folds: int = 0  # > 0: fold cv_fold of a stratified group K-fold over ALL items is test, the next fold val
    cv_fold: int = 0  # (final.cv sets these three for its fold models; a fold can be rerun by hand with them)
    cv_repeat: int = 0  # repeat r draws its folds with split_seed + r


@dataclass(frozen=True)
class PhaseConfig:
    data: DataConfig = field(default_factory=DataConfig)
    init: str = "imagenet"  # imagenet | scratch | file:PATH; phase 2: the single-transfer start (double starts from phase 1)
    head: str = "linear"  # linear | pbs (conv-BN-act block for PBS features)
    head_channels: int = 256  # width of the PBS conv block
    head_dropout: float = 0.2
    unfreeze: int = -1  # number of top backbone stages trained: 0 = head only, -1 = all
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adamw"
    lr_head: float = 1e-3
    lr_backbone: float = 1e-4
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    class_weights: bool = True  # inverse-frequency cross-entropy weights (C-NMC is ~2:1)
    warmup_epochs: int = 1
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    early_stop_patience: int = 0  # epochs without improvement of the monitored metric; 0 = off
    monitor: str = "val_macro_f1"  # validation metric for early stopping, checkpoints and tuning
    aux_weight: float = 0.3  # InceptionV3 auxiliary-logit loss weight (training only; other backbones ignore it)
    tta: bool = False  # test-time augmentation (horizontal/vertical flips) in the final evaluation
    n_trials: int = 10
    search: tuple[str, ...] = ()  # parameters Optuna tunes; empty = every key of the search space
    pinned: tuple[str, ...] = ()  # search-space keys held at their config value (set by -o / flags, or here)


def _phase1() -> PhaseConfig:
    """Phase 1, ImageNet -> single cells, normal vs blast (C-NMC 2019): the class defaults."""
    return PhaseConfig(data=DataConfig(kind="cnmc", val_fraction=0.2))


def _phase2() -> PhaseConfig:
    """Phase 2, phase 1 -> peripheral blood smears, 4 classes (Aria ALL): where it differs from phase 1."""
    return PhaseConfig(data=DataConfig(kind="aria"), head="pbs", epochs=15, lr_backbone=3e-4, class_weights=False)


@dataclass(frozen=True)
class AugmentConfig:
    rotation: float = 180.0  # degrees, uniform in [-rotation, rotation]
    hflip: float = 0.5
    vflip: float = 0.5
    scale_min: float = 0.7  # random resized crop: area fraction kept, lower bound
    ratio: float = 0.15  # log aspect-ratio jitter
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0
    hed: float = 0.0  # stain jitter in HED space (Tellez et al. 2019): per sample and stain, s*U(1-hed,1+hed)+U(-hed,hed), the shift in optical-density units; 0.05 light, 0.2 strong
    grey: float = 0.0  # probability that a training image is turned greyscale (a model that must not lean on colour)


@dataclass(frozen=True)
class TuneConfig:
    storage: str = ""  # Optuna storage URL; empty = sqlite file beside the MLflow store
    pruner: str = "median"  # median | hyperband | threshold | none
    pruner_startup_trials: int = 5  # median pruner: no pruning before this many trials completed
    pruner_warmup_epochs: int = 1  # no pruning before this epoch, and never inside the LR warm-up
    startup_trials: int = -1  # TPE's random start-up draws (-1: a third of n_trials, at least 2); a best trial among them is flagged
    max_trials: int = 0  # cap on trials of any state per study (pruned/failed included); 0 = 3 x n_trials
    threshold: float = 0.0  # threshold pruner: prune when the monitored metric is worse than this
    search_space: str = "search_space.yaml"  # relative to experiments/ unless absolute
    heartbeat_s: int = 10  # a trial silent for 3x this is declared failed and retried
    sampler_seed: int = 0


@dataclass(frozen=True)
class FinalConfig:
    repeats: int = 1  # after a study, retrain its best parameters with this many seeds (seed, seed+1, ...)
    cv: int = 0  # K >= 3 (one fold test, one val, the rest train): K-fold grouped cross-validation of each phase-2 study's best parameters (0 = off)
    cv_repeats: int = 1  # repeats of the K-fold CV, each with other folds (split_seed + r)


@dataclass(frozen=True)
class FuzzyConfig:
    enabled: bool = False  # `main` also fits the fuzzy head on each double-transfer phase-2 model
    n_trials: int = 30  # Optuna trials of the fuzzy study (k, clusters, fuzzifier m, t-norm; seconds each)
    registered_model: str = ""  # empty = "<registered_model>-fuzzy"
    cross_variant: bool = True  # also evaluate on Aria's Segmented images of the test items
    corruptions: bool = True  # also evaluate on blurred and JPEG-compressed test images


@dataclass(frozen=True)
class ExplainConfig:
    n_per_class: int = 4  # Grad-CAM grid: this many correctly and wrongly classified test images per class
    cam_images: int = 0  # shortcut score over this many split images (0 = all), seeded subsample
    corruption_images: int = 0  # corruptions scored on this many split images (0 = all), seeded subsample
    annotation_threshold: float = 3.0  # flag a model whose CAM mass on the annotation box exceeds this multiple of its area share
    store_temperature: str = "auto"  # on | off | auto (= on for a registered version holding the champion alias)


@dataclass(frozen=True)
class Config:
    name: str = "demo"  # recipe name, logged
    description: str = ""  # what the recipe's results are (and are not); printed atop the report
    backbones: tuple[str, ...] = ("resnet50", "efficientnet_b3", "inception_v3")  # timm names
    strategies: tuple[str, ...] = ("double",)  # phase-2 starts to compare: double | single | scratch (dtl.strategies)
    register_strategy: str = "double"  # whose models are registered and compete for promotion (none: no model)
    image_size: int = 0  # 0 = the backbone's own timm input size
    precision: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    channels_last: bool = True  # on CUDA only
    compile: bool = False  # torch.compile the model (CUDA)
    seed: int = 0
    deterministic: bool = True  # use_deterministic_algorithms(warn_only) and no cuDNN autotuning (docs/reproducibility.md)
    experiment: str = "all-dtl"  # MLflow experiment (ignored under `mlflow run`, which picks it)
    tracking_uri: str = ""  # empty = MLFLOW_TRACKING_URI or MLflow's default (sqlite:///mlflow.db)
    registered_model: str = "all-dtl"
    policy: str = "registry/policy.yaml"
    cards_dir: str = "registry/cards"  # model cards of promoted versions (the demo writes under outputs/)
    cache_dir: str = ".dtl/cache"  # decoded-image cache and the demo datasets
    work_dir: str = ".dtl/runs"  # checkpoints (only the best per study and running trials)
    report_dir: str = "outputs/report"  # never reports/ for the demo: real results live there
    eval_batch_size: int = 128
    bootstrap: int = 1000  # bootstrap resamples for confidence intervals
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    phase1: PhaseConfig = field(default_factory=_phase1)
    phase2: PhaseConfig = field(default_factory=_phase2)
    fuzzy: FuzzyConfig = field(default_factory=FuzzyConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)

    def phase(self, name: str) -> PhaseConfig:
        if name not in ("phase1", "phase2"):
            raise DTLError(f"unknown phase {name!r}; valid: phase1, phase2")
        return getattr(self, name)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def build_block(default, raw: dict, where: str):
    """``default`` (a config dataclass, e.g. a DataConfig) with the keys of ``raw`` applied and checked."""
    return _build(default, raw, where)


def _build(default, raw: dict, where: str):
    """``default`` (a config dataclass instance) with the keys of ``raw`` applied, each checked
    and coerced to the field's type."""
    known = {f.name: f for f in fields(default)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise DTLError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                       f"valid keys under {where.rstrip('.') or 'top level'}: {', '.join(sorted(known))}")
    changes = {}
    for name, value in raw.items():
        current = getattr(default, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise DTLError(f"config key {where}{name} must be a mapping")
            changes[name] = _build(current, value, f"{where}{name}.")
        else:
            changes[name] = _coerce(value, current, where + name, "None" in str(known[name].type))
    return dataclasses.replace(default, **changes)


def _coerce(value: Any, default: Any, key: str, nullable: bool) -> Any:
    """``value`` as the type of ``default`` (the key's current value). An empty or none int keeps
    the current value (a float refuses it); a ``nullable`` int (``int | None``: val_fold) is cleared
    by none/null and kept only by an empty value."""
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise DTLError(f"config key {key} must be a list, got {value!r}")
        return tuple(value)
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise DTLError(f"config key {key} must be true/false, got {value!r}")
        return bool(value)
    try:
        if isinstance(default, int) or nullable:
            if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
                return default if value == "" or not nullable else None
            return int(value)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise DTLError(f"config key {key} must be a number, got {value!r}") from None
    if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans: keep the user's switch word
        return "on" if value else "off"
    return "" if value is None else str(value)


def parse_override(text: str) -> dict:
    """``"phase2.epochs=3"`` -> ``{"phase2": {"epochs": 3}}`` (the value parsed as YAML)."""
    if "=" not in text:
        raise DTLError(f"override {text!r} must look like key.sub=value")
    key, value = text.split("=", 1)
    parsed = yaml.safe_load(value) if value.strip() else ""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = parsed
    return out


def resolve_recipe(name: str) -> Path:
    """A recipe is a YAML path or a name under ``experiments/`` (``demo`` -> demo.yaml)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = EXPERIMENTS_DIR / f"{name}.yaml"
    if cand.exists():
        return cand
    valid = sorted(q.stem for q in EXPERIMENTS_DIR.glob("*.yaml") if not q.stem.startswith("search_space"))
    raise DTLError(f"config {name!r} not found (neither a YAML file nor experiments/{name}.yaml); "
                   f"valid recipes: {', '.join(valid)}")


def load(recipes: list[str] | tuple[str, ...] = ("demo",), overrides: list[str] | tuple[str, ...] = (),
         check_files: bool = True) -> Config:
    """The dataclass defaults, each recipe (following its ``include:`` list) and the overrides,
    validated (:func:`validate`; ``check_files=False`` skips the existence of ``file:`` weights,
    which only training reads)."""
    raw: dict = {}
    for path in [resolve_recipe(r) for r in recipes]:
        raw = _merge(raw, _read_recipe(path))
    given: dict = {}
    for o in overrides:
        given = _merge(given, parse_override(o))
    # the overrides apply to the recipes' config: an empty number (-o phase2.epochs=) keeps the recipe's value
    cfg = _pin(_build(_build(Config(), raw, ""), given, ""), overrides)
    validate(cfg, check_files)
    return cfg


# Phase keys an override can give that are no search-space parameters.
_NEVER_TUNED = ("data", "search", "pinned", "n_trials", "init", "monitor")


def read_search_space(cfg: Config) -> tuple[Path, dict]:
    """The search-space file of ``tune.search_space`` (relative to experiments/ unless it exists
    as given) and its blocks (``phase1``, ``phase2``, ``fuzzy``)."""
    path = Path(cfg.tune.search_space)
    if not path.is_absolute() and not path.exists():
        path = EXPERIMENTS_DIR / path
    try:
        space = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DTLError(f"cannot read search space {path}: {e}") from None
    if not isinstance(space, dict):
        raise DTLError(f"search space {path} must hold a mapping with phase1/phase2/fuzzy blocks")
    return path, space


def _pin(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A phase key given on the command line (``-o phase2.unfreeze=3`` or a flag) that the search
    space would tune is pinned: the study keeps it at that value (and its identity and runs say
    so) instead of silently tuning over it."""
    given: dict[str, set] = {}
    for o in overrides:
        for ph, block in parse_override(o).items():
            if ph in ("phase1", "phase2") and isinstance(block, dict):
                given.setdefault(ph, set()).update(k for k in block if k not in _NEVER_TUNED)
    if not given:
        return cfg
    path, space = read_search_space(cfg)
    for ph, keys in given.items():
        pc = cfg.phase(ph)
        both = sorted(keys & set(pc.search))
        if both:
            raise DTLError(f"{ph}.{both[0]} is given on the command line and also named in {ph}.search: "
                           f"drop it from {ph}.search to pin it, or drop the override to tune it")
        tuned = set(space.get(ph) or {}) & (set(pc.search) if pc.search else set(space.get(ph) or {}))
        pins = sorted(set(pc.pinned) | (keys & tuned))
        if pins != sorted(pc.pinned):
            cfg = with_phase(cfg, ph, pinned=tuple(pins))
    return cfg


def _read_recipe(path: Path, seen: tuple = ()) -> dict:
    if path in seen:
        raise DTLError(f"recipe include cycle through {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DTLError(f"cannot parse {path}: {e}") from None
    if not isinstance(data, dict):
        raise DTLError(f"{path} must hold a mapping of config keys")
    merged: dict = {}
    for inc in data.pop("include", []) or []:
        merged = _merge(merged, _read_recipe(resolve_recipe(inc), seen + (path,)))
    return _merge(merged, data)


def _choice(value: str, valid: tuple, key: str) -> None:
    if value not in valid:
        raise DTLError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


# Allowed ranges of the numeric keys, in interval notation ("phaseN" = both phases). Checked at
# load time, so a typo'd learning rate fails before any data is read, not in trial 7.
RANGES = {
    "image_size": "[0, inf)", "eval_batch_size": "[1, inf)", "bootstrap": "[0, inf)",
    "augment.rotation": "[0, 180]", "augment.hflip": "[0, 1]", "augment.vflip": "[0, 1]",
    "augment.scale_min": "(0, 1]", "augment.ratio": "[0, inf)", "augment.brightness": "[0, inf)",
    "augment.contrast": "[0, inf)", "augment.saturation": "[0, inf)", "augment.hue": "[0, 0.5]",
    "augment.hed": "[0, 1]", "augment.grey": "[0, 1]",
    "tune.pruner_startup_trials": "[0, inf)", "tune.pruner_warmup_epochs": "[0, inf)",
    "tune.startup_trials": "[-1, inf)", "tune.max_trials": "[0, inf)", "tune.heartbeat_s": "[1, inf)",
    "final.repeats": "[1, inf)", "final.cv_repeats": "[1, inf)", "fuzzy.n_trials": "[1, inf)", "explain.n_per_class": "[1, inf)",
    "explain.cam_images": "[0, inf)", "explain.corruption_images": "[0, inf)", "explain.annotation_threshold": "(0, inf)",
    "phaseN.head_channels": "[1, inf)", "phaseN.head_dropout": "[0, 1)", "phaseN.unfreeze": "[-1, inf)",
    "phaseN.epochs": "[1, inf)", "phaseN.batch_size": "[1, inf)", "phaseN.lr_head": "[0, inf)",
    "phaseN.lr_backbone": "[0, inf)", "phaseN.weight_decay": "[0, inf)", "phaseN.label_smoothing": "[0, 1)",
    "phaseN.warmup_epochs": "[0, inf)", "phaseN.grad_clip": "[0, inf)", "phaseN.early_stop_patience": "[0, inf)",
    "phaseN.aux_weight": "[0, inf)", "phaseN.n_trials": "[1, inf)",
    "phaseN.data.val_fraction": "[0, 1)", "phaseN.data.test_fraction": "[0, 1)",
}
INITS = "imagenet, scratch or file:PATH"


def _in_range(value: float, interval: str) -> bool:
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = value > lo if interval[0] == "(" else value >= lo
    below = value < hi if interval[-1] == ")" else value <= hi
    return above and below


def _check_ranges(cfg: Config) -> None:
    flat = flatten(cfg)
    for pattern, interval in RANGES.items():
        for key in [pattern.replace("phaseN", p) for p in ("phase1", "phase2")] if "phaseN" in pattern else [pattern]:
            if not _in_range(flat[key], interval):
                raise DTLError(f"{key}={flat[key]!r} is out of range; valid: {interval}")


def _check_init(value: str, key: str, check_files: bool) -> None:
    """``imagenet``, ``scratch`` or ``file:PATH`` with an existing file (checked before anything runs)."""
    if value in ("imagenet", "scratch"):
        return
    if not value.startswith("file:"):
        raise DTLError(f"{key}={value!r} is not valid; choose {INITS}")
    if check_files and not Path(value[5:]).is_file():
        raise DTLError(f"{key}={value!r}: no such weights file {value[5:]!r}")


def validate(cfg: Config, check_files: bool = True) -> None:
    """Every choice, range and cross-key rule of a loaded config; the first violation is a
    DTLError naming the key and what is valid."""
    _choice(cfg.precision, PRECISIONS, "precision")
    _choice(cfg.tune.pruner, PRUNERS, "tune.pruner")
    for s in cfg.strategies:
        _choice(s, STRATEGIES, "strategies")
    _choice(cfg.register_strategy, STRATEGIES + ("none",), "register_strategy")
    if not cfg.backbones:
        raise DTLError("backbones is empty; name at least one timm model")
    _check_ranges(cfg)
    for ph in ("phase1", "phase2"):
        p = cfg.phase(ph)
        _choice(p.optimizer, OPTIMIZERS, f"{ph}.optimizer")
        _choice(p.head, HEADS, f"{ph}.head")
        _check_init(p.init, f"{ph}.init", check_files)
        if not p.monitor.startswith("val_"):
            raise DTLError(f"{ph}.monitor={p.monitor!r} must be a validation metric (val_macro_f1, val_loss, ...)")
        if p.data.val_fraction + p.data.test_fraction >= 1:
            raise DTLError(f"{ph}.data.val_fraction + test_fraction must be < 1 (training needs images)")
        validate_data(p.data, f"{ph}.data")
    _choice(cfg.explain.store_temperature, ("auto", "on", "off"), "explain.store_temperature")
    if cfg.final.cv in (1, 2) or cfg.final.cv < 0:  # each fold model: one fold test, the next val, the rest train
        raise DTLError(f"final.cv={cfg.final.cv} is not valid; 0 (off) or K >= 3 folds (one is test, one val, "
                       "the others train)")


def validate_data(d: DataConfig, where: str) -> None:
    """Split protocol, annotation-mask mode, colour and block size of one phase's data block."""
    _choice(d.kind, DATA_KINDS, f"{where}.kind")
    _choice(d.protocol, ("auto",) + kinds.get(d.kind).protocols, f"{where}.protocol (for kind {d.kind})")
    _choice(d.mask_annotation, MASK_MODES, f"{where}.mask_annotation")
    _choice(d.colour, COLOURS, f"{where}.colour")
    _choice(d.variant, ("original", "segmented"), f"{where}.variant")
    if d.cv_folds in (1, 2) or d.cv_folds < 0 or not 0 <= d.cv_fold < max(d.cv_folds, 1) or d.cv_repeat < 0:
        raise DTLError(f"{where}.cv_folds must be 0 (off) or >= 3 (one fold test, one val, the rest train) and 0 <= cv_fold < cv_folds, cv_repeat >= 0; "
                       f"got cv_folds={d.cv_folds}, cv_fold={d.cv_fold}, cv_repeat={d.cv_repeat}")
    given = [k for k in ("train_dir", "val_dir", "test_dir") if getattr(d, k)]
    if given and d.kind != "presplit":
        raise DTLError(f"{where}.{given[0]} is set but {where}.kind is {d.kind!r}: split folders are read only "
                       f"for pre-split data; add -o {where}.kind=presplit (or give {where}.root a folder holding "
                       "train/ and val/)")
    if d.block_size < 1:
        raise DTLError(f"{where}.block_size must be >= 1 (file numbers per acquisition block), "
                       f"got {d.block_size}")


def split_protocol(d: DataConfig) -> str:
    """The split protocol ``d`` asks for, with ``auto`` resolved for its kind."""
    return kinds.get(d.kind).protocols[0] if d.protocol == "auto" else d.protocol


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flat ``{"phase2.lr_head": 0.001, ...}`` view of a config (tuples as comma lists)."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, key + "."))
        elif isinstance(v, tuple):
            out[key] = ",".join(map(str, v))
        else:
            out[key] = v
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """The inverse of :func:`to_dict` (e.g. the config a checkpoint's meta holds)."""
    return _build(Config(), json.loads(json.dumps(d)), "")


def with_phase(cfg: Config, phase: str, **changes) -> Config:
    """A copy of ``cfg`` whose ``phase`` block has ``changes`` applied."""
    return dataclasses.replace(cfg, **{phase: dataclasses.replace(cfg.phase(phase), **changes)})
