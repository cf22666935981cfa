import pytest

from dtl import DTLError, config


def test_demo_recipe_loads_with_overrides():
    cfg = config.load(["demo"], ["phase2.epochs=7", "backbones=[test_resnet,test_efficientnet]"])
    assert cfg.phase2.epochs == 7
    assert cfg.backbones == ("test_resnet", "test_efficientnet")
    assert cfg.phase1.data.kind == "demo-cnmc"
    flat = config.flatten(cfg)
    assert flat["phase2.epochs"] == 7 and flat["backbones"] == "test_resnet,test_efficientnet"
    assert config.from_dict(config.to_dict(cfg)) == cfg


def test_real_backbone_recipes_resolve():
    for name in ("resnet50", "efficientnet_b3", "inception_v3", "real"):
        cfg = config.load([name])
        assert cfg.phase2.data.kind == "aria"
    assert config.load(["inception_v3"]).backbones == ("inception_v3",)


@pytest.mark.parametrize("override, needle", [
    ("phase2.nope=1", "unknown config key"),
    ("precision=fp8", "choose one of: auto, fp32, fp16, bf16"),
    ("phase1.optimizer=sgd", "adamw, adamax"),
    ("phase2.epochs=abc", "must be a number"),
    ("strategies=[triple]", "double, single, scratch"),
    ("noequals", "key.sub=value"),
    ("phase2.data.colour=sepia", r"phase2.data.colour='sepia' is not valid; choose one of: raw, greyscale, reinhard"),
])
def test_bad_overrides_name_the_valid_choices(override, needle):
    with pytest.raises(DTLError, match=needle):
        config.load(["demo"], [override])


def test_unknown_recipe_lists_valid_ones():
    with pytest.raises(DTLError, match="valid recipes: .*demo"):
        config.load(["nonexistent"])


def test_with_phase_derives_a_variant():
    cfg = config.load(["demo"])
    v = config.with_phase(cfg, "phase1", lr_head=0.5)
    assert v.phase1.lr_head == 0.5 and cfg.phase1.lr_head != 0.5 and v.phase2 == cfg.phase2
