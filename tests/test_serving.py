"""The registered model as a service and as a portable artifact.

A real ``mlflow models serve`` on 127.0.0.1: bad rows get HTTP 400 naming the row and the
problem, file paths are never read, decoding is bounded, every image mode classifies, and
the server answers a valid request after each bad one. Then the model's own requirements
in a fresh virtualenv, with this checkout out of reach, load ``@champion`` and predict.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from dtl.model.decode import InputPolicy, InvalidInput, decode_image_bytes
from dtl.model.errors import DTLError
from dtl.model.net import DTLNet, ModelSpec
from dtl.tracking.adapter import connect, start_run
from dtl.tracking.registry import log_model, register
from dtl.tracking.resolve import model_artifacts
from dtl.train.weights import resolve_input_spec, save_checkpoint
from tests.conftest import ROOT, SHARED, mlflow_serve, module_workspace, require_real_data

CLASSES = ("Benign", "Early", "Pre", "Pro")


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """An untrained test_resnet logged, registered and aliased ``champion`` in a fresh store
    (serving does not need a trained model, and this keeps the module fast)."""
    with module_workspace(tmp_path_factory.mktemp("serving")) as tmp:
        t = connect(f"sqlite:///{tmp}/mlflow.db", "serving")
        net = DTLNet(ModelSpec("test_resnet", CLASSES))
        ckpt = save_checkpoint(tmp / "best.pt", net, {"phase": "phase2", "init": "scratch", "data_digest": "x",
                                                      "input": resolve_input_spec("test_resnet", 64).to_dict()})
        run = start_run(t, "serving-model", {"dtl.role": "study"})
        model_uri = log_model(run, ckpt)
        version = register(t, "all-dtl", model_uri, run.id, {"backbone": "test_resnet"})
        t.client.set_registered_model_alias("all-dtl", "champion", version)
        run.end()
        yield tmp, t


@pytest.fixture(scope="module")
def server(champion):
    tmp, _ = champion
    with mlflow_serve("models:/all-dtl@champion", tmp) as url:
        yield url


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _cell() -> Image.Image:
    """A stained-cell-like RGB picture: a purple disc on a pale background."""
    yy, xx = np.mgrid[:90, :80]
    disc = ((yy - 45) ** 2 + (xx - 40) ** 2) < 900
    arr = np.where(disc[..., None], [120, 60, 160], [235, 225, 230]).astype(np.uint8)
    return Image.fromarray(arr)


GOOD = _b64(_png(_cell()))


def _post(url: str, rows: list) -> requests.Response:
    return requests.post(f"{url}/invocations", json={"dataframe_records": [{"image": r} for r in rows]}, timeout=30)


def _assert_still_serves(url: str) -> None:
    r = _post(url, [GOOD])
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["class"] in CLASSES


def _bad_rows(tmp: Path) -> dict[str, str]:
    fifo = tmp / "blocking.fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    bomb = Image.new("L", (9000, 9000))  # 81 MP of zeros: a few hundred KB as PNG
    return {
        "existing file": str(ROOT / "README.md"),
        "missing file": str(tmp / "no-such-image.jpg"),
        "server's own weights": str(next(tmp.rglob("weights.safetensors"), tmp / "w")),
        "fifo": str(fifo),  # the old code opened it and blocked the worker forever
        "device": "/dev/zero",
        "not an image": _b64(b"plain text, not an image"),
        "decompression bomb": _b64(_png(bomb)),
    }


@pytest.mark.slow
def test_bad_rows_get_400_naming_the_row_and_the_server_keeps_serving(champion, server):
    tmp, _ = champion
    answers = {}
    for what, value in _bad_rows(tmp).items():
        r = _post(server, [GOOD, value])
        assert r.status_code == 400, (what, r.status_code, r.text[:300])
        msg = r.json()["message"]
        assert "input row 1:" in msg, (what, msg[-300:])
        answers[what] = msg.split("input row 1:")[-1]
        _assert_still_serves(server)
    # paths are never read: an existing file and a missing one get the same answer (no oracle)
    for what in ("existing file", "missing file", "server's own weights", "fifo", "device"):
        assert "file paths are not read" in answers[what], (what, answers[what])
    assert "not a readable image" in answers["not an image"]
    assert "exceeds the limit" in answers["decompression bomb"]


@pytest.mark.slow
@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("I;16", "PNG"), ("P", "PNG"), ("RGBA", "PNG"),
                                       ("LA", "PNG"), ("CMYK", "JPEG"), ("CMYK", "TIFF")])
def test_every_image_mode_converts_and_classifies(server, mode, fmt):
    rgb = _cell()
    if mode == "I;16":  # the 8-bit grey picture scaled to 16 bits: must classify like the 8-bit one
        img = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
        assert img.mode == "I;16"
    else:  # an adaptive palette holds the picture's two colours exactly
        img = rgb.convert("P", palette=Image.ADAPTIVE) if mode == "P" else rgb.convert(mode)
    r = _post(server, [_b64(_png(img, fmt)), _b64(_png(rgb.convert("L"))), _b64(_png(rgb))])
    assert r.status_code == 200, r.text[-500:]
    pred, grey, colour = r.json()["predictions"]
    assert pred["class"] in CLASSES
    # the same picture gets the same probabilities: exactly where the conversion is lossless,
    # within what JPEG changes otherwise
    same = grey if mode in ("L", "I;16", "LA") else colour
    tol = 1e-2 if fmt == "JPEG" else 1e-4
    assert all(abs(pred[f"p_{c}"] - same[f"p_{c}"]) < tol for c in CLASSES), (pred, same)


@pytest.mark.slow
def test_paths_only_in_local_python_when_asked(champion, tmp_path):
    """`mlflow.pyfunc.load_model(..., model_config={"allow_paths": True})` reads files; by default not."""
    f = tmp_path / "cell.png"
    _cell().save(f)
    with pytest.raises(InvalidInput, match="input row 0: .*file paths are not read"):
        mlflow.pyfunc.load_model("models:/all-dtl@champion").predict({"image": [str(f)]})
    local = mlflow.pyfunc.load_model("models:/all-dtl@champion", model_config={"allow_paths": True})
    assert local.predict({"image": [str(f)]})["class"][0] in CLASSES
    with pytest.raises(InvalidInput, match="not a regular file"):
        local.predict({"image": ["/dev/zero"]})


@pytest.mark.slow
def test_mlflow_evaluate_scores_the_champion_with_the_class_output(champion):
    """The documented `mlflow.models.evaluate(..., model_type="classifier", predictions="class")` on
    base64 images: MLflow's classifier evaluator compares one column of predictions with the targets,
    so the whole class + p_<class> table failed inside it (TypeError: '<' between float and str)."""
    from dtl.model.pyfunc import OUTPUTS

    imgs = [_cell(), _cell().rotate(90), Image.new("RGB", (50, 70), (200, 180, 210)), _cell().convert("L").convert("RGB")]
    df = pd.DataFrame({"image": [_b64(_png(im)) for im in imgs] * 2, "label": list(CLASSES) * 2})
    table = mlflow.pyfunc.load_model("models:/all-dtl@champion").predict(df[["image"]])
    assert list(table.columns) == ["class", *(f"p_{c}" for c in CLASSES)]  # the default output is unchanged
    with mlflow.start_run():
        res = mlflow.models.evaluate("models:/all-dtl@champion", data=df, targets="label", model_type="classifier",
                                     predictions="class", evaluator_config={"label_list": list(CLASSES)},
                                     model_config={"output": "class"})
    assert res.metrics["example_count"] == 8
    assert res.metrics["accuracy_score"] == pytest.approx(float((table["class"] == df["label"]).mean()))
    classes = mlflow.pyfunc.load_model("models:/all-dtl@champion", model_config={"output": "class"}).predict(df[["image"]])
    assert isinstance(classes, pd.Series) and classes.tolist() == table["class"].tolist()
    with pytest.raises(DTLError, match=r"output='probs': valid choices are " + ", ".join(OUTPUTS)):
        mlflow.pyfunc.load_model("models:/all-dtl@champion", model_config={"output": "probs"})


def test_output_mode_defaults_to_the_table_and_names_its_choices():
    from dtl.model.pyfunc import output_mode

    assert output_mode(None) == output_mode({"allow_paths": True}) == "table" and output_mode({"output": "class"}) == "class"
    with pytest.raises(DTLError, match="output='Class': valid choices are table, class"):
        output_mode({"output": "Class"})

def test_decoded_bytes_are_bounded():
    data = _png(_cell())
    with pytest.raises(InvalidInput, match="exceed the limit of 100"):
        decode_image_bytes(data, InputPolicy(max_bytes=100))
    with pytest.raises(InvalidInput, match="exceeds the limit of 1000"):
        decode_image_bytes(data, InputPolicy(max_pixels=1000))


def _aria_image() -> Path:
    require_real_data()
    return sorted((SHARED / "aria-all-pbs-2021" / "Original" / "Pro").glob("*.jpg"))[0]


@pytest.mark.slow
def test_champion_loads_and_predicts_in_a_fresh_virtualenv_from_its_own_requirements(champion, tmp_path, request):
    """Only the model's requirements.txt is installed (from the package index); the checkout
    is not importable: the model brings its own code."""
    _, t = champion
    img = _aria_image()
    reqs = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model_artifacts(t.client, 'models:/all-dtl@champion')}/requirements.txt",
        dst_path=str(tmp_path / "reqs")))
    lines = [x for x in reqs.read_text().split() if x]
    for dist in ("torch==", "timm==", "safetensors==", "pillow==", "mlflow=="):
        assert any(x.lower().startswith(dist) for x in lines), (dist, lines)
    assert not [x for x in lines if x.split("==")[0].lower() in ("dtl", "all-dtl")], lines
    venv = tmp_path / "venv"
    request.addfinalizer(lambda: shutil.rmtree(venv, ignore_errors=True))  # ~6 GB with torch's CUDA wheels
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "-r", str(reqs)], capture_output=True, text=True,
                         timeout=1500)
    assert pip.returncode == 0, pip.stderr[-3000:]
    script = (
        "import sys, mlflow, pandas as pd, base64\n"
        "try:\n    import dtl\nexcept ImportError:\n    pass\nelse:\n    sys.exit('dtl importable: ' + dtl.__file__)\n"
        "m = mlflow.pyfunc.load_model('models:/all-dtl@champion')\n"
        f"b = base64.b64encode(open({str(img)!r}, 'rb').read()).decode()\n"
        "out = m.predict(pd.DataFrame({'image': [b]}))\n"
        "import dtl\nprint(out.iloc[0]['class'], dtl.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    p = subprocess.run([py, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    cls, where = p.stdout.split()[-2:]
    assert cls in CLASSES and "/code/dtl/" in where and str(ROOT) not in where


@pytest.mark.slow
@pytest.mark.parametrize("module, allowed", [("dtl.model.pyfunc", set()), ("dtl.model.fuzzy", {"skfuzzy", "scipy"}),
                                           ("dtl.serving", set()), ("dtl.fuzzy_serving", {"skfuzzy", "scipy"})])
def test_served_code_imports_only_what_the_model_requires(module, allowed):
    """A logged model installs only its requirements.txt (torch, timm, mlflow, ... and scikit-fuzzy
    for the fuzzy head): the modules it loads must not import the training-side libraries. Found
    by the fresh-virtualenv test when dtl.data pulled in imagehash; this catches it in seconds."""
    training_only = {"imagehash", "sklearn", "scipy", "optuna", "skfuzzy", "psycopg", "matplotlib",
                     "threadpoolctl", "psutil"} - allowed
    script = (
        "import sys, importlib.abc\n"
        f"BLOCK = {sorted(training_only)!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BLOCK:\n"
        "            raise ImportError('a served model cannot import ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"import {module}\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


# ----------------------------------------------------------------------------- in-process (fast)
# A model written by the project's own save_model and loaded by mlflow.pyfunc.load_model, the
# path `mlflow models serve` takes, without the server process.

@pytest.fixture(scope="module")
def saved_segmented(tmp_path_factory):
    """An untrained test_resnet whose input spec masks the annotation with the ``Segmented``
    variant's black fill (not the default light grey), saved as the two-flavor model."""
    import torch

    from dtl.model.mask import annotation_mask
    from dtl.tracking.logged import save_model

    torch.manual_seed(0)
    net = DTLNet(ModelSpec("test_resnet", CLASSES)).eval()
    ispec = replace(resolve_input_spec("test_resnet", 64), mask=annotation_mask("on", "aria", "segmented"))
    path = tmp_path_factory.mktemp("saved") / "model"
    save_model(path, net, {"spec": net.spec.to_dict(), "input": ispec.to_dict()}, np.zeros((64, 64, 3), np.uint8))
    return path, net, ispec


def _probs(model, rows) -> np.ndarray:
    out = model.predict({"image": rows})
    return out[[f"p_{c}" for c in CLASSES]].to_numpy(float)


def test_a_served_segmented_mask_fills_the_corner_black(saved_segmented):
    """Oracle: the same net, unmasked, on the image with its bottom-right 32×44 of 224 px painted
    black by hand; a mask that lost its fill on load (light grey) gives other probabilities."""
    from dtl.model.pyfunc import ImageClassifier

    path, net, ispec = saved_segmented
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (224, 224, 3)).astype(np.uint8)
    painted = img.copy()
    painted[224 - 32:, 224 - 44:] = 0
    served = _probs(mlflow.pyfunc.load_model(str(path)), [_b64(_png(Image.fromarray(img)))])
    bare = ImageClassifier(net, list(CLASSES), replace(ispec, mask=None))
    assert np.allclose(served, bare.predict_proba([painted]), atol=1e-6)
    grey = painted.copy()
    grey[224 - 32:, 224 - 44:] = 230
    assert not np.allclose(served, bare.predict_proba([grey]), atol=1e-4)  # the fill is visible to the net


def test_model_config_bounds_bytes_and_pixels_of_every_input_kind(saved_segmented):
    path = str(saved_segmented[0])
    png = _b64(_png(_cell()))  # 80×90 = 7200 pixels
    assert len(_probs(mlflow.pyfunc.load_model(path), [png, np.zeros((200, 200, 3), np.uint8)])) == 2
    small_bytes = mlflow.pyfunc.load_model(path, model_config={"max_image_bytes": 100})
    with pytest.raises(InvalidInput, match=f"input row 0: base64 input of {len(png)} characters decodes to more than 100 bytes"):
        small_bytes.predict({"image": [png]})
    raw = _png(_cell())
    with pytest.raises(InvalidInput, match=f"input row 1: {len(raw)} bytes of image data exceed the limit of 100"):
        small_bytes.predict({"image": [np.zeros((9, 9, 3), np.uint8), raw]})
    few_pixels = mlflow.pyfunc.load_model(path, model_config={"max_image_pixels": 7199})
    with pytest.raises(InvalidInput, match="input row 0: image of 80×90 pixels exceeds the limit of 7199"):
        few_pixels.predict({"image": [png]})
    with pytest.raises(InvalidInput, match="input row 1: image of 100×72 pixels exceeds the limit of 7199"):
        few_pixels.predict({"image": [np.zeros((10, 10, 3), np.uint8).tolist(), np.zeros((72, 100, 3), np.uint8)]})
    exact = mlflow.pyfunc.load_model(path, model_config={"max_image_pixels": 7200})  # the bound itself is allowed
    assert len(_probs(exact, [png, np.zeros((90, 80, 3), np.uint8)])) == 2


def test_array_input_policy_bounds_shapes_and_dtypes():
    from dtl.model.decode import image_from_value

    policy = InputPolicy(max_pixels=100)
    assert image_from_value(np.zeros((10, 10, 3), np.uint8), policy).shape == (10, 10, 3)
    with pytest.raises(InvalidInput, match="image of 11×10 pixels exceeds the limit of 100"):
        image_from_value(np.zeros((10, 11, 3), np.uint8), policy)
    grey = image_from_value(np.arange(6, dtype=np.int64).reshape(2, 3) * 100)
    assert grey.shape == (2, 3, 3) and grey.dtype == np.uint8 and grey[..., 0].tolist() == [[0, 100, 200], [255, 255, 255]]
    rgba = image_from_value(np.full((2, 2, 4), 7, np.uint8))
    assert rgba.shape == (2, 2, 3) and rgba.flags["C_CONTIGUOUS"] and (rgba == 7).all()
    assert image_from_value(np.full((1, 1, 3), -5.0)).tolist() == [[[0, 0, 0]]]
    with pytest.raises(InvalidInput, match=r"H×W×3 \(RGB\), got shape \(2, 2, 2\)"):
        image_from_value(np.zeros((2, 2, 2)))
    with pytest.raises(InvalidInput, match="must hold numbers, not <U1"):
        image_from_value(np.full((2, 2, 3), "a"))
    with pytest.raises(InvalidInput, match="rectangular"):
        image_from_value([[1, 2], [3]])
    with pytest.raises(InvalidInput, match="cannot read an image from a float"):
        image_from_value(1.5)


@pytest.mark.parametrize("mode, fmt, tol", [("RGBA", "PNG", 0), ("P", "PNG", 0), ("CMYK", "TIFF", 0),
                                            ("CMYK", "JPEG", 2)])
def test_rgba_palette_and_cmyk_give_the_rgb_image_and_its_probabilities(saved_segmented, mode, fmt, tol):
    """Each mode decodes to the RGB picture (exactly where the format is lossless, within JPEG's
    mean error otherwise) and so gets the RGB image's probabilities."""
    from dtl.model.decode import read_images

    rgb = _cell()
    img = rgb.convert("P", palette=Image.ADAPTIVE) if mode == "P" else rgb.convert(mode)
    want = np.asarray(rgb).copy()
    if mode == "RGBA":  # transparent outside the disc: composited over white, as documented
        background = np.asarray(rgb)[..., 0] == 235
        img.putalpha(Image.fromarray(np.where(background, 0, 255).astype(np.uint8)))
        want[background] = 255
    (got,) = read_images({"image": [_b64(_png(img, fmt))]})
    assert got.shape == want.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    assert (diff.max() if tol == 0 else diff.mean()) <= tol
    p = _probs(mlflow.pyfunc.load_model(str(saved_segmented[0])), [_b64(_png(img, fmt)), _b64(_png(Image.fromarray(want)))])
    assert np.allclose(p[0], p[1], atol=1e-6 if tol == 0 else 5e-3), p


def _colourful(seed: int = 0) -> np.ndarray:
    """A field of coloured blobs: its greyscale version is another picture to a net that sees colour."""
    rng = np.random.default_rng(seed)
    img = np.repeat(np.repeat(rng.integers(0, 256, (14, 14, 3)), 16, 0), 16, 1)
    return np.clip(img + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def saved_by_colour(tmp_path_factory):
    """One untrained test_resnet saved twice, its input spec's colour raw and greyscale."""
    import torch

    from dtl.tracking.logged import save_model

    torch.manual_seed(0)
    net = DTLNet(ModelSpec("test_resnet", CLASSES)).eval()
    root = tmp_path_factory.mktemp("colour")
    for colour in ("raw", "greyscale"):
        ispec = replace(resolve_input_spec("test_resnet", 64), colour=colour)
        save_model(root / colour, net, {"spec": net.spec.to_dict(), "input": ispec.to_dict()},
                   np.zeros((64, 64, 3), np.uint8))
    return root


def test_a_served_model_applies_the_colour_of_its_input_spec(saved_by_colour):
    """Oracle: with colour=greyscale a colour image and its greyscale version (dtl.data.colour,
    the training path's own function) are the same input; with raw they are not."""
    import json

    from dtl.data.colour import apply

    imgs = [_colourful(0), apply(_colourful(0), "greyscale"), _colourful(1), apply(_colourful(1), "greyscale")]
    rows = [_b64(_png(Image.fromarray(im))) for im in imgs]
    assert json.loads((saved_by_colour / "greyscale" / "dtl" / "spec.json").read_text())["input"]["colour"] == "greyscale"
    grey = _probs(mlflow.pyfunc.load_model(str(saved_by_colour / "greyscale")), rows)
    np.testing.assert_allclose(grey[0], grey[1], atol=1e-6)
    np.testing.assert_allclose(grey[2], grey[3], atol=1e-6)
    raw = _probs(mlflow.pyfunc.load_model(str(saved_by_colour / "raw")), rows)
    assert np.abs(raw[0] - raw[1]).max() > 1e-4 and np.abs(raw[2] - raw[3]).max() > 1e-4
    assert not np.allclose(raw, grey, atol=1e-4)


@pytest.mark.slow
def test_a_logged_model_carries_the_colour_of_its_checkpoint(tmp_path):
    """The checkpoint's input spec (written by run_phase) travels into the logged model: its
    spec.json and the classifier mlflow.pyfunc loads from the store."""
    import json

    import torch

    from dtl.data.colour import apply

    with module_workspace(tmp_path) as tmp:
        t = connect(f"sqlite:///{tmp}/mlflow.db", "colour")
        torch.manual_seed(0)
        net = DTLNet(ModelSpec("test_resnet", CLASSES))
        ispec = replace(resolve_input_spec("test_resnet", 64), colour="greyscale")
        ckpt = save_checkpoint(tmp / "best.pt", net, {"phase": "phase2", "init": "scratch", "data_digest": "x",
                                                      "input": ispec.to_dict()})
        run = start_run(t, "colour-model", {"dtl.role": "study"})
        uri = log_model(run, ckpt)
        run.end()
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{model_artifacts(t.client, uri)}/dtl",
                                                          dst_path=str(tmp / "dl")))
        assert json.loads((folder / "spec.json").read_text())["input"]["colour"] == "greyscale"
        model = mlflow.pyfunc.load_model(uri)
        p = _probs(model, [_colourful(0), apply(_colourful(0), "greyscale")])
        np.testing.assert_allclose(p[0], p[1], atol=1e-6)
