"""Training throughput of one backbone, three ways, in one run on the same device:

(a) model-only ceiling: a normalised batch already on the device, forward + backward + AdamW;
(b) the project's pipeline: decoded uint8 cache resident on the device, batched per-sample
    augmentation (one affine warp + colour jitter), normalisation, channels_last, step —
    exactly ``dtl.engine.train_one_epoch``;
(c) the plain pipeline a user writes first: torchvision ``ImageFolder`` + PIL transforms +
    ``DataLoader(num_workers=N)``, same step;
(d) optional: kornia ``AugmentationSequential`` on the resident batch (when kornia is installed);
plus evaluation throughput (project path) and the pyfunc model's CPU inference (batch 32), and
each path's ``ratio_to_ceiling`` (its images/s over (a)).

    python -m bench.throughput --backbone resnet50 --data ../shared/datasets/aria-all-pbs-2021
    python -m bench.throughput --backbone test_resnet --image-size 64 --device cpu --steps 5   # smoke

Writes ``<out>/<backbone>-<device>-<precision>.json`` and ``.md`` (GPU name, versions, ratios).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.summary import ratios
from dtl.config import AugmentConfig, DataConfig
from dtl.data.cache import BatchLoader, split_array
from dtl.data.datasets import load_dataset
from dtl.model.net import DTLNet, ModelSpec
from dtl.train.engine import Precision, predict, resolve_device, resolve_precision, train_one_epoch
from dtl.train.weights import param_groups, resolve_input_spec


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _model(backbone, n_classes, device, channels_last, compile_):
    net = DTLNet(ModelSpec(backbone, tuple(str(i) for i in range(n_classes)), "pbs", 256, 0.2)).to(device)
    net.set_unfreeze(-1)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups(net, 1e-3, 1e-4, 0.05))
    model = torch.compile(net, backend=compile_) if compile_ else net
    return net, model, opt


def _step(model, opt, x, y, precision: Precision, scaler):
    with precision.autocast():
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


def ceiling(args, spec, device, precision, n_classes) -> float:
    _, model, opt = _model(args.backbone, n_classes, device, args.channels_last, args.compile)
    scaler = torch.amp.GradScaler(device.type) if precision.name == "fp16" else None
    x = torch.randn(args.batch_size, 3, spec.size, spec.size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, n_classes, (args.batch_size,), device=device)
    for _ in range(args.warmup):
        _step(model, opt, x, y, precision, scaler)
    _sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        _step(model, opt, x, y, precision, scaler)
    _sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - t)


def project(args, ds, spec, device, precision) -> tuple[float, float]:
    arr = split_array(ds, "train", spec, False, args.cache_dir, progress=True)
    labels = ds.label_ids("train")
    ld = BatchLoader(arr, labels, args.batch_size, device, shuffle=True, seed=0, drop_last=True)
    _, model, opt = _model(args.backbone, len(ds.classes), device, args.channels_last, args.compile)
    scaler = torch.amp.GradScaler(device.type) if precision.name == "fp16" else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)
    limited = _Limited(ld, args.warmup)
    train_one_epoch(model, limited, opt, sched, scaler, precision, spec, AugmentConfig(), gen,
                    channels_last=args.channels_last)
    _sync(device)
    limited = _Limited(ld, args.steps)
    t = time.perf_counter()
    train_one_epoch(model, limited, opt, sched, scaler, precision, spec, AugmentConfig(), gen,
                    channels_last=args.channels_last)
    _sync(device)
    train_ips = limited.seen / (time.perf_counter() - t)
    ev = BatchLoader(arr, labels, args.eval_batch_size, device, shuffle=False)
    t = time.perf_counter()
    probs, _ = predict(model, _Limited(ev, args.steps), precision, spec, channels_last=args.channels_last)
    _sync(device)
    return train_ips, len(probs) / (time.perf_counter() - t)


class _Limited:
    """At most ``n`` batches of a loader (cycling), counting images."""

    def __init__(self, loader, n):
        self.loader, self.n, self.seen = loader, n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        k, epoch = 0, 0
        while True:
            self.loader.set_epoch(epoch)
            for x, y in self.loader:
                if k == self.n:
                    return
                self.seen += len(y)
                k += 1
                yield x, y
            epoch += 1


def plain(args, ds, spec, device, precision) -> float:
    """torchvision ImageFolder + PIL transforms + DataLoader workers, the usual first pipeline."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(spec.size, scale=(0.7, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.RandomVerticalFlip(), transforms.RandomRotation(180),
        transforms.ColorJitter(0.2, 0.2, 0.2), transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    folder = datasets.ImageFolder(str(ds.root), transform=tf)
    dl = torch.utils.data.DataLoader(folder, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                     num_workers=args.workers, pin_memory=device.type == "cuda",
                                     persistent_workers=args.workers > 0)
    _, model, opt = _model(args.backbone, len(folder.classes), device, args.channels_last, args.compile)
    scaler = torch.amp.GradScaler(device.type) if precision.name == "fp16" else None

    def run(n):
        seen, k = 0, 0
        while k < n:
            for x, y in dl:
                x = x.to(device, non_blocking=True)
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                _step(model, opt, x, y.to(device, non_blocking=True), precision, scaler)
                seen += len(y)
                k += 1
                if k == n:
                    break
        _sync(device)
        return seen

    run(args.warmup)
    t = time.perf_counter()
    seen = run(args.steps)
    return seen / (time.perf_counter() - t)


def kornia_variant(args, ds, spec, device, precision) -> float | None:
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    arr = split_array(ds, "train", spec, False, args.cache_dir)
    ld = BatchLoader(arr, ds.label_ids("train"), args.batch_size, device, shuffle=True, drop_last=True)
    aug = K.AugmentationSequential(
        K.RandomResizedCrop((spec.size, spec.size), scale=(0.7, 1.0)), K.RandomHorizontalFlip(),
        K.RandomVerticalFlip(), K.RandomRotation(180.0), K.ColorJitter(0.2, 0.2, 0.2, p=1.0))
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    _, model, opt = _model(args.backbone, len(ds.classes), device, args.channels_last, args.compile)
    scaler = torch.amp.GradScaler(device.type) if precision.name == "fp16" else None

    def run(n):
        it = _Limited(ld, n)
        for x_u8, y in it:
            x = (aug(x_u8.permute(0, 3, 1, 2).float() / 255) - mean) / std
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            _step(model, opt, x, y, precision, scaler)
        _sync(device)
        return it.seen

    run(args.warmup)
    t = time.perf_counter()
    return run(args.steps) / (time.perf_counter() - t)


def pyfunc_cpu(args, spec, n_classes) -> float:
    from dtl.model.pyfunc import ImageClassifier

    net = DTLNet(ModelSpec(args.backbone, tuple(str(i) for i in range(n_classes)), "pbs", 256, 0.2))
    clf = ImageClassifier(net, [str(i) for i in range(n_classes)], spec, batch_size=32)
    imgs = list(np.random.default_rng(0).integers(0, 255, (args.pyfunc_images, 224, 224, 3), dtype=np.uint8))
    clf.predict_proba(imgs[:32])
    t = time.perf_counter()
    clf.predict_proba(imgs)
    return len(imgs) / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True)
    p.add_argument("--data", default="", help="Aria ALL root (default: the demo set)")
    p.add_argument("--variant", default="original")
    p.add_argument("--image-size", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--compile", nargs="?", const="inductor", default="",
                   help="torch.compile the model (backend: inductor, or eager/aot_eager for a quick CPU check)")
    p.add_argument("--pyfunc-images", type=int, default=64, help="images of the pyfunc measurement (224x224)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--skip", default="", help="comma list of parts to skip: train (a-d), plain, kornia, pyfunc")
    p.add_argument("--cache-dir", default=".dtl/cache")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    args.channels_last = args.channels_last and device.type == "cuda"
    precision = resolve_precision(args.precision, device)
    dc = DataConfig(kind="aria", root=args.data, variant=args.variant) if args.data else DataConfig(kind="demo-aria")
    ds = load_dataset(dc, args.cache_dir)
    spec = resolve_input_spec(args.backbone, args.image_size)
    skip = set(args.skip.split(",")) if args.skip else set()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    res: dict = {"backbone": args.backbone, "input": spec.size, "batch_size": args.batch_size,
                 "precision": precision.name, "compile": args.compile or False, "channels_last": args.channels_last,
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                 "torch": torch.__version__, "timm": __import__("timm").__version__, "data": str(ds.root),
                 "train_images": int((ds.manifest["split"] == "train").sum()), "steps": args.steps}
    if "train" not in skip:
        res["a_model_only_img_s"] = ceiling(args, spec, device, precision, len(ds.classes))
        res["b_project_img_s"], res["eval_project_img_s"] = project(args, ds, spec, device, precision)
        if "plain" not in skip:
            res["c_plain_img_s"] = plain(args, ds, spec, device, precision)
        if "kornia" not in skip:
            res["d_kornia_img_s"] = kornia_variant(args, ds, spec, device, precision)
    if device.type == "cuda":
        res["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if "pyfunc" not in skip:
        res["pyfunc_cpu_img_s_batch32"] = pyfunc_cpu(args, spec, len(ds.classes))
    if "train" not in skip:
        res["b_over_a"] = res["b_project_img_s"] / res["a_model_only_img_s"]
        if res.get("c_plain_img_s"):
            res["b_over_c"] = res["b_project_img_s"] / res["c_plain_img_s"]
        from dtl.data.cache import cache_key

        cached = Path(args.cache_dir) / "arrays" / f"{cache_key(ds, 'train', spec, False)}.npy"
        res["cache_over_raw_uint8"] = cached.stat().st_size / (res["train_images"] * spec.cache_size ** 2 * 3)
        res["ratio_to_ceiling"] = ratios(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = "-pyfunc-only" if "train" in skip else ""
    stem = out / f"{args.backbone}-{device.type}-{precision.name}{'-compile' if args.compile else ''}{parts}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2))
    flat = {**{k: v for k, v in res.items() if k != "ratio_to_ceiling"},
            **{f"ratio_to_ceiling.{k}": v for k, v in res.get("ratio_to_ceiling", {}).items()}}
    rows = [(k, f"{v:,.1f}" if isinstance(v, float) and v > 10 else (f"{v:.3f}" if isinstance(v, float) else str(v)))
            for k, v in flat.items()]
    md = "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
