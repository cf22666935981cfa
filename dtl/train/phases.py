"""``run_phase``: one function for both phases.

The phase decides the data, the head, what is frozen, the parameter groups and where the
weights come from; everything else is shared. Tracking and tuning reach in only through the
``report`` callback (called once per epoch with a flat metrics row).
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from dtl import DTLError
from dtl.config import Config, PhaseConfig, to_dict
from dtl.data import store
from dtl.data.cache import BatchLoader
from dtl.data.datasets import Dataset
from dtl.data.splits import resampling_units
from dtl.evaluation.metrics import Evaluation, confusion, direction, evaluate_predictions
from dtl.model.mask import annotation_mask
from dtl.model.net import DTLNet, ModelSpec
from dtl.model.preprocess import InputSpec
from dtl.tracking import schema
from dtl.train import distributed, faults
from dtl.train.engine import cosine_lr, evaluate, predict, resolve_device, resolve_precision, train_one_epoch
from dtl.train.weights import (
    build_model,
    load_backbone_weights,
    load_checkpoint,
    model_from_checkpoint,
    param_groups,
    read_weights,
    resolve_input_spec,
    save_checkpoint,
)


def dataset(cfg: Config, phase: str) -> Dataset:
    """The phase's dataset from the job's data store (trials and repeats share it)."""
    return store.current().dataset(cfg.phase(phase).data, cfg.cache_dir)


def loader(cfg: Config, phase: str, split: str, spec: InputSpec, device: torch.device, batch_size: int,
           train: bool) -> BatchLoader:
    """Batches of one split of the phase's data, ordered by this run's seed (sharded under DDP)."""
    return store.current().loader(dataset(cfg, phase), split, spec, cfg.phase(phase).data.hsv_segment,
                                  cfg.cache_dir, device, batch_size, train, cfg.seed, distributed.shard(train))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


@dataclass
class PhaseResult:
    phase: str
    backbone: str
    best_value: float
    best_epoch: int
    checkpoint: Path
    history: list[dict] = field(default_factory=list)
    skipped_steps: int = 0
    precision: str = "fp32"
    device: str = "cpu"
    init: str = ""


@functools.lru_cache(maxsize=64)
def _weights_digest(path: str, size: int, mtime_ns: int) -> str:
    """Content hash of the tensors a weights file holds (names, dtypes, shapes, values), in name
    order: the same weights give the same digest whatever else the file carries (a checkpoint's
    measured throughput, its config with paths) and whichever format holds them (a phase-1
    ``best.pt`` or the logged model's safetensors)."""
    h = hashlib.sha256()
    for name, t in sorted(read_weights(Path(path)).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def init_digest(source: str | Path) -> str:
    """What a run starts from, as a short stable string: the content hash of the weights in a
    weights file or checkpoint (``file:PATH`` or a path), else the init name (``scratch``,
    ``imagenet``). Never a hash of the file's bytes: those change with what a checkpoint
    measured, which would give the same start another study identity."""
    text = str(source)
    path = Path(text[5:] if text.startswith("file:") else text)
    if isinstance(source, Path) or text.startswith("file:"):
        if not path.is_file():
            raise DTLError(f"initial weights {path} do not exist")
        st = path.stat()
        return "sha256:" + _weights_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)[:16]
    return text


# Config blocks that do not change what training computes (reporting, registration, later jobs):
# editing them between a kill and the rerun must not throw the interrupted run's last.pt away,
# and they are no part of a study's identity.
NOT_TRAINING = ("name", "description", "experiment", "tracking_uri", "registered_model", "register_strategy",
                "policy", "cards_dir", "report_dir", "final", "fuzzy", "explain", "work_dir", "cache_dir",
                "backbones", "strategies", "bootstrap")
# Where things are, not what they are (the data digest says what the files hold).
_PATH_KEYS = ("root", "train_dir", "val_dir", "test_dir", "labels_csv")


# Training settings added after stores with study identities existed: left out of the identity
# while at their default, so a study made before they existed is found again.
ADDED_AT_DEFAULT = {"augment.hed": 0.0, "augment.grey": 0.0, "phase1.data.colour": "raw", "phase2.data.colour": "raw"}


def label_of(colour: str = "raw", segment: bool = False, hed: float = 0.0, grey: float = 0.0) -> str:
    """``"colour=greyscale, segment=hsv, hed=0.05"``: the settings off their default, or ``"default"``."""
    vals = {"colour": (colour, "raw"), "segment": ("hsv" if segment else "", ""), "hed": (float(hed), 0.0),
            "grey": (float(grey), 0.0)}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, (v, d) in vals.items() if v != d) or "default"


def preprocessing_of(tags: dict, params: dict) -> str:
    """A study's ``preprocessing`` tag, or for studies from before it, the same label built from the
    config params it logged (colour, HSV segmentation, stain augmentation)."""
    if schema.PREPROCESSING in tags:
        return tags[schema.PREPROCESSING]
    ph = tags.get(schema.PHASE, "phase2")
    return label_of(params.get(f"{ph}.data.colour", "raw"), params.get(f"{ph}.data.hsv_segment") == "True",
                    params.get("augment.hed", 0.0), params.get("augment.grey", 0.0))


def preprocessing_label(cfg: Config, phase: str, augment: bool = True) -> str:
    """The colour, HSV-segmentation and (with ``augment``) stain-augmentation settings of ``phase``
    off their defaults (:func:`label_of`): models trained with and without them are separate rows
    of the results table. Without ``augment``: what the model's input is, as a baseline sees it."""
    d = cfg.phase(phase).data
    return label_of(d.colour, d.hsv_segment, cfg.augment.hed if augment else 0.0, cfg.augment.grey if augment else 0.0)


def input_part(label: str) -> str:
    """The input-preprocessing part of a :func:`label_of` label (augmentation items dropped)."""
    return ", ".join(x for x in label.split(", ") if x.split("=")[0] in ("colour", "segment")) or "default"


def _drop_at_default(d: dict, path: list[str], default) -> dict:
    """``d`` without the dotted key ``path`` where it holds ``default`` (a copy; ``d`` as it is otherwise)."""
    head, rest = path[0], path[1:]
    if not isinstance(d, dict) or head not in d:
        return d
    if rest:
        return {**d, head: _drop_at_default(d[head], rest, default)}
    return {k: v for k, v in d.items() if k != head} if d[head] == default else d


def training_config(config: dict | None) -> dict:
    """The part of a config dict (:func:`dtl.config.to_dict`) that training computes from: no
    reporting blocks, no paths, no storage URLs. Study identities and the resume check use it."""
    out = {k: v for k, v in (config or {}).items() if k not in NOT_TRAINING}
    for phase in ("phase1", "phase2"):
        if isinstance(out.get(phase), dict):
            block = dict(out[phase])
            block.pop("n_trials", None)  # a study may grow its budget without becoming another study
            block["data"] = {k: v for k, v in (block.get("data") or {}).items() if k not in _PATH_KEYS}
            out[phase] = block
    for key, default in ADDED_AT_DEFAULT.items():  # settings newer than the identity: absent at their default
        out = _drop_at_default(out, key.split("."), default)
    if isinstance(out.get("tune"), dict):
        out["tune"] = {k: v for k, v in out["tune"].items() if k not in ("storage", "heartbeat_s")}
    return out


def _same_run(saved: dict, meta: dict) -> bool:
    return (training_config(saved.get("config")) == training_config(meta["config"])
            and saved.get("init_digest") == meta["init_digest"])


def _init_model(cfg: Config, phase: str, backbone: str, classes: list[str], init_from: str | Path | None) -> DTLNet:
    pc = cfg.phase(phase)
    spec = ModelSpec(backbone, tuple(classes), pc.head, pc.head_channels, pc.head_dropout,
                     aux=pc.aux_weight > 0 and backbone.split(".")[0] == "inception_v3")
    if init_from:  # a phase-1 checkpoint (or a weights file): backbone keys only, the head is new
        net = build_model(spec, "scratch")
        path = Path(init_from)
        state = read_weights(path) if path.suffix == ".safetensors" else load_checkpoint(path).get("model")
        if state is None:
            raise DTLError(f"{path} holds no model weights")
        load_backbone_weights(net, state, str(path))
        return net
    return build_model(spec, pc.init)


def _optimizer(net: DTLNet, pc, steps_per_epoch: int):
    """AdamW/Adamax over discriminative parameter groups; per-step cosine with warm-up."""
    groups = param_groups(net, pc.lr_head, pc.lr_backbone, pc.weight_decay)
    opt_cls = torch.optim.AdamW if pc.optimizer == "adamw" else torch.optim.Adamax
    optimizer = opt_cls(groups, lr=pc.lr_head)
    steps, warm = pc.epochs * steps_per_epoch, pc.warmup_epochs * steps_per_epoch
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, warm))


def _class_weights(ds: Dataset, device: torch.device) -> torch.Tensor:
    """Inverse-frequency cross-entropy weights from the training split."""
    counts = np.bincount(ds.label_ids("train"), minlength=len(ds.classes)).astype(np.float64)
    return torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)


def _restore(last_path: Path, t: _Setup) -> _Progress:
    """Load ``last.pt`` into the model and the training state; returns where to continue."""
    ck = load_checkpoint(last_path)
    try:
        t.net.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise DTLError(f"{last_path} is a checkpoint of another model ({ck.get('meta', {}).get('spec')}), "
                       f"not {t.net.spec.backbone} with classes {list(t.net.spec.classes)}: {str(e)[:300]}. "
                       "Remove it or use another work_dir.") from None
    t.optimizer.load_state_dict(ck["optimizer"])
    t.scheduler.load_state_dict(ck["scheduler"])
    if t.scaler is not None and ck.get("scaler"):
        t.scaler.load_state_dict(ck["scaler"])
    if "rng" in ck:
        torch.set_rng_state(ck["rng"])  # dropout draws continue the interrupted stream
    start = int(ck["epoch"]) + 1
    return _Progress(start, list(ck["history"]), float(ck["best"]), int(ck["best_epoch"]), int(ck["skipped"]),
                     stale=start - 1 - int(ck["best_epoch"]))


def training_module(net: DTLNet, compile_model: bool, device: torch.device) -> torch.nn.Module:
    """The module the training loop calls. ``compile`` compiles ``net`` in place *before* any
    DDP wrap, as PyTorch advises (Dynamo does not trace the DDP wrapper well); wrapping the
    uncompiled net instead would silently drop the compilation under torchrun."""
    if compile_model:
        net.compile()  # in place: state_dict keys and checkpoints stay those of the plain module
    if not distributed.active():
        return net
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


@dataclass
class _Setup:
    """What one ``run_phase`` call trains with."""

    net: DTLNet
    model: torch.nn.Module  # ``net``, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    weights: torch.Tensor | None  # class weights of the loss
    train_ld: BatchLoader
    val_ld: BatchLoader
    ispec: InputSpec
    precision: object
    device: torch.device
    channels_last: bool
    meta: dict  # written into every checkpoint


@dataclass
class _Progress:
    """The loop's state, saved in ``last.pt``. ``best`` is kept as "higher is better"."""

    start: int = 0
    history: list = field(default_factory=list)
    best: float = -float("inf")
    best_epoch: int = -1
    skipped: int = 0
    stale: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record the epoch's monitored value (sign applied); True when it is the new best."""
        if value > self.best:
            self.best, self.best_epoch, self.stale = value, epoch, 0
            return True
        self.stale += 1
        return False


def run_phase(cfg: Config, phase: str, backbone: str, workdir: Path, init_from: str | Path | None = None,
              report: Callable[[int, dict], None] | None = None, resume: bool = True,
              init_label: str | None = None) -> PhaseResult:
    """Train one backbone for one phase; keep ``best.pt`` (by ``monitor``) and ``last.pt`` in
    ``workdir``. With ``resume`` and an existing ``last.pt``, continue where it stopped.
    ``report(epoch, row)`` is called once per epoch (rank 0 only under DDP)."""
    distributed.lead({"cfg": cfg, "phase": phase, "backbone": backbone, "workdir": workdir, "init_from": init_from,
                      "resume": resume, "init_label": init_label})  # followers train their shards
    pc = cfg.phase(phase)
    seed_everything(cfg.seed, cfg.deterministic)
    t = _setup(cfg, phase, backbone, init_from, init_label)
    workdir.mkdir(parents=True, exist_ok=True)
    best_path, last_path = workdir / "best.pt", workdir / "last.pt"
    sign = -1.0 if direction(pc.monitor) == "minimize" else 1.0
    state = _Progress()
    # Resume only a run of this very configuration and starting point: a last.pt left by another
    # trial's settings or started from other weights (e.g. phase 1 retrained, or the Optuna storage
    # deleted but work_dir kept) is overwritten, not loaded.
    if resume and last_path.exists() and _same_run(load_checkpoint(last_path)["meta"], t.meta):
        state = _restore(last_path, t)
    for epoch in range(state.start, pc.epochs):
        row = _epoch(t, cfg, pc, epoch, state)
        if state.update(sign * row[pc.monitor], epoch) and distributed.is_main():
            save_checkpoint(best_path, t.net, {**t.meta, "epoch": epoch, "metrics": row})
        if distributed.is_main():
            _save_last(last_path, t, state, epoch)
        faults.kill_point(f"{phase}:epoch{epoch}")
        stop = bool(pc.early_stop_patience and state.stale >= pc.early_stop_patience)
        distributed.end_epoch(report, epoch, row, stop)
        if stop:
            break
    return PhaseResult(phase, backbone, sign * state.best, state.best_epoch, best_path, state.history, state.skipped,
                       t.precision.name, str(t.device), t.meta["init"])


_FOLLOWED: dict = {}


def follower_job(**job) -> PhaseResult:
    """A DDP follower's ``run_phase``: its data store is released when the backbone changes, as
    rank 0's pipeline releases its own per backbone."""
    if _FOLLOWED.get("backbone") != job["backbone"]:
        store.current().release()
        _FOLLOWED["backbone"] = job["backbone"]
    return run_phase(**job)


def _setup(cfg: Config, phase: str, backbone: str, init_from: str | Path | None, init_label: str | None) -> _Setup:
    """Data, model, optimiser, schedule and loss weights of one phase run."""
    pc = cfg.phase(phase)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    ds = dataset(cfg, phase)
    ispec = replace(resolve_input_spec(backbone, cfg.image_size),
                    mask=annotation_mask(pc.data.mask_annotation, ds.kind, pc.data.variant), colour=pc.data.colour)
    train_ld = loader(cfg, phase, "train", ispec, device, pc.batch_size, train=True)
    val_ld = loader(cfg, phase, "val", ispec, device, cfg.eval_batch_size, train=False)
    net = _init_model(cfg, phase, backbone, ds.classes, init_from)
    net.set_unfreeze(pc.unfreeze)
    channels_last = cfg.channels_last and device.type == "cuda"
    net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer, scheduler = _optimizer(net, pc, len(train_ld))
    meta = {"phase": phase, "backbone": backbone,
            "init": init_label or (f"file:{init_from}" if init_from else pc.init),
            "init_digest": init_digest(Path(init_from) if init_from else pc.init), "input": ispec.to_dict(),
            "data_digest": ds.digest, "data_kind": ds.kind, "protocol": ds.protocol, "config": to_dict(cfg)}
    return _Setup(net, training_module(net, cfg.compile, device), optimizer, scheduler,
                  torch.amp.GradScaler(device.type) if precision.name == "fp16" else None,
                  _class_weights(ds, device) if pc.class_weights else None, train_ld, val_ld, ispec, precision,
                  device, channels_last, meta)


def _epoch(t: _Setup, cfg: Config, pc: PhaseConfig, epoch: int, state: _Progress) -> dict:
    """Train one epoch and validate; the epoch's flat metrics row, appended to the history."""
    t.train_ld.set_epoch(epoch)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
    tr = train_one_epoch(t.model, t.train_ld, t.optimizer, t.scheduler, t.scaler, t.precision, t.ispec, cfg.augment,
                         gen, t.weights, pc.label_smoothing, pc.grad_clip, t.channels_last, pc.aux_weight)
    # every rank: same weights, same result; with TTA the same views as the final evaluation, so
    # the value Optuna maximises is the value promotion later reads
    ev = evaluate(t.net, t.val_ld, t.precision, t.ispec, "val", t.channels_last, tta=pc.tta)
    state.skipped += tr["skipped_steps"]
    row = {"epoch": epoch, "train_loss": tr["train_loss"], "lr": tr["lr"],
           "train_images_per_s": tr["train_images_per_s"], "skipped_steps": state.skipped,
           **{k: v for k, v in ev.items() if k.startswith("val_")}}
    if pc.monitor not in row:
        raise DTLError(f"monitor={pc.monitor!r} is not a validation metric; valid: "
                       f"{', '.join(k for k in row if k.startswith('val_'))}")
    state.history.append(row)
    return row


def _save_last(path: Path, t: _Setup, state: _Progress, epoch: int) -> None:
    save_checkpoint(path, t.net, {**t.meta, "epoch": epoch}, optimizer=t.optimizer.state_dict(),
                    scheduler=t.scheduler.state_dict(), scaler=t.scaler.state_dict() if t.scaler else {},
                    epoch=epoch, history=state.history, best=state.best, best_epoch=state.best_epoch,
                    skipped=state.skipped,
                    rng=torch.get_rng_state())  # dropout draws: a resumed run continues the same stream


def bootstrap_units(table) -> tuple[str, object]:
    """What a bootstrap resamples for a split's manifest rows (:func:`dtl.data.splits.resampling_units`)."""
    return resampling_units(table)


def evaluate_checkpoint(cfg: Config, phase: str, checkpoint: Path, splits=("val", "test")) -> dict:
    """Final evaluation of a checkpoint: metrics with bootstrap CIs, confusion matrices and a
    predictions table per split (the test split is touched here, once, after tuning)."""
    pc = cfg.phase(phase)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    net, meta = model_from_checkpoint(checkpoint)
    ds = dataset(cfg, phase)
    if list(net.spec.classes) != ds.classes:
        raise DTLError(f"checkpoint {checkpoint} was trained on classes {list(net.spec.classes)}, "
                       f"the {phase} data has {ds.classes}")
    ispec = InputSpec.from_dict(meta["input"])
    net.to(device)
    out = Evaluation()
    for split in splits:
        if not (ds.manifest["split"] == split).any():
            continue
        ld = loader(cfg, phase, split, ispec, device, cfg.eval_batch_size, train=False)
        probs, y = predict(net, ld, precision, ispec, tta=pc.tta)
        add_split(out, cfg, ds, split, probs, y)
    return out


def add_split(out: Evaluation, cfg: Config, ds, split: str, probs: np.ndarray, y: np.ndarray) -> None:
    """One split's metrics with bootstrap CIs over its units, confusion matrix and per-item
    predictions table (for paired comparisons) into ``out``."""
    unit, groups = bootstrap_units(ds.split(split))
    out.ci_unit[split] = unit
    out.metrics.update(evaluate_predictions(y, probs, ds.classes, split, cfg.bootstrap, cfg.seed, groups))
    out.confusion[split] = confusion(y, probs.argmax(1), ds.classes)
    table = ds.split(split)[["path", "label"]].copy()
    table["bootstrap_unit"] = groups if groups is not None else table["path"]  # for paired comparisons
    table["predicted"] = [ds.classes[i] for i in probs.argmax(1)]
    for i, c in enumerate(ds.classes):
        table[f"p_{c}"] = probs[:, i].round(5)
    out.predictions[split] = table

