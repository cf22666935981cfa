from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dtl import DTLError
from dtl.config import AugmentConfig, DataConfig
from dtl.data import demo
from dtl.data.cache import split_array
from dtl.data.datasets import load_dataset, parse_cnmc_name
from dtl.data.splits import patient_overlap, patient_split, stratified_split
from dtl.data.transforms import InputSpec, eval_transform, hsv_segment, train_transform


@pytest.mark.parametrize("name, expected", [
    ("UID_14_26_2_all.bmp", {"patient": "14", "image": 26, "cell": 2, "label": "all"}),
    ("UID_H12_4_3_hem.bmp", {"patient": "H12", "image": 4, "cell": 3, "label": "hem"}),
    ("UID_h3_10_1_hem.bmp", {"patient": "H3", "image": 10, "cell": 1, "label": "hem"}),
    ("UID_14_26_all.bmp", None),
    ("1.bmp", None),
    ("UID_14_26_2_blast.bmp", None),
])
def test_cnmc_name_parser(name, expected):
    assert parse_cnmc_name(name) == expected


def test_patient_split_is_disjoint_stratified_and_seeded():
    rng = np.random.default_rng(0)
    rows = []
    for p in range(40):
        label = "all" if p < 26 else "hem"
        rows += [{"patient": f"{'H' if label == 'hem' else ''}{p}", "label": label}] * int(rng.integers(5, 40))
    df = pd.DataFrame(rows)
    s1 = patient_split(df, 0.2, seed=1)
    assert patient_split(df, 0.2, seed=1).equals(s1)
    df["split"] = s1
    assert patient_overlap(df) == 0
    for label in ("all", "hem"):
        share = (df[df.label == label].split == "val").mean()
        assert 0.1 < share < 0.35


def test_stratified_split_keeps_classes():
    labels = pd.Series(["a"] * 50 + ["b"] * 30)
    s = stratified_split(labels, 0.2, 0.2, seed=0)
    assert (s[labels == "a"] == "test").sum() == 10 and (s[labels == "b"] == "val").sum() == 6


def test_demo_cnmc_uses_the_real_adapter(cache_dir):
    ds = load_dataset(DataConfig(kind="demo-cnmc", val_fraction=0.25), cache_dir)
    a = ds.audit()
    assert ds.protocol == "patient-level" and a["patient_overlap"] == 0
    assert a["missing_listed"] == 6  # listed in the label CSV, not on disk
    assert set(a["splits"]) == {"train", "val", "test"} and a["splits"]["test"] == 42
    assert ds.split("test")["patient"].str.len().min() > 0  # recovered from the original names
    assert ds.classes == ["all", "hem"]


def test_demo_aria_removes_duplicates_before_splitting(cache_dir):
    ds = load_dataset(DataConfig(kind="demo-aria"), cache_dir)
    assert ds.duplicates_removed == 2 and ds.protocol == "image-level"
    assert ds.manifest["sha256"].is_unique
    assert ds.classes == ["Benign", "Early", "Pre", "Pro"]
    seg = load_dataset(DataConfig(kind="demo-aria", variant="segmented"), cache_dir)
    assert seg.digest != ds.digest and seg.root.name == "Segmented"


def _folder(tmp: Path, classes=("a", "b"), n=6) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (tmp / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp / c / f"{c}{i}.png")
    return tmp


def test_corrupt_image_stops_before_training_and_skip_bad_skips(tmp_path):
    root = _folder(tmp_path / "set")
    (root / "a" / "broken.png").write_bytes((root / "a" / "a0.png").read_bytes()[:60])
    with pytest.raises(DTLError, match=r"(?s)1 unreadable .*a/broken.png.*--skip-bad"):
        load_dataset(DataConfig(kind="imagefolder", root=str(root)), tmp_path / "cache")
    ds = load_dataset(DataConfig(kind="imagefolder", root=str(root), skip_bad=True), tmp_path / "cache")
    assert ds.unreadable == ["a/broken.png"] and len(ds.manifest) == 12


def test_empty_class_folder_and_unknown_layout(tmp_path):
    root = _folder(tmp_path / "set")
    (root / "c").mkdir()
    with pytest.raises(DTLError, match=r"(?s)class folder .*c is empty.*class-per-folder"):
        load_dataset(DataConfig(kind="imagefolder", root=str(root)), tmp_path / "cache")
    with pytest.raises(DTLError, match=r"(?s)not an Aria ALL root.*Original/\{Benign"):
        load_dataset(DataConfig(kind="aria", root=str(tmp_path)), tmp_path / "cache")
    with pytest.raises(DTLError, match=r"(?s)no training_data/ folder.*fold_\{0,1,2\}"):
        load_dataset(DataConfig(kind="cnmc", root=str(tmp_path)), tmp_path / "cache")
    with pytest.raises(DTLError, match="does not exist"):
        load_dataset(DataConfig(kind="imagefolder", root=str(tmp_path / "nope")), tmp_path / "cache")


def test_classes_in_config_but_not_in_data_and_the_reverse(tmp_path):
    root = _folder(tmp_path / "set")
    with pytest.raises(DTLError, match=r"names class\(es\) \['c'\] that the data"):
        load_dataset(DataConfig(kind="imagefolder", root=str(root), classes=("a", "b", "c")), tmp_path / "cache")
    with pytest.raises(DTLError, match=r"has class\(es\) \['b'\] that the config does not name"):
        load_dataset(DataConfig(kind="imagefolder", root=str(root), classes=("a",)), tmp_path / "cache")


def test_label_file_naming_unknown_files_is_an_error(tmp_path, cache_dir):
    import shutil

    src = demo.make_cnmc(cache_dir)
    root = tmp_path / "cnmc"
    shutil.copytree(src, root)
    Image.new("RGB", (8, 8)).save(root / "validation_data" / "C-NMC_test_prelim_phase_data" / "999.bmp")
    with pytest.raises(DTLError, match=r"does not label: \['999.bmp'\]"):
        load_dataset(DataConfig(kind="cnmc", root=str(root)), tmp_path / "cache")
    (root / "validation_data" / "C-NMC_test_prelim_phase_data" / "999.bmp").unlink()
    csv = root / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv"
    csv.write_text(csv.read_text() + "notes.txt,readme.md,1\n")
    with pytest.raises(DTLError, match=r"names 1 file\(s\) that are not C-NMC test images.*readme.md"):
        load_dataset(DataConfig(kind="cnmc", root=str(root)), tmp_path / "cache")


def test_presplit_folders_are_used_as_given(tmp_path):
    tr, va = _folder(tmp_path / "train"), _folder(tmp_path / "val", n=3)
    import shutil

    shutil.copy(tr / "a" / "a0.png", va / "a" / "copy.png")  # a leak the audit must report
    ds = load_dataset(DataConfig(kind="presplit", train_dir=str(tr), val_dir=str(va)), tmp_path / "cache")
    assert ds.protocol == "given" and ds.audit()["splits"] == {"train": 12, "val": 7}
    assert any(d == 0 for _, _, d in ds.near_duplicates)


def test_augmentation_shapes_range_and_determinism():
    spec = InputSpec(48, 56, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = torch.randint(0, 255, (5, 56, 56, 3), dtype=torch.uint8)
    a = train_transform(x, spec, AugmentConfig(hue=0.05), torch.Generator().manual_seed(0))
    b = train_transform(x, spec, AugmentConfig(hue=0.05), torch.Generator().manual_seed(0))
    assert a.shape == (5, 3, 48, 48) and torch.equal(a, b)
    assert a.min() >= -1.0001 and a.max() <= 1.0001
    e = eval_transform(x, spec)
    assert e.shape == (5, 3, 48, 48)
    # no augmentation at all = the centre crop
    ident = AugmentConfig(rotation=0, hflip=0, vflip=0, scale_min=1.0, ratio=0, brightness=0, contrast=0, saturation=0)
    spec2 = InputSpec(56, 56, (0.0,) * 3, (1.0,) * 3)
    out = train_transform(x, spec2, ident, torch.Generator().manual_seed(0))
    assert torch.allclose(out, eval_transform(x, spec2), atol=1e-4)


def test_hsv_segmentation_blanks_background():
    img = np.full((10, 10, 3), 240, np.uint8)
    img[3:6, 3:6] = (90, 40, 140)
    seg = hsv_segment(img)
    assert (seg[0, 0] == 0).all() and (seg[4, 4] == img[4, 4]).all()


def test_cache_is_built_once_and_never_half_written(tmp_path, cache_dir, monkeypatch):
    ds = load_dataset(DataConfig(kind="demo-aria"), cache_dir)
    spec = InputSpec(32, 36, (0.5,) * 3, (0.5,) * 3)
    import dtl.data.cache as cache

    calls = {"n": 0}
    real = cache.decode

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(cache, "decode", failing)
    with pytest.raises(DTLError, match="No space left"):
        split_array(ds, "val", spec, False, tmp_path)
    assert not list((tmp_path / "arrays").glob("*"))  # neither the final nor the temporary file
    monkeypatch.setattr(cache, "decode", real)
    arr = split_array(ds, "val", spec, False, tmp_path)
    assert arr.shape == (len(ds.split("val")), 36, 36, 3) and arr.dtype == np.uint8
    assert isinstance(split_array(ds, "val", spec, False, tmp_path), np.memmap)
