"""ImageNet and file weights as a user's first real run loads them, proven offline.

``init=imagenet`` reads timm's hub cache: a cache built here in the layout huggingface_hub reads
(``models--timm--<name>/snapshots/<rev>/`` + ``refs/main``), with ``HF_HUB_OFFLINE=1``, must give
those exact weights and the pretrained tag's preprocessing, recorded in the run; with no cache, a
clear error. ``init=file:`` uses the preprocessing of the tag the user names as the backbone
(``resnet50.tv_in1k``), for a timm-format and a torchvision-format state dict.
"""

import os
import subprocess

import huggingface_hub.constants as hf
import mlflow
import pytest
import timm
import torch

from dtl import DTLError, config, pipeline
from dtl.model.net import ModelSpec
from dtl.tracking import schema
from dtl.train.weights import build_model, load_checkpoint, preprocessing_note, resolve_input_spec
from tests.conftest import PYTHON, demo_overrides

slow = pytest.mark.slow  # builds ResNet-50s or launches a `dtl phase1` subprocess

HUB_MODEL = "test_resnet.r160_in1k"  # a tiny timm model whose default tag has hub weights
REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(home, model: str = HUB_MODEL, seed: int = 123) -> dict[str, torch.Tensor]:
    """Write ``model``'s weights (random, seeded: no download) under ``home/hub`` as the hub would
    cache them; returns the state dict written."""
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    m = timm.create_model(model, pretrained=False)
    repo = home / "hub" / f"models--{m.pretrained_cfg['hf_hub_id'].replace('/', '--')}"
    save_for_hf(m, repo / "snapshots" / REVISION, safe_serialization=True)  # model.safetensors + config.json
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return m.state_dict()


def dtl_phase1(workspace, cache_dir, env: dict, backbone: str, init: str, **extra):
    """`dtl phase1` on the demo C-NMC layout: one trial of one epoch, only ``lr_head`` tuned and
    ``unfreeze=0`` so the backbone's weights (and its BatchNorm statistics) stay those it was given."""
    o = demo_overrides(cache_dir, workspace, **{"backbones": f"[{backbone}]", "phase1.n_trials": 1,
                                                "phase1.epochs": 1, "phase1.init": init, "phase1.unfreeze": 0,
                                                "phase1.search": "[lr_head]", **extra})
    return subprocess.run([PYTHON, "-m", "dtl", "phase1", *[x for kv in o for x in ("-o", kv)]],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=900)


def study_run(workspace):
    mlflow.set_tracking_uri(f"sqlite:///{workspace}/mlflow.db")
    exp = mlflow.get_experiment_by_name("all-dtl-demo")
    runs = mlflow.search_runs([exp.experiment_id], schema.where({schema.ROLE: schema.Role.STUDY}), output_format="list")
    assert len(runs) == 1
    return runs[0]


def best_checkpoint(workspace) -> dict:
    found = list((workspace / "runs").rglob("best.pt"))
    assert len(found) == 1, found
    return load_checkpoint(found[0])


@slow
def test_imagenet_init_loads_an_offline_hub_cache_with_its_pretrained_config(workspace, cache_dir, tmp_path,
                                                                          monkeypatch):
    home = tmp_path / "hf-home"
    written = hub_cache(home)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)  # HF_HOME alone says where the cache is (HF_HOME/hub)
    p = dtl_phase1(workspace, cache_dir, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}, "test_resnet", "imagenet",
                   image_size=0)
    assert p.returncode == 0, p.stderr[-3000:]
    ck = best_checkpoint(workspace)
    backbone = {k[len("backbone."):]: v for k, v in ck["model"].items() if k.startswith("backbone.")}
    assert backbone.keys() == {k for k in written if not k.startswith("fc.")}
    assert all(torch.equal(v, written[k]) for k, v in backbone.items())  # the cached weights, untouched
    spec = ck["meta"]["input"]  # timm's pretrained config of test_resnet.r160_in1k: 160 px, crop 0.95
    assert (spec["size"], spec["cache_size"], spec["interpolation"]) == (160, 168, "bilinear")
    assert spec["mean"] == spec["std"] == [0.5, 0.5, 0.5] and spec["pretrained"] == HUB_MODEL
    tags = study_run(workspace).data.tags
    assert tags[schema.INIT] == "imagenet" and tags[schema.PRETRAINED_TAG] == HUB_MODEL
    assert tags[schema.INPUT_PREPROCESSING].startswith("160 px centre crop of 168 (crop 0.952), bilinear, mean (0.500")


def test_imagenet_init_offline_without_a_cache_says_where_it_looked(tmp_path, monkeypatch):
    """In-process (the CLI prints a DTLError as its one line): the pipeline's pre-flight and the
    model builder give the same error, naming the hub repository, the cache and the way out."""
    empty = tmp_path / "empty-hub"
    empty.mkdir()
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(empty))  # what HF_HUB_CACHE / HF_HOME set at import
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    cfg = config.load(["demo"], ["backbones=[test_resnet]", "phase1.init=imagenet", f"cache_dir={tmp_path}"])
    for attempt in (lambda: pipeline._check_inputs(cfg, ("phase1",)),  # before any data is read or trained
                    lambda: build_model(ModelSpec("test_resnet", ("a", "b")), "imagenet")):
        with pytest.raises(DTLError) as e:
            attempt()
        msg = str(e.value)
        assert f"ImageNet weights for test_resnet (timm/{HUB_MODEL}) are not in the local hub cache ({empty}" in msg
        assert "HF_HUB_OFFLINE=1" in msg and "init=file:" in msg and "init=scratch" in msg
    assert not list(tmp_path.glob("demo*"))  # the pre-flight failed before building the demo data



def test_the_imagenet_preflight_leaves_url_only_weights_to_the_model_builder(monkeypatch):
    """legacy_seresnet18's weights are a URL (torch hub), not a hub repository: the pre-flight has no
    cache to look in and must not fail with huggingface_hub's repository-id error."""
    from dtl.train.weights import check_imagenet

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    check_imagenet("legacy_seresnet18")  # returns: build_model gives the first trial's own error


@slow
def test_file_weights_in_timm_and_torchvision_format_use_the_named_tags_preprocessing(tmp_path):
    """timm's ``resnet50`` has torchvision's key names, so both files load; the preprocessing is
    the tag's the backbone names: ``a1_in1k`` (timm's default, crop 0.95, bicubic) or ``tv_in1k``."""
    import torchvision

    timm_sd = timm.create_model("resnet50", pretrained=False).state_dict()
    tv_sd = torchvision.models.resnet50(weights=None).state_dict()
    assert set(tv_sd) == set(timm_sd)  # the same names: nothing in the file says whose recipe made it
    torch.save(timm_sd, tmp_path / "timm.pth")
    torch.save(tv_sd, tmp_path / "tv.pth")
    for backbone, sd, name, size, interp, tag in (("resnet50", timm_sd, "timm.pth", 236, "bicubic", "a1_in1k"),
                                                  ("resnet50.tv_in1k", tv_sd, "tv.pth", 256, "bilinear", "tv_in1k")):
        net = build_model(ModelSpec(backbone, ("a", "b")), f"file:{tmp_path / name}")
        assert all(torch.equal(v, sd[k]) for k, v in net.backbone.state_dict().items())
        spec = resolve_input_spec(backbone)
        assert (spec.size, spec.cache_size, spec.interpolation, spec.pretrained) == (224, size, interp,
                                                                                     f"resnet50.{tag}")
    note = preprocessing_note("resnet50", "file:tv.pth", resolve_input_spec("resnet50"))
    assert "resnet50.a1_in1k" in note and "resnet50.tv_in1k" in note  # says what it used and what else exists
    assert preprocessing_note("resnet50.tv_in1k", "file:tv.pth", resolve_input_spec("resnet50.tv_in1k")) is None
    with pytest.raises(DTLError, match="another architecture"):
        build_model(ModelSpec("efficientnet_b0", ("a", "b")), f"file:{tmp_path / 'tv.pth'}")


@slow
def test_torchvision_file_with_its_tag_is_recorded_in_the_run(workspace, cache_dir, tmp_path):
    """The whole path: `dtl phase1` with ``init=file:`` a torchvision ResNet-50 state dict and the
    backbone named ``resnet50.tv_in1k`` (64 px to keep it cheap: the crop and interpolation are
    still the tag's). The run says which preprocessing was used."""
    import torchvision

    torch.manual_seed(7)
    tv_sd = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(tv_sd, tmp_path / "resnet50_tv.pth")
    p = dtl_phase1(workspace, cache_dir, {}, "resnet50.tv_in1k", f"file:{tmp_path / 'resnet50_tv.pth'}",
                   image_size=64)
    assert p.returncode == 0, p.stderr[-3000:]
    tags = study_run(workspace).data.tags
    assert tags[schema.BACKBONE] == "resnet50.tv_in1k" and tags[schema.PRETRAINED_TAG] == "resnet50.tv_in1k"
    assert tags[schema.INPUT_PREPROCESSING].startswith("64 px centre crop of 73 (crop 0.877), bilinear, mean (0.485")
    ck = best_checkpoint(workspace)
    assert ck["meta"]["input"]["pretrained"] == "resnet50.tv_in1k"
    assert all(torch.equal(ck["model"][f"backbone.{k}"], v) for k, v in tv_sd.items() if not k.startswith("fc."))
    assert "note:" not in p.stdout + p.stderr  # the tag is named: nothing to warn about
