
import pytest
import timm
import torch

from dtl import DTLError
from dtl.config import AugmentConfig
from dtl.model.net import DTLNet, ModelSpec
from dtl.model.preprocess import InputSpec
from dtl.train.engine import NonFiniteLoss, Precision, train_one_epoch
from dtl.train.weights import build_model, check_backbone, load_backbone_weights, param_groups, resolve_input_spec


def _spec(backbone="test_resnet", head="linear", classes=("a", "b")):
    return ModelSpec(backbone, tuple(classes), head, 16, 0.1)


# test_resnet's two top stages, parameter by parameter (timm's coarse groups: stem, layer1..layer4)
LAYER4 = {f"layer4.0.{p}" for p in ("conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias",
                                    "downsample.1.weight", "downsample.2.weight", "downsample.2.bias")}
LAYER3 = {f"layer3.0.{p}" for p in ("conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias",
                                    "conv3.weight", "bn3.weight", "bn3.bias",
                                    "downsample.1.weight", "downsample.2.weight", "downsample.2.bias")}


@pytest.mark.parametrize("k", [0, 1, 2, -1])
def test_unfreeze_depth_leaves_exactly_the_top_stages_trainable(k):
    net = DTLNet(_spec())
    assert len(net.stage_groups()) == 5
    net.set_unfreeze(k)
    every = {n for n, _ in net.backbone.named_parameters()}
    trainable = {n for n, p in net.backbone.named_parameters() if p.requires_grad}
    expected = {0: set(), 1: LAYER4, 2: LAYER3 | LAYER4, -1: every}[k]
    assert trainable == expected
    assert len(every) == 45 and (LAYER3 | LAYER4) < every  # the literal names are real parameter names
    assert all(p.requires_grad for p in net.head.parameters())
    net.train()
    frozen_bn = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)
                 and not m.weight.requires_grad]
    assert all(not m.training for m in frozen_bn)  # frozen stages keep their BN statistics
    all_bn = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if k < 0:
        assert not frozen_bn
    elif k == 0:
        assert len(frozen_bn) == len(all_bn)
    else:
        assert 0 < len(frozen_bn) < len(all_bn)
    names = {g["name"] for g in param_groups(net, 1e-3, 1e-4, 0.05)}
    assert names == ({"head"} if k == 0 else {"head", "backbone"})


@pytest.mark.parametrize("backbone", ["test_resnet", "resnet50"])
def test_unfreeze_beyond_the_stage_count_is_refused(backbone):
    """resnet50 has 6 coarse groups; unfreeze=7 used to wrap around (groups[-1:]) and train
    layer4 only."""
    net = DTLNet(_spec(backbone))
    n = len(net.stage_groups())
    net.set_unfreeze(n)  # the top n stages = all of them
    assert all(p.requires_grad for p in net.backbone.parameters())
    with pytest.raises(DTLError, match=f"has {n} stage groups.*0 \\(head only\\) to {n}"):
        net.set_unfreeze(n + 1)
    with pytest.raises(DTLError, match="out of range"):
        net.set_unfreeze(-2)


def test_frozen_bn_statistics_do_not_move():
    net = DTLNet(_spec())
    net.set_unfreeze(1)
    bn = next(m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.requires_grad)
    before = bn.running_mean.clone()
    net.train()
    net(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(before, bn.running_mean)


def test_head_replacement_keeps_backbone_bit_identical():
    p1 = DTLNet(_spec(head="linear", classes=("all", "hem")))
    p2 = build_model(_spec(head="pbs", classes=("Benign", "Early", "Pre", "Pro")), "scratch")
    load_backbone_weights(p2, p1.state_dict(), "phase1")
    for (n, a), (_, b) in zip(p1.backbone.state_dict().items(), p2.backbone.state_dict().items()):
        assert torch.equal(a, b), n
    assert p2(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_weights_of_another_backbone_fail_with_key_names():
    other = DTLNet(_spec(backbone="test_efficientnet"))
    net = DTLNet(_spec())
    with pytest.raises(DTLError, match="do not (fit|match) backbone test_resnet"):
        load_backbone_weights(net, other.state_dict(), "x.pt")


def test_stray_keys_outside_the_head_fail():
    src = DTLNet(_spec())
    sd = dict(src.state_dict())
    sd["neck.weight"] = torch.zeros(1)
    with pytest.raises(DTLError, match="neck.weight"):
        load_backbone_weights(DTLNet(_spec()), sd, "x.pt")


def test_file_init_from_a_timm_state_dict(tmp_path):
    m = timm.create_model("test_resnet", num_classes=7)
    torch.save(m.state_dict(), tmp_path / "w.pth")
    net = build_model(_spec(), f"file:{tmp_path / 'w.pth'}")
    theirs = {k: v for k, v in m.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(v, theirs[k]) for k, v in net.backbone.state_dict().items())
    from safetensors.torch import save_file

    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    build_model(_spec(), f"file:{tmp_path / 'w.safetensors'}")
    with pytest.raises(DTLError, match="does not exist"):
        build_model(_spec(), "file:/nonexistent/w.pth")


def test_imagenet_init_offline_fails_at_once_and_names_file_init(monkeypatch):
    import time

    import dtl.train.weights as models

    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: False)  # this machine is offline anyway
    t = time.time()
    with pytest.raises(DTLError, match="init=file:"):
        build_model(_spec(), "imagenet")
    assert time.time() - t < 10


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(DTLError, match="resnet50, efficientnet_b3, inception_v3.*test_resnet"):
        check_backbone("resnet5000x")


@pytest.mark.parametrize("name, size, mean", [("inception_v3", 299, (0.5, 0.5, 0.5)),
                                               ("efficientnet_b3", 288, (0.485, 0.456, 0.406)),
                                               ("resnet50", 224, (0.485, 0.456, 0.406))])
def test_input_spec_comes_from_timm(name, size, mean):
    s = resolve_input_spec(name)
    assert s.size == size and s.mean == pytest.approx(mean) and s.cache_size > s.size


def test_nan_loss_stops_training():
    net = DTLNet(_spec())
    with torch.no_grad():
        net.head.fc.weight.fill_(float("nan"))
    x = torch.randint(0, 255, (4, 36, 36, 3), dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    spec = InputSpec(32, 36, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(NonFiniteLoss, match="loss is nan"):
        train_one_epoch(net, [(x, y)], opt, sched, None, Precision("fp32", "cpu"), spec, AugmentConfig(),
                        torch.Generator().manual_seed(0))


@pytest.mark.slow  # over 5 s on 2 cores: out of the fast tier (docs/testing.md)
def test_inception_aux_logits_train_only_and_one_tensor_in_eval():
    spec = ModelSpec("inception_v3", ("a", "b", "c", "d"), "pbs", 16, 0.1, aux=True)
    net = DTLNet(spec)
    x = torch.randn(2, 3, 299, 299)
    net.train()
    out = net(x)
    assert isinstance(out, tuple) and out[0].shape == out[1].shape == (2, 4)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 4)
    with pytest.raises(DTLError, match="inception_v3"):
        DTLNet(ModelSpec("test_resnet", ("a", "b"), aux=True))


@pytest.mark.slow  # over 5 s on 2 cores: out of the fast tier (docs/testing.md)
def test_inception_v3_file_weights_with_auxiliary_logits(tmp_path):
    """timm's own inception_v3 state dict has 14 AuxLogits.* keys: with an auxiliary head their
    conv blocks are loaded onto it (fc stays new: other classes); without one they are dropped."""
    from safetensors.torch import save_file

    src = timm.create_model("inception_v3", pretrained=False, aux_logits=True)
    f = tmp_path / "inception_v3.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(f))
    spec = ModelSpec("inception_v3", ("a", "b", "c", "d"), "pbs", 16, 0.1, aux=True)
    net = build_model(spec, f"file:{f}")
    aux_src = src.AuxLogits.state_dict()
    for k, v in net.aux_head.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, aux_src[k]), k
    assert net.aux_head.fc.out_features == 4
    assert torch.equal(net.backbone.Mixed_7c.branch1x1.conv.weight, src.Mixed_7c.branch1x1.conv.weight)
    with pytest.warns(UserWarning, match="14 auxiliary-classifier weights dropped"):
        plain = build_model(ModelSpec("inception_v3", ("a", "b"), "linear", 16, 0.1), f"file:{f}")
    assert plain.aux_head is None
