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
import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from dtl import DTLError
from dtl.config import Config, to_dict
from dtl.data.cache import BatchLoader, split_array
from dtl.data.datasets import Dataset, load_dataset
from dtl.data.mask import annotation_mask
from dtl.data.transforms import InputSpec
from dtl.engine import cosine_lr, evaluate, predict, resolve_device, resolve_precision, train_one_epoch
from dtl.metrics import confusion, direction, evaluate_predictions
from dtl.models import (
    DTLNet,
    ModelSpec,
    build_model,
    load_backbone_weights,
    load_checkpoint,
    model_from_checkpoint,
    param_groups,
    read_weights,
    resolve_input_spec,
    save_checkpoint,
)

_DATASETS: dict = {}
_LOADERS: dict = {}


def test_hook(point: str) -> None:
    """Kill this process with SIGKILL at ``point`` when DTL_KILL_AT names it (kill/resume tests)."""
    if os.environ.get("DTL_KILL_AT") == point:
        marker = os.environ.get("DTL_KILL_MARKER")
        if not marker or not Path(marker).exists():
            if marker:
                Path(marker).write_text(point)
            os.kill(os.getpid(), signal.SIGKILL)


def dataset(cfg: Config, phase: str) -> Dataset:
    """The phase's dataset, loaded once per process (trials share it)."""
    key = (cfg.phase(phase).data, cfg.cache_dir)
    if key not in _DATASETS:
        _DATASETS[key] = load_dataset(cfg.phase(phase).data, cfg.cache_dir)
    return _DATASETS[key]


def loader(cfg: Config, phase: str, split: str, spec: InputSpec, device: torch.device, batch_size: int,
           train: bool) -> BatchLoader:
    ds = dataset(cfg, phase)
    seg = cfg.phase(phase).data.hsv_segment
    key = (ds.digest, split, spec, seg, str(device))
    if key not in _LOADERS:
        if not (ds.manifest["split"] == split).any():
            raise DTLError(f"{phase} data ({ds.kind} at {ds.root}) has no {split!r} split")
        arr = split_array(ds, split, spec, seg, cfg.cache_dir, progress=True)
        from dtl import distributed as dd

        shard = (dd.rank(), dd.world_size()) if train and dd.active() else (0, 1)
        _LOADERS[key] = BatchLoader(arr, ds.label_ids(split), batch_size, device, shuffle=train, seed=cfg.seed,
                                    shard=shard)
    ld = _LOADERS[key]
    # the cached loader is shared by trials and seed repeats: the batch order follows this run's seed
    ld.batch_size, ld.shuffle, ld.drop_last, ld.seed = batch_size, train, train and len(ld.labels) > batch_size, cfg.seed
    return ld


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
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def init_digest(source: str | Path) -> str:
    """What a run starts from, as a short stable string: the content hash of a weights file or
    checkpoint (``file:PATH`` or a path), else the init name (``scratch``, ``imagenet``)."""
    text = str(source)
    path = Path(text[5:] if text.startswith("file:") else text)
    if isinstance(source, Path) or text.startswith("file:"):
        if not path.is_file():
            raise DTLError(f"initial weights {path} do not exist")
        st = path.stat()
        return "sha256:" + _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)[:16]
    return text


def _same_run(saved: dict, meta: dict) -> bool:
    return saved.get("config") == meta["config"] and saved.get("init_digest") == meta["init_digest"]


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


def _restore(last_path: Path, net: DTLNet, optimizer, scheduler, scaler) -> tuple:
    """Load ``last.pt`` into the model and the training state; returns where to continue."""
    ck = load_checkpoint(last_path)
    try:
        net.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise DTLError(f"{last_path} is a checkpoint of another model ({ck.get('meta', {}).get('spec')}), "
                       f"not {net.spec.backbone} with classes {list(net.spec.classes)}: {str(e)[:300]}. "
                       "Remove it or use another work_dir.") from None
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    if scaler is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    if "rng" in ck:
        torch.set_rng_state(ck["rng"])  # dropout draws continue the interrupted stream
    return (int(ck["epoch"]) + 1, list(ck["history"]), float(ck["best"]), int(ck["best_epoch"]),
            int(ck["skipped"]))


def training_module(net: DTLNet, compile_model: bool, device: torch.device) -> torch.nn.Module:
    """The module the training loop calls. ``compile`` compiles ``net`` in place *before* any
    DDP wrap, as PyTorch advises (Dynamo does not trace the DDP wrapper well); wrapping the
    uncompiled net instead would silently drop the compilation under torchrun."""
    from dtl import distributed as dd

    if compile_model:
        net.compile()  # in place: state_dict keys and checkpoints stay those of the plain module
    if not dd.active():
        return net
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def run_phase(cfg: Config, phase: str, backbone: str, workdir: Path, init_from: str | Path | None = None,
              report: Callable[[int, dict], None] | None = None, resume: bool = True,
              init_label: str | None = None) -> PhaseResult:
    """Train one backbone for one phase; keep ``best.pt`` (by ``monitor``) and ``last.pt`` in
    ``workdir``. With ``resume`` and an existing ``last.pt``, continue where it stopped."""
    # Long because resume, the DDP lock-step with the follower ranks and the loop interleave: moving
    # the rank-0/follower protocol into dtl/distributed.py is the planned "one readable room" refactoring.
    from dtl import distributed as dd

    pc = cfg.phase(phase)
    if dd.active() and dd.is_main():  # followers receive the same job and train their shards
        dd.broadcast({"cfg": to_dict(cfg), "phase": phase, "backbone": backbone, "workdir": str(workdir),
                      "init_from": str(init_from) if init_from else None, "resume": resume, "init_label": init_label})
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    ds = dataset(cfg, phase)
    ispec = replace(resolve_input_spec(backbone, cfg.image_size),
                    mask=annotation_mask(pc.data.mask_annotation, ds.kind, pc.data.variant))
    train_ld = loader(cfg, phase, "train", ispec, device, pc.batch_size, train=True)
    val_ld = loader(cfg, phase, "val", ispec, device, cfg.eval_batch_size, train=False)
    net = _init_model(cfg, phase, backbone, ds.classes, init_from)
    init = init_label or (f"file:{init_from}" if init_from else cfg.phase(phase).init)
    net.set_unfreeze(pc.unfreeze)
    channels_last = cfg.channels_last and device.type == "cuda"
    net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer, scheduler = _optimizer(net, pc, len(train_ld))
    scaler = torch.amp.GradScaler(device.type) if precision.name == "fp16" else None
    weights = _class_weights(ds, device) if pc.class_weights else None
    model = training_module(net, cfg.compile, device)

    workdir.mkdir(parents=True, exist_ok=True)
    best_path, last_path = workdir / "best.pt", workdir / "last.pt"
    sign = -1.0 if direction(pc.monitor) == "minimize" else 1.0  # ``best`` is kept as "higher is better"
    meta = {"phase": phase, "backbone": backbone, "init": init, "init_digest": init_digest(Path(init_from) if init_from else pc.init),
            "input": ispec.to_dict(),
            "data_digest": ds.digest, "data_kind": ds.kind, "protocol": ds.protocol,
            "config": to_dict(cfg)}
    history: list[dict] = []
    start, best, best_epoch, skipped, stale = 0, -float("inf"), -1, 0, 0
    # Resume only a run of this very configuration and starting point: a last.pt left by another
    # trial's settings or started from other weights (e.g. phase 1 retrained, or the Optuna storage
    # deleted but work_dir kept) is overwritten, not loaded.
    if resume and last_path.exists() and _same_run(load_checkpoint(last_path)["meta"], meta):
        start, history, best, best_epoch, skipped = _restore(last_path, net, optimizer, scheduler, scaler)
        stale = start - 1 - best_epoch

    main = dd.is_main()
    for epoch in range(start, pc.epochs):
        train_ld.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        tr = train_one_epoch(model, train_ld, optimizer, scheduler, scaler, precision, ispec, cfg.augment, gen,
                             weights, pc.label_smoothing, pc.grad_clip, channels_last, pc.aux_weight)
        # every rank: same weights, same result; with TTA the same views as the final evaluation, so
        # the value Optuna maximises is the value promotion later reads
        ev = evaluate(net, val_ld, precision, ispec, "val", channels_last, tta=pc.tta)
        skipped += tr["skipped_steps"]
        row = {"epoch": epoch, "train_loss": tr["train_loss"], "lr": tr["lr"],
               "train_images_per_s": tr["train_images_per_s"], "skipped_steps": skipped,
               **{k: v for k, v in ev.items() if k.startswith("val_")}}
        if pc.monitor not in row:
            raise DTLError(f"monitor={pc.monitor!r} is not a validation metric; valid: "
                           f"{', '.join(k for k in row if k.startswith('val_'))}")
        history.append(row)
        value = sign * row[pc.monitor]
        if value > best:
            best, best_epoch, stale = value, epoch, 0
            if main:
                save_checkpoint(best_path, net, {**meta, "epoch": epoch, "metrics": row})
        else:
            stale += 1
        if main:
            save_checkpoint(last_path, net, {**meta, "epoch": epoch}, optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else {},
                            epoch=epoch, history=history, best=best, best_epoch=best_epoch, skipped=skipped,
                            rng=torch.get_rng_state())  # dropout draws: a resumed run continues the same stream
        test_hook(f"{phase}:epoch{epoch}")
        stop = bool(pc.early_stop_patience and stale >= pc.early_stop_patience)
        if not dd.active():
            if report is not None:
                report(epoch, row)
        elif main:
            try:
                if report is not None:
                    report(epoch, row)
            except BaseException:
                dd.broadcast(True)  # pruned or failed: release the followers from this job
                raise
            dd.broadcast(stop)
        elif dd.broadcast(None):
            raise dd._Stop()
        if stop:
            break
    best_value = sign * best
    return PhaseResult(phase, backbone, best_value, best_epoch, best_path, history, skipped, precision.name,
                       str(device), init)


def bootstrap_units(table) -> tuple[str, object]:
    """What a bootstrap resamples for a split's manifest rows: patients where every row has one
    (C-NMC), else near-duplicate groups where the manifest has them, else images."""
    patients = table["patient"].astype(str)
    if len(table) and (patients != "").all():
        return "patient", patients.to_numpy()
    if "group" in table and len(table) and (table["group"].astype(str) != "").all():
        return "group", table["group"].astype(str).to_numpy()
    return "image", None


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
    out = {"metrics": {}, "confusion": {}, "predictions": {}, "ci_unit": {}}
    for split in splits:
        if not (ds.manifest["split"] == split).any():
            continue
        ld = loader(cfg, phase, split, ispec, device, cfg.eval_batch_size, train=False)
        probs, y = predict(net, ld, precision, ispec, tta=pc.tta)
        unit, groups = bootstrap_units(ds.split(split))
        out["ci_unit"][split] = unit
        out["metrics"].update(evaluate_predictions(y, probs, ds.classes, split, cfg.bootstrap, cfg.seed, groups))
        out["confusion"][split] = confusion(y, probs.argmax(1), ds.classes)
        table = ds.split(split)[["path", "label"]].copy()
        table["bootstrap_unit"] = groups if groups is not None else table["path"]  # for paired comparisons
        table["predicted"] = [ds.classes[i] for i in probs.argmax(1)]
        for i, c in enumerate(ds.classes):
            table[f"p_{c}"] = probs[:, i].round(5)
        out["predictions"][split] = table
    return out

