import dataclasses

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


# --- what a user reads when a key or value is wrong, and the edges of each rule -------------------------------

TOP_LEVEL_KEYS = ("augment, backbones, bootstrap, cache_dir, cards_dir, channels_last, compile, description, "
                  "deterministic, device, eval_batch_size, experiment, explain, final, fuzzy, image_size, name, "
                  "phase1, phase2, policy, precision, register_strategy, registered_model, report_dir, seed, "
                  "strategies, tracking_uri, tune, work_dir")


def _error(overrides, recipes=("demo",), **kw) -> str:
    with pytest.raises(DTLError) as e:
        config.load(list(recipes), list(overrides), **kw)
    return str(e.value)


def test_unknown_keys_are_all_named_with_the_valid_keys_of_their_level():
    assert _error(["zap=1", "nope=2"]) == f"unknown config key(s) nope, zap; valid keys under top level: {TOP_LEVEL_KEYS}"
    assert _error(["final.x=1", "final.a=2"]) == ("unknown config key(s) final.a, final.x; "
                                                  "valid keys under final: cv, cv_repeats, repeats")  # "final.:" before
    assert _error(["phase2.data.nope=1"]).startswith("unknown config key(s) phase2.data.nope; valid keys under phase2.data: ")
    # a checkpoint written by a newer version names the key it holds that this one does not know
    with pytest.raises(DTLError) as e:
        config.from_dict({**config.to_dict(config.Config()), "newkey": 1})
    assert str(e.value) == f"unknown config key(s) newkey; valid keys under top level: {TOP_LEVEL_KEYS}"


def test_a_block_given_a_scalar_is_refused_by_its_key():
    assert _error(["phase2.data=3"]) == "config key phase2.data must be a mapping"


@pytest.mark.parametrize("override, message", [
    ("precision=fp8", "precision='fp8' is not valid; choose one of: auto, fp32, fp16, bf16"),
    ("tune.pruner=sometimes", "tune.pruner='sometimes' is not valid; choose one of: median, hyperband, threshold, none"),
    ("strategies=[double,triple]", "strategies='triple' is not valid; choose one of: double, single, scratch"),
    ("register_strategy=best", "register_strategy='best' is not valid; choose one of: double, single, scratch, none"),
    ("backbones=[]", "backbones is empty; name at least one timm model"),
    ("phase1.optimizer=sgd", "phase1.optimizer='sgd' is not valid; choose one of: adamw, adamax"),
    ("phase2.head=mlp", "phase2.head='mlp' is not valid; choose one of: linear, pbs"),
    ("phase2.init=imagenett", "phase2.init='imagenett' is not valid; choose imagenet, scratch or file:PATH"),
    ("phase1.monitor=macro_f1", "phase1.monitor='macro_f1' must be a validation metric (val_macro_f1, val_loss, ...)"),
    ("explain.store_temperature=maybe",
     "explain.store_temperature='maybe' is not valid; choose one of: auto, on, off"),
    ("final.cv=2", "final.cv=2 is not valid; 0 (off) or K >= 3 folds (one is test, one val, the others train)"),
    ("phase1.data.kind=cnmcc", "phase1.data.kind='cnmcc' is not valid; choose one of: cnmc, aria, imagefolder, "
                               "presplit, demo-cnmc, demo-aria"),
    ("phase2.data.variant=raw", "phase2.data.variant='raw' is not valid; choose one of: original, segmented"),
    ("phase2.data.block_size=0",
     "phase2.data.block_size must be >= 1 (file numbers per acquisition block), got 0"),
    ("phase2.data.train_dir=/d/train",
     "phase2.data.train_dir is set but phase2.data.kind is 'demo-aria': split folders are read only for pre-split "
     "data; add -o phase2.data.kind=presplit (or give phase2.data.root a folder holding train/ and val/)"),
    ("backbones=3", "config key backbones must be a list, got 3"),
    ("phase2.tta=maybe", "config key phase2.tta must be true/false, got 'maybe'"),
    ("phase2.epochs=abc", "config key phase2.epochs must be a number, got 'abc'"),
])
def test_each_bad_value_error_names_the_key_the_value_and_what_is_valid(override, message):
    assert _error([override]) == message


@pytest.mark.parametrize("overrides", [
    ["phase1.data.cv_folds=1"], ["phase1.data.cv_folds=2"], ["phase1.data.cv_folds=-3"],
    ["phase1.data.cv_fold=1"],  # no CV: the only fold is 0
    ["phase1.data.cv_folds=3", "phase1.data.cv_fold=3"], ["phase1.data.cv_folds=3", "phase1.data.cv_fold=-1"],
    ["phase1.data.cv_folds=3", "phase1.data.cv_repeat=-1"],
])
def test_cross_validation_folds_need_three_and_a_fold_inside_them(overrides):
    d = {k.split(".")[-1]: int(v) for k, v in (o.split("=") for o in overrides)}
    got = {"cv_folds": 0, "cv_fold": 0, "cv_repeat": 0, **d}
    assert _error(overrides) == (
        "phase1.data.cv_folds must be 0 (off) or >= 3 (one fold test, one val, the rest train) and 0 <= cv_fold "
        f"< cv_folds, cv_repeat >= 0; got cv_folds={got['cv_folds']}, cv_fold={got['cv_fold']}, "
        f"cv_repeat={got['cv_repeat']}")


def test_cross_validation_and_block_edges_that_are_valid():
    cfg = config.load(["demo"], ["phase1.data.cv_folds=3", "phase1.data.cv_fold=2", "phase1.data.cv_repeat=1",
                                 "phase2.data.block_size=1", "final.cv=3", "phase2.data.variant=segmented"])
    assert (cfg.phase1.data.cv_folds, cfg.phase1.data.cv_fold, cfg.phase2.data.block_size) == (3, 2, 1)
    assert cfg.phase2.data.variant == "segmented" and cfg.final.cv == 3


def test_validation_and_test_shares_must_leave_training_images():
    msg = "phase1.data.val_fraction + test_fraction must be < 1 (training needs images)"
    assert _error(["phase1.data.val_fraction=0.5", "phase1.data.test_fraction=0.5"]) == msg  # exactly 1: none left
    assert _error(["phase1.data.val_fraction=0.6", "phase1.data.test_fraction=0.5"]) == msg
    cfg = config.load(["demo"], ["phase1.data.val_fraction=0.6", "phase1.data.test_fraction=0.3"])
    assert cfg.phase1.data.val_fraction + cfg.phase1.data.test_fraction == pytest.approx(0.9)


@pytest.mark.parametrize("key, ok, bad, interval", [
    ("augment.scale_min", [1, 1e-6], [0, 1.01], "(0, 1]"),  # open below, closed above
    ("phase2.head_dropout", [0, 0.99], [1, -0.01], "[0, 1)"),  # closed below, open above
    ("phase1.label_smoothing", [0, 0.5], [1], "[0, 1)"),
    ("augment.rotation", [0, 180], [180.5, -1], "[0, 180]"),
    ("augment.hue", [0.5], [0.51], "[0, 0.5]"),
    ("tune.startup_trials", [-1, 0], [-2], "[-1, inf)"),
    ("explain.annotation_threshold", [0.01, 1e9], [0], "(0, inf)"),
    ("eval_batch_size", [1], [0], "[1, inf)"),
])
def test_numeric_ranges_include_and_exclude_their_edges(key, ok, bad, interval):
    for v in ok:
        assert config.flatten(config.load(["demo"], [f"{key}={v}"]))[key] == v
    for v in bad:
        value = type(config.flatten(config.Config())[key])(v)  # the message shows the coerced value: 0 -> 0.0
        assert _error([f"{key}={v}"]) == f"{key}={value!r} is out of range; valid: {interval}"


def test_boolean_switch_words_in_either_case():
    """`dtl data` and other callers hand string flags to build_block: every usual switch word is read."""
    for word in ("1", "true", "True", "YES", "yes", "on", "On"):
        assert config.build_block(config.PhaseConfig(), {"tta": word}, "phase2.").tta is True
    for word in ("0", "false", "FALSE", "no", "No", "off", "OFF"):
        assert config.build_block(config.PhaseConfig(tta=True), {"tta": word}, "phase2.").tta is False


def test_empty_or_none_keeps_a_numbers_value_and_none_clears_the_val_fold():
    for word in ("", "none", "None", "null", "NULL", None):
        assert config.build_block(config.PhaseConfig(epochs=7), {"epochs": word}, "phase2.").epochs == 7
        assert config.build_block(config.DataConfig(), {"val_fold": word}, "phase1.data.").val_fold is None
    for word in ("none", "None", "null", "NULL", None):  # val_fold is int | None: none clears it
        assert config.build_block(config.DataConfig(val_fold=2), {"val_fold": word}, "phase1.data.").val_fold is None
    assert config.build_block(config.DataConfig(val_fold=2), {"val_fold": ""}, "phase1.data.").val_fold == 2
    assert config.build_block(config.DataConfig(), {"val_fold": "3"}, "phase1.data.").val_fold == 3
    assert config.load(["demo"], ["phase1.data.val_fold=none"]).phase1.data.val_fold is None


def test_the_only_nullable_field_is_an_int():
    """_build sends a field whose annotation names None down _coerce's int branch: a str | None or
    float | None field would need its own branch there first."""
    nullable = {f"{type(b).__name__}.{f.name}": str(f.type) for b in _config_blocks(config.Config())
                for f in dataclasses.fields(b) if "None" in str(f.type)}
    assert nullable == {"DataConfig.val_fold": "int | None"}


def _config_blocks(block) -> list:
    """``block`` and every config dataclass nested in it."""
    subs = [getattr(block, f.name) for f in dataclasses.fields(block)]
    return [block] + [b for s in subs if dataclasses.is_dataclass(s) for b in _config_blocks(s)]


def test_none_on_the_command_line_clears_a_recipes_val_fold(tmp_path):
    """A recipe's ``val_fold: 2`` survived ``-o phase1.data.val_fold=none`` once the overrides were
    applied to the recipes' config: none kept the current value, as it does for the other numbers."""
    recipe = tmp_path / "fold2.yaml"
    recipe.write_text("include: [demo]\nphase1:\n  data:\n    val_fold: 2\n")
    assert config.load([str(recipe)]).phase1.data.val_fold == 2
    for word in ("none", "null", "~"):
        assert config.load([str(recipe)], [f"phase1.data.val_fold={word}"]).phase1.data.val_fold is None, word
    assert config.load([str(recipe)], ["phase1.data.val_fold="]).phase1.data.val_fold == 2
    assert config.load([str(recipe)], ["phase1.data.val_fold=1"]).phase1.data.val_fold == 1


def test_an_empty_number_on_the_command_line_keeps_the_recipes_value():
    """``-o phase2.epochs=`` kept the dataclass default (10), not demo.yaml's 6: the overrides were merged
    into the recipes before anything was built, so the recipe's value was gone when the empty one came."""
    recipe = config.load(["demo"])
    assert recipe.phase2.epochs == 6 and recipe.phase1.epochs == 4  # demo.yaml, not the default 10
    for word in ("", "none", "null"):
        cfg = config.load(["demo"], [f"phase2.epochs={word}", f"phase1.epochs={word}"])
        assert (cfg.phase2.epochs, cfg.phase1.epochs) == (6, 4), word
    assert config.load(["demo"], ["phase2.epochs=3"]).phase2.epochs == 3
    assert config.load(["demo"], ["phase2.epochs=3", "phase2.epochs="]).phase2.epochs == 6  # the last one wins
    assert config.load(["demo"], ["phase2.search="]).phase2.search == ()  # an empty list still clears


def test_list_keys_take_comma_strings_and_an_empty_value_clears_them():
    cfg = config.load(["demo"], ["backbones=test_resnet, test_convnext,,", "phase2.search=", "phase1.search=lr_head"])
    assert cfg.backbones == ("test_resnet", "test_convnext")
    assert cfg.phase2.search == () and cfg.phase1.search == ("lr_head",)
    assert config.parse_override("phase2.search=") == {"phase2": {"search": ""}}
    assert config.parse_override("phase2.search=  ") == {"phase2": {"search": ""}}


def test_yaml_switch_words_and_nulls_stay_words_in_string_keys():
    """YAML 1.1 reads on/off as booleans and ~/null as None; string keys keep what the user meant."""
    assert config.load(["demo"], ["explain.store_temperature=on"]).explain.store_temperature == "on"
    assert config.load(["demo"], ["explain.store_temperature=off"]).explain.store_temperature == "off"
    assert config.load(["demo"], ["tracking_uri=~", "tune.storage=null"]).tracking_uri == ""
    assert config.load(["demo"], ["tune.storage=null"]).tune.storage == ""


def test_an_override_value_may_itself_hold_equals_signs():
    url = "postgresql://db.lab/optuna?sslmode=require&x=1"
    assert config.parse_override(f"tune.storage={url}") == {"tune": {"storage": url}}
    assert config.load(["demo"], [f"tune.storage={url}"]).tune.storage == url


def test_init_weights_files_are_checked_unless_asked_not_to(tmp_path):
    missing = "phase1.init='file:/nowhere/w.safetensors': no such weights file '/nowhere/w.safetensors'"
    assert _error(["phase1.init=file:/nowhere/w.safetensors"]) == missing
    cfg = config.load(["demo"], ["phase1.init=file:/nowhere/w.safetensors"], check_files=False)
    with pytest.raises(DTLError) as e:
        config.validate(cfg)  # the default checks the file too
    assert str(e.value) == missing
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"x")
    assert config.load(["demo"], [f"phase2.init=file:{w}"]).phase2.init == f"file:{w}"


def test_unknown_phase_names_the_valid_ones():
    with pytest.raises(DTLError) as e:
        config.Config().phase("phase3")
    assert str(e.value) == "unknown phase 'phase3'; valid: phase1, phase2"


def test_unknown_recipe_message_lists_the_recipes_but_not_the_search_spaces():
    stems = sorted(p.stem for p in config.EXPERIMENTS_DIR.glob("*.yaml"))
    recipes = [s for s in stems if not s.startswith("search_space")]
    assert "search_space" in stems and {"demo", "real"} <= set(recipes)
    with pytest.raises(DTLError) as e:
        config.load(["nonexistent"])
    assert str(e.value) == ("config 'nonexistent' not found (neither a YAML file nor experiments/nonexistent.yaml); "
                            f"valid recipes: {', '.join(recipes)}")


def test_a_file_in_the_working_directory_does_not_shadow_a_recipe_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("name: not-a-recipe\n")
    assert config.resolve_recipe("demo") == config.EXPERIMENTS_DIR / "demo.yaml"


def test_recipe_files_with_includes(tmp_path):
    base = tmp_path / "base.yml"
    base.write_text("name: base\nphase2: {epochs: 4, batch_size: 8}\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"include: [demo, {base}]\nphase2: {{epochs: 2}}\n")
    assert config.resolve_recipe(str(base)) == base and config.resolve_recipe(str(child)) == child
    cfg = config.load([str(child)])
    # the includes in order (demo, then base), then the file's own keys
    assert (cfg.name, cfg.phase2.batch_size, cfg.phase2.epochs, cfg.image_size) == ("base", 8, 2, 64)
    assert config.load(["resnet50"]).phase2.data.root == config.load(["real"]).phase2.data.root != ""


def test_broken_recipes_name_the_file(tmp_path):
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"include: [{loop}]\n")
    assert _error([], [str(loop)]) == f"recipe include cycle through {loop}"
    bad = tmp_path / "bad.yaml"
    bad.write_text("phase2: {epochs: 3\n")
    assert _error([], [str(bad)]).startswith(f"cannot parse {bad}: while parsing a flow mapping")
    seq = tmp_path / "seq.yaml"
    seq.write_text("- a\n- b\n")
    assert _error([], [str(seq)]) == f"{seq} must hold a mapping of config keys"


def test_a_recipes_bad_keys_and_values_are_named_by_their_full_key(tmp_path):
    """The recipes' keys are named from the top level, as the overrides' are (the level name the
    recipes are built under was never checked: only override errors were)."""
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("include: [demo]\nphase2:\n  epochz: 3\n")
    assert _error([], [str(recipe)]).startswith("unknown config key(s) phase2.epochz; valid keys under phase2: ")
    recipe.write_text("include: [demo]\nphase1:\n  data:\n    val_fold: two\n")
    assert _error([], [str(recipe)]) == "config key phase1.data.val_fold must be a number, got 'two'"
    recipe.write_text("include: [demo]\nfinal: 3\n")
    assert _error([], [str(recipe)]) == "config key final must be a mapping"


def test_broken_search_spaces_name_the_file(tmp_path):
    missing = tmp_path / "none.yaml"
    with pytest.raises(DTLError) as e:
        config.read_search_space(config.load(["demo"], [f"tune.search_space={missing}"]))
    assert str(e.value) == f"cannot read search space {missing}: [Errno 2] No such file or directory: '{missing}'"
    seq = tmp_path / "seq.yaml"
    seq.write_text("- a\n")
    with pytest.raises(DTLError) as e:
        config.read_search_space(config.load(["demo"], [f"tune.search_space={seq}"]))
    assert str(e.value) == f"search space {seq} must hold a mapping with phase1/phase2/fuzzy blocks"


def test_a_given_phase_key_is_pinned_only_where_the_study_would_tune_it():
    """The demo space tunes phase 2's lr_head, lr_backbone, unfreeze, head_dropout; `search` narrows that."""
    assert config.load(["demo"], ["phase2.unfreeze=3", "phase2.epochs=2"]).phase2.pinned == ("unfreeze",)
    assert config.load(["demo"], ["phase2.search=[lr_head]", "phase2.unfreeze=3"]).phase2.pinned == ()
    assert config.load(["demo"], ["phase2.search=[lr_head,unfreeze]", "phase1.unfreeze=3"]).phase1.pinned == (
        "unfreeze",)
