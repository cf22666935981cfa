"""The adapters on the real datasets in ../shared/datasets (skipped with a reason when absent;
CI sets DTL_REQUIRE_REAL_DATA=1, which turns the skip into a failure)."""

import pandas as pd
import pytest

from dtl.config import DataConfig
from dtl.data.datasets import load_dataset, parse_cnmc_name
from dtl.data.splits import patient_split
from tests.conftest import require_real_data

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def shared():
    return require_real_data()


def test_aria_has_exactly_40_duplicate_pairs_and_none_crosses_a_split(shared, cache_dir):
    for variant in ("original", "segmented"):
        ds = load_dataset(DataConfig(kind="aria", root=str(shared / "aria-all-pbs-2021"), variant=variant), cache_dir)
        assert ds.duplicates_removed == 40
        assert all("/Pro/" in f"/{a}" and "/Pro/" in f"/{b}" for a, b in ds.duplicate_pairs)
        assert len(ds.manifest) == 3256 - 40 and ds.manifest["sha256"].is_unique
        a = ds.audit()
        assert a["classes"] == {"Benign": 504, "Early": 985, "Pre": 963, "Pro": 764}
        assert a["protocol"] == "image-level" and a["n_patients"]["test"] is None
        assert a["sizes"] == {"224x224": 3216}
    # the shared manifest's own duplicate list agrees with ours
    man = pd.read_csv(shared / "manifests" / "aria-all-pbs-2021.csv")
    assert man[man.variant == "Segmented"]["duplicate_of"].notna().sum() == 40


def test_aria_accepts_a_variant_folder_as_root(shared, cache_dir):
    ds = load_dataset(DataConfig(kind="aria", root=str(shared / "aria-all-pbs-2021" / "Original")), cache_dir)
    assert ds.root.name == "Original" and ds.duplicates_removed == 40


def test_cnmc_subset_is_patient_disjoint_with_prelim_labels(shared, cache_dir):
    ds = load_dataset(DataConfig(kind="cnmc", root=str(shared / "c-nmc-2019-subset"), val_fraction=0.3), cache_dir)
    a = ds.audit()
    assert a["patient_overlap"] == 0
    assert a["splits"]["test"] == 10 and a["missing_listed"] == 1857
    assert a["splits"]["train"] + a["splits"]["val"] == 60
    test = ds.split("test")
    assert (test["patient"] != "").all()
    assert a["n_patients"]["train"] > 0 and a["n_patients"]["val"] > 0
    byfold = load_dataset(DataConfig(kind="cnmc", root=str(shared / "c-nmc-2019-subset"), val_fold=2), cache_dir)
    val = byfold.split("val")
    assert len(val) == 20 and val["path"].str.contains("fold_2").all()


def test_full_cnmc_manifest_splits_patient_disjoint_keeping_the_class_ratio(shared):
    man = pd.read_csv(shared / "manifests" / "c-nmc-2019-full-no-pixels.csv", dtype=str)
    train = man[man["split"] == "train"].copy()
    parsed = [parse_cnmc_name(f) for f in train["filename"]]
    assert all(parsed), "every training file name parses"
    train["patient"] = [p["patient"] for p in parsed]
    train["label"] = [p["label"] for p in parsed]
    assert (train["label"] == train["label"]).all() and train["patient"].nunique() == 73
    assert sum(f.startswith("UID_h") for f in train["filename"]) == 36
    for seed in (0, 1, 2):
        s = patient_split(train.reset_index(drop=True), 0.2, seed)
        t = train.reset_index(drop=True).assign(split=s)
        assert not set(t[t.split == "train"].patient) & set(t[t.split == "val"].patient)
        ratio_all = (t.label == "all").mean()
        ratio_val = (t[t.split == "val"].label == "all").mean()
        assert abs(ratio_val - ratio_all) < 0.05
        assert 0.15 < (t.split == "val").mean() < 0.3


def test_pbc_subset_as_a_class_per_folder_phase1_source(shared, cache_dir):
    ds = load_dataset(DataConfig(kind="imagefolder", root=str(shared / "pbc-acevedo-2020-subset")), cache_dir)
    assert len(ds.classes) == 8 and ds.duplicates_removed == 3
