"""run_phase on CPU: resume equals an uninterrupted run, AMP bookkeeping, evaluation."""


import numpy as np
import pytest
import torch

from dtl import config
from dtl.train.engine import Precision, resolve_precision
from dtl.train.phases import evaluate_checkpoint, run_phase
from dtl.train.weights import load_checkpoint
from tests.conftest import demo_overrides


def _cfg(cache_dir, tmp, **extra):
    return config.load(["demo"], demo_overrides(cache_dir, tmp, **{"phase1.epochs": 3, **extra}))


@pytest.mark.slow
def test_resume_from_last_equals_uninterrupted(workspace, cache_dir):
    cfg = _cfg(cache_dir, workspace)
    full = run_phase(cfg, "phase1", "test_resnet", workspace / "full", resume=False)
    # the same run stopped after epoch 1 (a 2-epoch schedule would differ: stop by hand instead)
    stop = {"at": 1}

    class Stop(Exception):
        pass

    def report(epoch, row):
        if epoch == stop["at"]:
            raise Stop

    with pytest.raises(Stop):
        run_phase(cfg, "phase1", "test_resnet", workspace / "part", resume=False, report=report)
    assert load_checkpoint(workspace / "part" / "last.pt")["epoch"] == 1
    resumed = run_phase(cfg, "phase1", "test_resnet", workspace / "part", resume=True)
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2]
    for a, b in zip(full.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4, abs=1e-6)
    wa = load_checkpoint(workspace / "full" / "last.pt")["model"]
    wb = load_checkpoint(workspace / "part" / "last.pt")["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)


@pytest.mark.parametrize("monitor, values, best", [("val_loss", [0.9, 0.5, 0.7, 0.6], 1),
                                                   ("val_macro_f1", [0.2, 0.6, 0.4, 0.6], 1)])
def test_best_checkpoint_follows_the_monitor_direction(tmp_path, cache_dir, monkeypatch, monitor, values, best):
    """The fast part of test_loss_monitor_minimises_everywhere (tests/test_tune.py): run_phase's own
    selection loop over scripted epochs (training and last.pt replaced): best.pt is the epoch with
    the LOWEST loss or the HIGHEST score, the first of equals, and best_value is that value."""
    from types import SimpleNamespace

    from dtl.model.net import DTLNet, ModelSpec
    from dtl.train import phases

    def epoch(t, cfg, pc, e, state):
        row = {"epoch": e, monitor: values[e]}
        state.history.append(row)
        return row

    net = DTLNet(ModelSpec("test_resnet", ("all", "hem")))
    monkeypatch.setattr(phases, "_setup", lambda *a: SimpleNamespace(net=net, meta={"init": "scratch"}, device="cpu",
                                                                     precision=SimpleNamespace(name="fp32")))
    monkeypatch.setattr(phases, "_epoch", epoch)
    monkeypatch.setattr(phases, "_save_last", lambda *a: None)
    cfg = _cfg(cache_dir, tmp_path, **{"phase1.monitor": monitor, "phase1.epochs": 4})
    res = run_phase(cfg, "phase1", "test_resnet", tmp_path / "r", resume=False)
    assert (res.best_value, res.best_epoch) == (values[best], best)
    meta = load_checkpoint(res.checkpoint)["meta"]
    assert meta["epoch"] == best and meta["metrics"][monitor] == values[best]


@pytest.mark.slow
def test_checkpoint_describes_itself(workspace, cache_dir):
    cfg = _cfg(cache_dir, workspace, **{"phase1.epochs": 1})
    res = run_phase(cfg, "phase1", "test_resnet", workspace / "r", resume=False)
    meta = load_checkpoint(res.checkpoint)["meta"]
    assert meta["spec"]["backbone"] == "test_resnet" and meta["spec"]["classes"] == ["all", "hem"]
    assert meta["input"]["size"] == 64 and meta["input"]["mean"] == [0.5, 0.5, 0.5]
    assert meta["config"]["phase1"]["epochs"] == 1 and meta["data_digest"]
    last = load_checkpoint(workspace / "r" / "last.pt")
    assert {"optimizer", "scheduler", "scaler", "epoch", "history"} <= set(last)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")  # a skipped step
def test_amp_on_cpu_trains_and_counts_skipped_steps(workspace, cache_dir, precision, monkeypatch):
    """fp16: run_phase's GradScaler starts at 2**60, so float16 gradients overflow and steps are
    skipped for real; each skip halves the scale, so the count must match the scale it ends at.
    bf16 has no scaler and skips nothing."""
    import functools

    init = 2.0 ** 60
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=init))
    cfg = _cfg(cache_dir, workspace, precision=precision, **{"phase1.epochs": 1})
    res = run_phase(cfg, "phase1", "test_resnet", workspace / precision, resume=False)
    assert res.precision == precision and np.isfinite(res.history[0]["train_loss"])
    skipped = res.history[0]["skipped_steps"]
    last = load_checkpoint(workspace / precision / "last.pt")
    if precision == "bf16":
        assert skipped == 0 and not last["scaler"]
    else:
        assert skipped >= 1 and last["scaler"]["scale"] == init / 2 ** skipped


@pytest.mark.slow  # over 5 s on 2 cores: out of the fast tier (docs/testing.md)
@pytest.mark.parametrize("init_scale, skipped", [(2.0 ** 60, 3), (1.0, 0)])
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")  # a skipped step
def test_fp16_overflow_skips_the_step_and_counts_it(init_scale, skipped):
    """Three fp16 steps on CPU: at a loss scale of 2**60 the float16 gradients overflow to inf,
    the scaler skips every step (the weights stay put) and each skip is counted; at scale 1
    nothing overflows, nothing is skipped, the weights move."""
    from dtl.config import AugmentConfig
    from dtl.model.net import DTLNet, ModelSpec
    from dtl.model.preprocess import InputSpec
    from dtl.train.engine import train_one_epoch

    with torch.random.fork_rng():  # seeded weights, and the global generator left as it was
        torch.manual_seed(0)
        net = DTLNet(ModelSpec("test_resnet", ("a", "b"), "linear", 16, 0.1))
    x = torch.randint(0, 255, (4, 36, 36, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1])
    fp16, spec = Precision("fp16", "cpu"), InputSpec(32, 36, (0.5,) * 3, (0.5,) * 3)
    with fp16.autocast(), torch.no_grad():
        assert net.eval()(torch.zeros(1, 3, 32, 32)).dtype == torch.float16  # the overflow is in half precision
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    out = train_one_epoch(net, [(x, y)] * 3, opt, sched, scaler, fp16, spec, AugmentConfig(),
                          torch.Generator().manual_seed(0))
    assert out["skipped_steps"] == skipped and np.isfinite(out["train_loss"])
    assert scaler.get_scale() == init_scale / 2 ** skipped
    moved = [n for n, p in net.named_parameters() if not torch.equal(before[n], p)]
    if skipped:
        assert moved == []  # every step skipped: no update reached the weights
    else:
        assert len(moved) == len(before)


@pytest.mark.parametrize("name, device, expected", [("auto", "cpu", "fp32"), ("bf16", "cpu", "bf16"),
                                                    ("fp32", "cpu", "fp32")])
def test_precision_resolution(name, device, expected):
    assert resolve_precision(name, torch.device(device)).name == expected
    assert Precision("fp32", "cpu").enabled is False


@pytest.mark.slow
def test_final_evaluation_with_tta(workspace, cache_dir):
    cfg = _cfg(cache_dir, workspace, **{"phase1.epochs": 1, "phase1.tta": True})
    res = run_phase(cfg, "phase1", "test_resnet", workspace / "e", resume=False)
    ev = evaluate_checkpoint(cfg, "phase1", res.checkpoint)
    m = ev.metrics
    for split in ("val", "test"):
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc", "ece"):
            assert f"{split}_{k}" in m and f"{split}_{k}_ci_low" in m
        assert ev.confusion[split]["classes"] == ["all", "hem"]
    assert list(ev.predictions["test"].columns) == ["path", "label", "bootstrap_unit", "predicted", "p_all", "p_hem"]
    # C-NMC has patient IDs: the intervals resample patients, not cells
    assert ev.ci_unit == {"val": "patient", "test": "patient"}
    # with TTA, the value Optuna saw (validation during training) is the value promotion reads
    assert res.best_value == pytest.approx(m["val_macro_f1"], abs=1e-9)


@pytest.mark.slow
def test_checkpoint_of_another_backbone_or_class_count_is_refused(workspace, cache_dir):
    from dtl import DTLError

    cfg = _cfg(cache_dir, workspace, **{"phase1.epochs": 1})
    res = run_phase(cfg, "phase1", "test_resnet", workspace / "x", resume=False)
    with pytest.raises(DTLError, match=r"trained on classes \['all', 'hem'\].*Benign"):
        evaluate_checkpoint(cfg, "phase2", res.checkpoint)  # 2-class checkpoint on the 4-class data
    with pytest.raises(DTLError, match="checkpoint of another model"):
        run_phase(cfg, "phase1", "test_efficientnet", workspace / "x", resume=True)  # its last.pt is a resnet


@pytest.mark.slow
def test_early_stopping_on_the_monitored_metric(workspace, cache_dir):
    # lr 0 and a frozen backbone (BN statistics too): the validation metric is the same every
    # epoch, never an improvement, so patience 1 stops after epoch 1
    cfg = _cfg(cache_dir, workspace, **{"phase1.epochs": 5, "phase1.lr_head": 0.0, "phase1.lr_backbone": 0.0,
                                        "phase1.unfreeze": 0, "phase1.early_stop_patience": 1})
    res = run_phase(cfg, "phase1", "test_resnet", workspace / "es", resume=False)
    assert [r["epoch"] for r in res.history] == [0, 1] and res.best_epoch == 0


@pytest.mark.parametrize("label", [0, 1])
def test_class_weights_do_not_skew_the_smoothed_target(label):
    """Weights [0.75, 1.5] with smoothing 0.1: the loss of one sample is minimised at
    p(y|y) = 1 - 0.1 + 0.1/2 = 0.95 for either class (PyTorch's weighted smoothing gives 0.905)."""
    from dtl.train.engine import weighted_smoothed_ce

    w = torch.tensor([0.75, 1.5])
    logits = torch.zeros(1, 2, requires_grad=True)
    y = torch.tensor([label])
    opt = torch.optim.SGD([logits], lr=1.0)
    for _ in range(2000):
        opt.zero_grad()
        weighted_smoothed_ce(logits, y, w, 0.1).backward()
        opt.step()
    assert torch.softmax(logits, 1)[0, label].item() == pytest.approx(0.95, abs=1e-3)


def test_weighted_loss_is_a_weighted_mean_of_samples():
    from dtl.train.engine import weighted_smoothed_ce

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    w = torch.tensor([0.75, 1.5])
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    expected = (w[y] * per).sum() / w[y].sum()
    assert weighted_smoothed_ce(logits, y, w, 0.0).item() == pytest.approx(expected.item(), rel=1e-6)
    assert weighted_smoothed_ce(logits, y, None, 0.1).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-6)


@pytest.mark.slow
def test_last_pt_of_other_starting_weights_is_not_resumed(workspace, cache_dir):
    """Same config, other starting checkpoint: the interrupted run's last.pt must not be resumed."""
    cfg = _cfg(cache_dir, workspace, **{"phase1.epochs": 1, "phase2.epochs": 2})
    a = run_phase(cfg, "phase1", "test_resnet", workspace / "a", resume=False).checkpoint
    b = run_phase(config.load(["demo"], demo_overrides(cache_dir, workspace, **{"phase1.epochs": 1, "seed": 1})),
                  "phase1", "test_resnet", workspace / "b", resume=False).checkpoint

    class Stop(Exception):
        pass

    def stop_after_first(epoch, row):
        raise Stop

    with pytest.raises(Stop):
        run_phase(cfg, "phase2", "test_resnet", workspace / "p2", init_from=a, report=stop_after_first)
    seen_resumed = []
    resumed = run_phase(cfg, "phase2", "test_resnet", workspace / "p2", init_from=a,
                        report=lambda e, r: seen_resumed.append(e))
    assert seen_resumed == [1] and [r["epoch"] for r in resumed.history] == [0, 1]  # epoch 0 from last.pt
    with pytest.raises(Stop):
        run_phase(cfg, "phase2", "test_resnet", workspace / "p3", init_from=a, report=stop_after_first)
    seen = []
    fresh = run_phase(cfg, "phase2", "test_resnet", workspace / "p3", init_from=b,
                      report=lambda e, r: seen.append(e))
    assert seen == [0, 1] and [r["epoch"] for r in fresh.history] == [0, 1]  # trained from epoch 0
    meta = load_checkpoint(fresh.checkpoint)["meta"]
    assert meta["init_digest"].startswith("sha256:") and meta["init_digest"] != load_checkpoint(
        workspace / "p2" / "best.pt")["meta"]["init_digest"]
