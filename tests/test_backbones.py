"""The seed's three real backbones through the project's own path, on the CPU, on real Aria images.

Each of ResNet-50, EfficientNet-B3 and InceptionV3 is built without weights at the input size
timm's data config gives it (224 / 288 / 299; EfficientNet-B3's paper size is 300, timm's
``ra2_in1k`` recipe trains at 288) and goes through what a user's first real run does:
``run_phase`` on a few real Aria images per class (the engine's training steps and validation),
unfreezing at every allowed depth (an engine step at two of them, all stages under CPU bf16 autocast), the checkpoint
logged as an MLflow model in a real sqlite store, registered, loaded back as pyfunc and asked
about a real Aria image at its native size, Grad-CAM at the backbone's target layer and the
fuzzy head's feature extraction. Peak memory and seconds per step go to the test log.
Batch 4, one epoch of 3 steps: the point is that nothing in the path breaks, not the accuracy.
"""

import resource
import shutil
import time

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from dtl import config
from dtl.config import AugmentConfig
from dtl.data import store
from dtl.explain.core import grad_cams, target_layer
from dtl.fuzzy.job import embed
from dtl.model.preprocess import InputSpec, eval_transform
from dtl.model.pyfunc import ImageClassifier
from dtl.tracking import schema
from dtl.tracking.adapter import connect, start_run
from dtl.tracking.registry import log_model, register
from dtl.train.engine import Precision, train_one_epoch
from dtl.train.phases import run_phase
from dtl.train.weights import model_from_checkpoint, param_groups
from tests.conftest import require_real_data

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

ARIA_CLASSES = ("Benign", "Early", "Pre", "Pro")
PER_CLASS = 5  # 20 images: 12 train (3 steps of 4), 4 val, 4 test
# backbone: (input size, Grad-CAM layer, stage groups)
BACKBONES = {"resnet50": (224, "backbone.layer4", 5), "efficientnet_b3": (288, "backbone.bn2", 8),
             "inception_v3": (299, "backbone.Mixed_7c", 13)}


def tiny_aria(shared, dst):
    """``PER_CLASS`` real Aria ``Original`` images per class, 40 file numbers apart (never one
    smear field twice), in the downloaded layout."""
    for cls in ARIA_CLASSES:
        files = sorted((shared / "aria-all-pbs-2021" / "Original" / cls).glob("*.jpg"))[::40][:PER_CLASS]
        (dst / "Original" / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(f, dst / "Original" / cls / f.name)
    return dst


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def top_groups(groups, k: int) -> set[str]:
    return {n for g in (groups if k < 0 else groups[len(groups) - k:] if k else []) for n in g}


def check_unfreezing_under_autocast(net, n_groups: int, size: int = 80) -> None:
    """At every depth 0..n and -1, exactly the head and the top k stage groups are trainable and the
    frozen BatchNorm layers stay in eval mode in training; then one engine step at a middle depth
    (fp32) and one with all stages under CPU bf16 autocast: exactly the trainable weights change,
    frozen BatchNorm statistics stay. (One step per depth would cost minutes on 2 cores.)"""
    groups = net.stage_groups()
    assert len(groups) == n_groups
    params = {n for n, _ in net.named_parameters()}
    for k in [*range(n_groups + 1), -1]:
        net.set_unfreeze(k)
        net.train()
        trainable = {n[len("backbone."):] for n, p in net.named_parameters() if p.requires_grad and n.startswith("backbone.")}
        assert trainable == top_groups(groups, k), (k, sorted(trainable ^ top_groups(groups, k))[:5])
        assert all(p.requires_grad for n, p in net.named_parameters() if not n.startswith("backbone."))
        frozen_bn = [m for m in net.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                     and not any(p.requires_grad for p in m.parameters(recurse=False))]
        assert not any(m.training for m in frozen_bn) and (bool(frozen_bn) if k == 0 else not frozen_bn if k < 0 else True), k
    x = torch.randint(0, 255, (2, size + 8, size + 8, 3), dtype=torch.uint8)
    spec = InputSpec(size, size + 8, (0.5,) * 3, (0.5,) * 3)
    for k in (n_groups // 2, -1):
        net.set_unfreeze(k)
        top = top_groups(groups, k)
        before = {n: t.detach().clone() for n, t in net.state_dict().items()}
        opt = torch.optim.AdamW(param_groups(net, 1e-2, 1e-2, 0.0))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        out = train_one_epoch(net, [(x, torch.tensor([0, 1]))], opt, sched, None, Precision("bf16" if k < 0 else "fp32", "cpu"),
                              spec, AugmentConfig(), torch.Generator().manual_seed(k), aux_weight=0.3)
        assert np.isfinite(out["train_loss"])
        changed = {n for n, t in net.state_dict().items() if not torch.equal(t, before[n])}
        backbone_changed = {n[len("backbone."):] for n in changed & params if n.startswith("backbone.")}
        assert backbone_changed == top, (k, sorted(backbone_changed ^ top)[:5])
        assert {n for n in params if not n.startswith("backbone.")} <= changed  # head (and aux head) train
        frozen_stats = {n for n in before if n.startswith("backbone.") and n.endswith("running_mean")
                        and n[len("backbone."):].rsplit(".", 1)[0] + ".weight" not in top}
        assert not frozen_stats & changed, k


def run_backbone(backbone, shared, tmp, capsys):
    size, cam_layer, n_groups = BACKBONES[backbone]
    root = tiny_aria(shared, tmp / "aria")
    cfg = config.load(["real"], [f"backbones=[{backbone}]", f"phase2.data.root={root}", "phase2.init=scratch",
                                 "phase2.epochs=1", "phase2.batch_size=4", "phase2.data.val_fraction=0.2",
                                 "phase2.data.test_fraction=0.2", "phase2.warmup_epochs=0", "eval_batch_size=4",
                                 "device=cpu", "precision=auto", f"cache_dir={tmp / 'cache'}", "image_size=0"])
    t0, rss0 = time.perf_counter(), rss_peak_mib()
    with store.scope():
        res = run_phase(cfg, "phase2", backbone, tmp / "work")
    train_s = time.perf_counter() - t0
    (row,) = res.history
    assert res.precision == "fp32" and np.isfinite(row["train_loss"])  # auto = fp32 on the CPU
    net, meta = model_from_checkpoint(res.checkpoint)
    spec = InputSpec.from_dict(meta["input"])
    assert spec.size == size and spec.mask is not None  # timm's size; Aria's corner stamp masked
    assert net.spec.aux == (backbone == "inception_v3")
    x = eval_transform(torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB").resize(
        (spec.cache_size,) * 2)) for f in sorted(root.rglob("*.jpg"))[:2]])), spec)
    # checkpoint -> logged model -> registered version -> pyfunc on a real image at native size
    tracking = connect(f"sqlite:///{tmp}/mlflow.db", f"backbones-{backbone}")
    run = start_run(tracking, "phase2", {schema.BACKBONE: backbone})
    uri = log_model(run, res.checkpoint)
    version = register(tracking, f"bb-{backbone}", uri, run.id, {schema.BACKBONE: backbone})
    run.end()
    image_path = sorted((root / "Original" / "Pro").glob("*.jpg"))[0]
    image = np.asarray(Image.open(image_path).convert("RGB"))
    assert image.shape == (224, 224, 3)  # Aria's native size, resized inside the model
    t1 = time.perf_counter()
    served = mlflow.pyfunc.load_model(f"models:/bb-{backbone}/{version}").predict(image[None])
    predict_s = time.perf_counter() - t1
    direct = ImageClassifier(net, list(net.spec.classes), spec).predict_proba([image])
    assert list(served.columns) == ["class"] + [f"p_{c}" for c in ARIA_CLASSES]
    np.testing.assert_allclose(served[[f"p_{c}" for c in ARIA_CLASSES]].to_numpy(), direct, atol=1e-5)

    # Grad-CAM layer and the fuzzy head's features, at the model's input size
    name, _ = target_layer(net)
    cams = grad_cams(net, x[:1], [0])
    assert name == cam_layer and cams.shape == (1, size, size) and 0 <= cams.min() <= cams.max() <= 1
    u8 = np.stack([np.asarray(Image.open(image_path).convert("RGB").resize((spec.cache_size,) * 2))] * 2)
    feats, probs = embed(net, u8, spec, torch.device("cpu"), batch_size=2)
    assert feats.shape == (2, cfg.phase2.head_channels) and np.allclose(probs.sum(1), 1, atol=1e-5)

    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 4)  # one tensor in eval, as every logged model serves it...
    net.train()
    out = net(x)  # (a training-mode forward moves BatchNorm statistics: after the serving checks)
    assert isinstance(out, tuple) == net.spec.aux  # ...InceptionV3: (logits, aux logits) in training
    # InceptionV3's auxiliary head (average pool 5/3, then a 5x5 conv) needs its full input size
    check_unfreezing_under_autocast(net, n_groups, size if net.spec.aux else 80)
    line = (f"[{backbone}] input {size} px, batch 4: {cfg.phase2.batch_size / row['train_images_per_s']:.2f} s/step "
            f"(train fp32, one epoch), phase run {train_s:.1f} s, pyfunc load+predict {predict_s:.1f} s, "
            f"peak RSS {rss_peak_mib():.0f} MiB (was {rss0:.0f} MiB before this backbone)")
    with capsys.disabled():  # into the test log itself, not only the captured output of a failure
        print(f"\n{line}", flush=True)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_real_backbone_end_to_end_on_real_aria_images(backbone, tmp_path, monkeypatch, capsys):
    shared = require_real_data()
    monkeypatch.chdir(tmp_path)  # the MLflow store's artifacts go under the working directory
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    run_backbone(backbone, shared, tmp_path, capsys)
