"""dtl explain: Grad-CAM target layers and maps, the shortcut score on a painted-corner shortcut,
deterministic severity-monotone corruptions, temperature scaling, the stored temperature in the
served model, and (slow) the job end to end on the demo with the report section."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dtl.evaluation import calibration, robustness
from dtl.evaluation.metrics import expected_calibration_error
from dtl.explain import core as explain
from dtl.model.mask import ARIA_BOX
from dtl.model.net import DTLNet, ModelSpec
from dtl.model.preprocess import InputSpec, eval_transform

LAYERS = [("resnet50", "backbone.layer4"), ("efficientnet_b3", "backbone.bn2"), ("inception_v3", "backbone.Mixed_7c"),
          ("test_resnet", "backbone.layer4"), ("test_efficientnet", "backbone.bn2"),
          ("test_convnext", "backbone.stages.3")]


@pytest.mark.parametrize("backbone, layer", LAYERS)
def test_target_layer_resolution_per_backbone_built_without_weights(backbone, layer):
    net = DTLNet(ModelSpec(backbone, ("a", "b", "c")), pretrained=False)
    name, module = explain.target_layer(net)
    assert name == layer and module is net.get_submodule(layer)


def _hand_grad_cam(net, x: torch.Tensor, classes) -> torch.Tensor:
    """Grad-CAM written out (Selvaraju et al.): the target layer's activations weighted by the
    spatial mean of the class score's gradient, summed over channels, ReLU; at the layer's size."""
    _, layer = explain.target_layer(net)
    acts = {}
    hook = layer.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    saved = [p.requires_grad for p in net.parameters()]
    try:
        for p in net.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            score = net(x)[torch.arange(len(x)), torch.as_tensor(classes)].sum()
            grad = torch.autograd.grad(score, acts["a"])[0]
    finally:
        hook.remove()
        for p, s in zip(net.parameters(), saved):
            p.requires_grad_(s)
    return torch.relu((grad.mean((2, 3), keepdim=True) * acts["a"]).sum(1)).detach()


def _check_cams(backbone):
    torch.manual_seed(0)
    net = DTLNet(ModelSpec(backbone, ("a", "b", "c")), pretrained=False).eval()
    size = 160 if backbone == "inception_v3" else 96  # InceptionV3's last stage is 1x1 at 96 px: nothing to localise
    x, classes = torch.randn(4, 3, size, size), [0, 2, 1, 0]
    cams = explain.grad_cams(net, x, classes)
    assert cams.shape == (4, size, size) and cams.dtype == np.float32
    assert all(p.grad is None for p in net.parameters())  # no gradients left behind
    hand = _hand_grad_cam(net, x, classes)
    up = torch.nn.functional.interpolate(hand[:, None], size=cams.shape[-2:], mode="bilinear")[:, 0].numpy()
    nonzero = 0
    for m, h, u in zip(cams, hand, up):
        if h.max() - h.min() <= 1e-6 * max(float(hand.max()), 1e-12):
            # ReLU left nothing, or the map is flat (InceptionV3's last stage is 1x1 at 96 px): no location to
            # show; the library's min-max scaling makes it all zero, not noise
            assert m.max() == 0
            continue
        nonzero += 1
        assert m.min() == pytest.approx(0.0, abs=1e-6) and m.max() == pytest.approx(1.0, abs=1e-5)
        assert np.corrcoef(u.ravel(), m.ravel())[0, 1] > 0.999  # the same map (up to the library's resize)
    assert nonzero >= 2  # the comparison above is not vacuous


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "test_convnext"])
def test_cam_shape_and_normalisation_tiny_backbones(backbone):
    _check_cams(backbone)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet50", "efficientnet_b3", "inception_v3"])
def test_cam_shape_and_normalisation_real_backbones(backbone):
    _check_cams(backbone)


def test_region_maps_and_mass_shares_against_uniform_and_concentrated_maps():
    spec = InputSpec(96, 110, (0.5,) * 3, (0.5,) * 3)
    regions = explain.region_maps(spec)
    ann, corners = regions["annotation"], regions["corners"]
    # the box of a 110-px cache image (16 x 22 px) minus the 7-px crop at the bottom and right
    assert ann.shape == (96, 96) and ann.sum() == (16 - 7) * (22 - 7) and ann[-1, -1] and not ann[0, -1]
    assert corners.sum() == 4 * ann.sum() and corners[0, 0] and corners[-1, 0] and corners[0, -1]
    fg = np.zeros((2, 96, 96), bool)
    fg[:, 30:60, 30:60] = True
    cams = np.stack([np.ones((96, 96)), ann.astype(float)])
    s = explain.mass_shares(cams, fg, regions)
    assert s["annotation"][0] == pytest.approx(s["annotation_area"][0])  # uniform: mass share = area share
    assert s["foreground"][0] == pytest.approx(900 / 96 ** 2) and s["annotation"][1] == pytest.approx(1.0)
    rows = explain.shortcut_table(s, np.array([0, 1]), ["x", "y"])
    assert [r["flagged"] for r in rows] == [False, True, True]
    assert rows[0]["annotation_ratio"] == pytest.approx(1.0)


def painted(label_at: str, n: int = 96, size: int = 96, seed: int = 0):
    """Two classes of noise images that differ ONLY in a painted square: red or blue, in the
    annotation corner (bottom-right) or in the centre."""
    rng = np.random.default_rng(seed)
    x = rng.integers(60, 200, (n, size, size, 3)).astype(np.uint8)
    y = np.arange(n) % 2
    h, w = int(ARIA_BOX[0] * size * 1.5), int(ARIA_BOX[1] * size * 1.5)
    rows = slice(size - h, size) if label_at == "corner" else slice((size - h) // 2, (size + h) // 2)
    cols = slice(size - w, size) if label_at == "corner" else slice((size - w) // 2, (size + w) // 2)
    x[y == 0, rows, cols] = (220, 30, 30)
    x[y == 1, rows, cols] = (30, 30, 220)
    return x, y


def train_tiny(x: np.ndarray, y: np.ndarray, spec: InputSpec) -> DTLNet:
    torch.manual_seed(0)
    net = DTLNet(ModelSpec("test_resnet", ("red", "blue"))).train()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    xt = eval_transform(torch.from_numpy(x), spec)
    for step in range(40):
        idx = torch.arange(step * 16, step * 16 + 16) % len(y)
        loss = torch.nn.functional.cross_entropy(net(xt[idx]), torch.as_tensor(y)[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        assert (net(xt).argmax(1).numpy() == y).mean() == 1.0  # it learnt the painted label
    return net


@pytest.mark.slow  # trains two small networks (10-40 s on 2 CPU cores)
@pytest.mark.parametrize("label_at, flagged", [("corner", True), ("centre", False)])
def test_shortcut_score_flags_a_model_trained_on_a_label_painted_in_the_corner(label_at, flagged):
    spec = InputSpec(96, 96, (0.5,) * 3, (0.5,) * 3)  # no crop: the painted box stays whole
    x, y = painted(label_at)
    net = train_tiny(x, y, spec)
    cams = explain.grad_cams(net, eval_transform(torch.from_numpy(x), spec), y)
    s = explain.mass_shares(cams, explain.foreground_maps(x), explain.region_maps(spec))
    rows = explain.shortcut_table(s, y, ["red", "blue"])
    assert rows[-1]["flagged"] is flagged, rows[-1]
    assert any(r["flagged"] for r in rows) is flagged


def test_corruptions_are_deterministic_and_severity_monotone():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (224, 224, 3)).astype(np.uint8)
    img[60:160, 60:160] = (150, 60, 170)  # a stained "cell" on the noise
    for kind in robustness.KINDS:
        dist = []
        for sev in robustness.SEVERITIES:
            a = robustness.corrupt_one(img, kind, sev, seed=3, index=5)
            assert a.shape == img.shape and a.dtype == np.uint8
            assert np.array_equal(a, robustness.corrupt_one(img, kind, sev, seed=3, index=5)), kind
            dist.append(np.abs(a.astype(float) - img).mean())
        assert 0 < dist[0] < dist[1] < dist[2], (kind, dist)
    noisy = robustness.corrupt_all([img, img], "noise", 2, seed=3)
    assert not np.array_equal(noisy[0], noisy[1])  # each image its own seeded draw
    with pytest.raises(ValueError, match="valid: blur"):
        robustness.corrupt_one(img, "fog", 1)


def test_temperature_scaling_lowers_ece_of_an_overconfident_model_and_keeps_argmax():
    rng = np.random.default_rng(0)
    n, k = 4000, 4
    true_logits = rng.normal(0, 1.5, (n, k))
    p = calibration.softmax(true_logits)  # labels drawn from these probabilities: calibrated by construction
    y = (rng.random(n)[:, None] > p.cumsum(1)).sum(1)
    z = 4.0 * true_logits  # the same ranking, four times too confident
    val, test = slice(0, 2000), slice(2000, None)
    t = calibration.fit_temperature(z[val], y[val])
    assert 3.0 < t < 5.0  # recovers the inflation
    before = expected_calibration_error(y[test], calibration.softmax(z[test]))
    after = expected_calibration_error(y[test], calibration.softmax(z[test], t))
    assert before > 0.1 and after < before / 3
    assert (calibration.softmax(z, t).argmax(1) == z.argmax(1)).all()
    assert calibration.nll(z[val], y[val], t) < calibration.nll(z[val], y[val])


def test_served_probabilities_use_a_stored_temperature_and_models_without_one_serve_as_before(tmp_path):
    import json

    from safetensors.torch import save_file

    from dtl.model.pyfunc import _load_pyfunc, load_classifier
    from dtl.train.weights import resolve_input_spec

    torch.manual_seed(0)
    net = DTLNet(ModelSpec("test_resnet", ("a", "b", "c"))).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    spec = resolve_input_spec("test_resnet", 64)
    (tmp_path / "spec.json").write_text(json.dumps({"spec": net.spec.to_dict(), "input": spec.to_dict()}))
    imgs = list(np.random.default_rng(0).integers(0, 255, (5, 80, 80, 3)).astype(np.uint8))
    plain = load_classifier(tmp_path)
    assert plain.temperature == 1.0
    p1, z = plain.predict_proba(imgs), plain.logits(imgs)
    assert np.allclose(p1, calibration.softmax(z), atol=1e-6)
    (tmp_path / "calibration.json").write_text(json.dumps({"temperature": 2.5}))
    scaled = _load_pyfunc(str(tmp_path))
    p2 = scaled.predict_proba(imgs)
    assert scaled.temperature == 2.5 and np.allclose(p2, calibration.softmax(z, 2.5), atol=1e-6)
    assert (p2.argmax(1) == p1.argmax(1)).all() and (p2.max(1) < p1.max(1)).all()
    raw = _load_pyfunc(str(tmp_path), {"apply_temperature": False})
    assert np.allclose(raw.predict_proba(imgs), p1, atol=1e-6)
    (tmp_path / "calibration.json").write_text(json.dumps({"temperature": 0}))
    with pytest.raises(Exception, match="temperature must be > 0"):
        load_classifier(tmp_path)


# ----------------------------------------------------------------------------- end to end (slow)

@pytest.fixture(scope="module")
def explained(tmp_path_factory, cache_dir):
    """A tiny demo `main` (test_resnet, 1 trial per phase), then `dtl explain` on its champion, as a user runs it."""
    import os
    import subprocess

    from dtl import config, pipeline
    from dtl.tracking.adapter import connect
    from tests.conftest import PYTHON, demo_overrides, module_workspace

    with module_workspace(tmp_path_factory.mktemp("explain")) as tmp:
        o = demo_overrides(cache_dir, tmp, cards_dir=str(tmp / "cards"), **{"phase1.n_trials": 1, "phase2.n_trials": 1})
        cfg = config.load(["demo"], o)
        res = pipeline.main(cfg, report=False)
        t = connect(cfg.tracking_uri, cfg.experiment)

        def cli(*args):
            return subprocess.run([PYTHON, "-m", "dtl", "explain", "--config", "demo", "--quiet",
                                   *[a for x in o for a in ("-o", x)], *args], capture_output=True, text=True,
                                  timeout=600, env={**os.environ, "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]})

        p = cli()
        assert p.returncode == 0, p.stderr[-3000:]
        yield tmp, cfg, t, res, p.stdout, cli


@pytest.mark.slow
def test_explain_logs_under_the_champion_study_run_and_writes_the_report_folder(explained):
    from dtl.tracking.adapter import find_runs

    tmp, cfg, t, res, out, _ = explained
    mv = t.client.get_model_version_by_alias("all-dtl", "champion")
    runs = find_runs(t, "tags.`dtl.role` = 'explain'")
    assert len(runs) == 1 and runs[0].data.tags["mlflow.parentRunId"] == mv.run_id
    m = runs[0].data.metrics
    for k in ("temperature", "test_ece_before", "test_ece_after", "val_ece_after", "cam_annotation_share",
              "clean_accuracy", "cross_variant_d_accuracy_ci_low", "blur_3_relative_accuracy", "noise_1_accuracy",
              "annotation_masked_vs_unmasked_agreement", "mean_relative_accuracy_mean"):
        assert k in m, k
    # the values, not only the keys: explain scores the champion's own test items again, so its clean
    # accuracy is the study's logged test accuracy and its ECE before scaling is the ECE of the study's
    # logged test probabilities (Guo's ECE written per item in the test; probabilities kept to 5 places)
    import pandas as pd

    from dtl.tracking import schema
    from tests.test_stats import _ece_oracle

    study = t.client.get_run(mv.tags[schema.PHASE2_RUN])
    assert m["clean_accuracy"] == pytest.approx(study.data.metrics["test_accuracy"], abs=1e-9)
    logged = pd.read_csv(t.client.download_artifacts(study.info.run_id, "evaluation/predictions_test.csv"))
    cols = [c for c in logged.columns if c.startswith("p_")]
    y = np.asarray([cols.index(f"p_{label}") for label in logged["label"]])
    p = logged[cols].to_numpy()
    assert m["test_ece_before"] == pytest.approx(_ece_oracle(y, p), abs=1e-4)
    # softmax(log p / T) = softmax(z / T): the scaled probabilities from the logged ones
    assert m["test_ece_after"] == pytest.approx(_ece_oracle(y, calibration.softmax(np.log(np.clip(p, 1e-5, 1)),
                                                                                m["temperature"])), abs=2e-3)
    assert m["blur_3_relative_accuracy"] == pytest.approx(m["blur_3_accuracy"] / m["clean_accuracy"], rel=1e-6)
    assert 0.0 <= m["cam_annotation_share"] <= 1.0 and 0.0 <= m["annotation_masked_vs_unmasked_agreement"] <= 1.0
    assert m["test_ece_before_ci_low"] <= m["test_ece_before"] <= m["test_ece_before_ci_high"]
    d = tmp / "report" / "explain" / "all-dtl-champion"
    for f in ("robustness.md", "robustness.html", "robustness.csv", "cam_grid.png", "reliability.png", "shortcut.csv",
              "predictions.csv", "summary.json"):
        assert (d / f).is_file(), f
    assert (d / "cam_grid.png").stat().st_size > 20_000 and "Cross-variant (segmented)" in out
    md = (d / "robustness.md").read_text()
    assert "jpeg 3" in md and "stain 2" in md and "annotation masked vs unmasked" in md and "95% paired CI" in md
    arts = {a.path for a in t.client.list_artifacts(runs[0].info.run_id, "explain")}
    assert "explain/cam_grid.png" in arts and "explain/summary.json" in arts


@pytest.mark.slow
def test_the_champion_serves_temperature_scaled_probabilities_and_its_card_says_so(explained):
    import json

    import mlflow

    from dtl.tracking.adapter import find_runs

    tmp, cfg, t, res, out, _ = explained
    mv = t.client.get_model_version_by_alias("all-dtl", "champion")
    temp = float(mv.tags["calibration.temperature"])
    run = find_runs(t, "tags.`dtl.role` = 'explain'")[0]
    assert temp == pytest.approx(run.data.metrics["temperature"], rel=1e-5)
    card = (tmp / "cards" / f"all-dtl-v{mv.version}.md").read_text()
    assert f"softmax(logits / {temp:.3f})" in card and "apply_temperature" in card
    img = np.random.default_rng(0).integers(0, 255, (2, 70, 70, 3)).astype(np.uint8)
    served = mlflow.pyfunc.load_model("models:/all-dtl@champion").predict(img)
    raw = mlflow.pyfunc.load_model("models:/all-dtl@champion", model_config={"apply_temperature": False}).predict(img)
    logits = mlflow.pytorch.load_model("models:/all-dtl@champion")  # the nn.Module
    assert list(served["class"]) == list(raw["class"])
    p, q = served.filter(like="p_").to_numpy(), raw.filter(like="p_").to_numpy()
    assert not np.allclose(p, q) and np.allclose(calibration.softmax(np.log(q), temp), p, atol=1e-4)
    assert logits is not None and json.loads((tmp / "report" / "explain" / "all-dtl-champion" / "summary.json")
                                             .read_text())["temperature_stored"] is True


@pytest.mark.slow
def test_explain_never_changes_a_version_it_registers_the_calibrated_model_as_a_new_one(explained):
    """The explained champion keeps its files; the temperature is a new logged model (in the job's
    experiment) and a new version ``calibrated_from`` it, and the aliases move by the policy."""
    import mlflow

    tmp, cfg, t, res, out, cli = explained
    versions = {str(v.version): v for v in t.client.search_model_versions("name='all-dtl'")}
    champ = t.client.get_model_version_by_alias("all-dtl", "champion")
    src = versions[champ.tags["calibrated_from"]]  # the version main promoted and explain explained
    assert str(src.version) == res.champion and str(champ.version) != str(src.version) and "calibration.temperature" not in src.tags
    assert src.source != champ.source and champ.run_id == src.run_id
    def listed(source):  # the files under dtl/ of a version's logged model
        loc = t.client.get_logged_model(source.removeprefix("models:/")).artifact_location
        return {Path(a.path).name for a in mlflow.artifacts.list_artifacts(artifact_uri=f"{loc}/dtl")}

    assert "calibration.json" not in listed(src.source) and "calibration.json" in listed(champ.source)
    cal = t.client.get_logged_model(champ.source.removeprefix("models:/"))
    assert cal.name == "test_resnet-double-calibrated" and cal.experiment_id == t.experiment_id
    assert cal.tags["calibrated_from"] == f"all-dtl/{src.version}" and "test_accuracy" in {m.key for m in cal.metrics}
    assert not t.client.search_logged_models(["0"]), "a logged model in MLflow's Default experiment"
    p = cli()  # explaining the calibrated champion again: nothing new is registered
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(t.client.search_model_versions("name='all-dtl'")) == len(versions)
    import json

    summary = json.loads((tmp / "report" / "explain" / "all-dtl-champion" / "summary.json").read_text())
    assert summary["temperature_stored"] is False and "already the calibrated copy" in summary["temperature_not_stored"]


@pytest.mark.slow
def test_report_has_the_explain_section(explained):
    from dtl.report import results as report

    tmp, cfg, t, res, out, _ = explained
    d = report.build(t, tmp / "report", cfg.registered_model)
    md = (d / "results.md").read_text()
    assert "## Explain and stress" in md and "Most robust to corruption" in md and "ECE test before → after" in md
    assert (d / "explain_robustness.png").stat().st_size > 5000 and "Explain and stress" in (d / "report.html").read_text()
    # only the models of the table's rows: an explained study that a later one replaced is left out
    from dtl.explain.report import section

    study = res.studies[("phase2", "double", "test_resnet")].run_id
    assert section(t, studies={study})[0] and section(t, studies={"a-replaced-study"}) == ([], {})


@pytest.mark.slow
def test_explain_refuses_a_model_or_split_that_does_not_exist(explained):
    *_, cli = explained
    p = cli("--model", "models:/all-dtl@nope")
    assert p.returncode == 2 and "does not resolve" in p.stderr and "Registered models: all-dtl (aliases: " in p.stderr
    assert "champion" in p.stderr.split("Registered models: ")[1]
    p = cli("--split", "holdout")
    assert p.returncode == 2 and "--split 'holdout' does not exist" in p.stderr and "valid: test, train, val" in p.stderr
    p = cli("--split", "val")  # T is fitted there: its calibration on val would be in-sample
    assert p.returncode == 2 and "in-sample" in p.stderr and "held-out split (test)" in p.stderr


def test_a_temperature_the_validation_split_cannot_support_is_not_stored():
    assert calibration.supported(0.68, 13)
    assert not calibration.supported(0.68, 0)  # error-free val: NLL keeps falling as T -> 0
    assert not calibration.supported(0.03, 2) and not calibration.supported(40.0, 2)  # at the search bounds
    logits = np.array([[4.0, 0.0], [0.0, 4.0], [3.0, 0.0], [0.0, 5.0]])
    t = calibration.fit_temperature(logits, np.array([0, 1, 0, 1]))  # separable: T runs to the bound
    assert not calibration.supported(t, 0) and t < 0.1  # near one-hot: stored, it would make every answer certain


@pytest.mark.slow
def test_a_model_logged_without_temperature_support_gets_none_stored(explained):
    """MLflow serves a logged model with its own bundled copy of dtl: a model logged before the
    temperature option would ignore a calibration file, so explain must not claim to store one."""
    import yaml

    from dtl.explain.job import _applies_temperature

    tmp, cfg, t, res, out, _ = explained
    mv = t.client.get_model_version_by_alias("all-dtl", "champion")
    model_id = mv.model_id or mv.source.removeprefix("models:/")  # registered from the logged model's URI
    assert _applies_temperature(t, model_id)
    mlmodel = Path(t.client.get_logged_model(model_id).artifact_location.removeprefix("file://")) / "MLmodel"
    text = mlmodel.read_text()
    try:
        doc = yaml.safe_load(text)
        doc["flavors"]["python_function"]["config"].pop("apply_temperature")
        mlmodel.write_text(yaml.safe_dump(doc))
        assert not _applies_temperature(t, model_id)
    finally:
        mlmodel.write_text(text)


def test_cross_variant_pairs_the_same_items_in_both_directions(cache_dir):
    """Original -> Segmented and the reverse: the same split, the same relative paths, on the demo Aria
    layout (both variant folders); a folder set without variants gets a row saying why."""
    from dataclasses import replace

    from dtl.config import DataConfig
    from dtl.data.datasets import load_dataset

    orig = load_dataset(DataConfig(kind="demo-aria"), cache_dir)
    seg = load_dataset(DataConfig(kind="demo-aria", variant="segmented"), cache_dir)
    to_seg, to_orig = robustness.other_variant(orig, "test"), robustness.other_variant(seg, "test")
    assert (to_seg.variant, to_orig.variant) == ("segmented", "original")
    assert to_seg.root.name == "Segmented" and to_orig.root.name == "Original"
    paths = list(orig.split("test")["path"])
    assert len(to_seg.index) == len(paths) and all((to_seg.root / paths[i]).is_file() for i in to_seg.index)
    assert sorted(seg.split("test")["path"]) == sorted(paths)  # one grouping and split for both variants
    plain = replace(orig, root=orig.root.parent.parent / "cells")  # a class-per-folder set, no variants
    none = robustness.other_variant(plain, "test")
    assert len(none.index) == 0 and "not an Aria variant folder" in none.reason


def _explained(strategy: str, preprocessing: str, stain_correct: np.ndarray, clean_correct: np.ndarray):
    """An explained model of 4 classes on 12 items: correct where asked, else predicting class 3."""
    import pandas as pd

    from dtl.explain.report import CORRUPTED, Explained

    classes = ["A", "B", "C", "D"]
    y = np.arange(12) % 3  # never class 3: a wrong prediction is 3
    wrong = np.full(12, 3)
    cols = {k: y for k in CORRUPTED}
    cols.update({f"stain{s}": np.where(stain_correct, y, wrong) for s in (1, 2, 3)})
    items = pd.DataFrame({"path": [f"p{i}.jpg" for i in range(12)], "label": [classes[i] for i in y],
                          "bootstrap_unit": [f"p{i}.jpg" for i in range(12)],
                          "clean": np.where(clean_correct, y, wrong), "cross_variant": y, **cols})
    return Explained(label=f"run:{strategy}-{preprocessing}", backbone="test_resnet", strategy=strategy, split="test",
                     n=12, rows=[], mean_relative={}, shortcut=[{}], calibration={}, classes=classes, phase="phase2", masked="on",
                     data="aria", preprocessing=preprocessing, items=items)


def test_explain_section_pairs_a_stain_setting_with_the_default_on_stain_shift_relative_accuracy():
    """#23: the stain-augmented model and the default one, explained on the same items, get a
    'hed=0.2 − default' row of stain-shift relative accuracy (stain / clean) with a paired CI,
    and no strategy pair across preprocessing settings."""
    from dtl.explain.report import strategy_gains

    clean = np.ones(12, bool)
    clean[0] = False  # clean accuracy 11/12 for both
    base = _explained("double", "default", np.arange(12) < 6, clean)  # stain 6/12
    hed = _explained("double", "hed=0.2", np.arange(12) < 11, clean)  # stain 11/12
    scratch = _explained("scratch", "default", np.arange(12) < 3, clean)
    g = strategy_gains([base, hed, scratch], n_boot=200)
    rel = g[g["metric"].str.startswith("stain-shift")].set_index("comparison")
    hed_pair, strategy_pair = "hed=0.2 − default (double, mask on)", "double − scratch (default, mask on)"
    assert set(rel.index) == {hed_pair, strategy_pair}
    assert rel.loc[hed_pair, "gain"] == pytest.approx((11 / 12) / (11 / 12) - (6 / 12) / (11 / 12))
    assert rel.loc[strategy_pair, "gain"] == pytest.approx((6 - 3) / 11)
    lo, hi = rel.loc[hed_pair, ["ci_low", "ci_high"]]
    assert 0 < lo <= rel.loc[hed_pair, "gain"] <= hi
    assert set(g["items"]) == {12}
    assert not g["comparison"].str.startswith("hed=0.2 − default (scratch").any()  # two settings apart: no pair
    # a model whose study (and so its preprocessing) is unknown is never paired with the default one
    lost = _explained("double", "unknown", np.arange(12) < 11, clean)
    assert strategy_gains([lost, base], n_boot=50).empty and strategy_gains([lost, scratch], n_boot=50).empty


@pytest.mark.parametrize("colour", ["greyscale", "reinhard"])
def test_cam_cell_share_of_a_greyscale_model_is_measured_on_the_colour_image(colour):
    """The first real rebuild reported 0.0% of the greyscale models' CAM mass 'on cells': the HSV
    cell rule ran on the greyscale input, where it finds no cell. The cells are now found on the
    same image preprocessed in its raw colour, so they cover what they cover in colour."""
    from PIL import Image

    from dtl.explain.job import cell_maps
    from dtl.model.pyfunc import ImageClassifier
    from tests.conftest import require_real_data

    root = require_real_data() / "aria-all-pbs-2021" / "Original"
    raw = [np.asarray(Image.open(sorted((root / c).glob("*.jpg"))[3]).convert("RGB")) for c in ("Benign", "Pro")]
    spec = InputSpec(96, 96, (0.5,) * 3, (0.25,) * 3)
    net = DTLNet(ModelSpec("test_resnet", ("Benign", "Pro")), pretrained=False)
    colour_clf = ImageClassifier(net, ["Benign", "Pro"], spec)
    other_clf = ImageClassifier(net, ["Benign", "Pro"], InputSpec(96, 96, (0.5,) * 3, (0.25,) * 3, colour=colour))
    from dtl.explain.job import _model_input

    inputs = np.stack([_model_input(other_clf, im) for im in raw])
    want = cell_maps(colour_clf, raw, np.stack([_model_input(colour_clf, im) for im in raw]))
    got = cell_maps(other_clf, raw, inputs)
    assert 0.03 < want.mean() < 0.6 and np.array_equal(got, want)
    if colour == "greyscale":
        assert explain.foreground_maps(inputs).mean() < 0.01  # what the input alone gave
