"""Rotated and mirrored copies (issue 23 §3) on real Aria images: a pre-augmented set saves each
image several times, turned by a multiple of 90° or mirrored, and the grouping must keep all of
them together (skipped when ../shared/datasets is absent; DTL_REQUIRE_REAL_DATA=1 fails instead)."""

import shutil

import numpy as np
import pytest
from PIL import Image

from dtl.config import DataConfig
from dtl.data.datasets import load_dataset
from tests.conftest import require_real_data

pytestmark = pytest.mark.realdata

# each source's copies: name -> (how it is made from the source, the name the audit must give it)
COPIES = {
    "1-rot90": (lambda a: np.rot90(a, 1), "rotated 90°"),
    "2-rot180": (lambda a: np.rot90(a, 2), "rotated 180°"),
    "3-rot270": (lambda a: np.rot90(a, 3), "rotated 270°"),
    "4-mirror": (lambda a: a[:, ::-1], "mirrored"),
    "5-rot90-mirror": (lambda a: np.rot90(a, 1)[:, ::-1], "rotated 90°, mirrored"),
    "6-shifted": (lambda a: a, ""),
}


def _shifted(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``a`` moved by (dy, dx) pixels, the edge filled by reflection."""
    p = np.pad(a, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    return p[4 + dy:4 + dy + a.shape[0], 4 + dx:4 + dx + a.shape[1]]


def _augmented_set(shared, root, n_sources=30, n_others=270):
    """``n_sources`` Aria Original images, each with the :data:`COPIES` (shifted 1-3 pixels and
    re-encoded as JPEG), among ``n_others`` untouched Aria images (so that copies are a small share
    of random pairs, as in a real set)."""
    files = sorted((shared / "aria-all-pbs-2021" / "Original").glob("*/*.jpg"))
    sources = files[::len(files) // n_sources][:n_sources]
    rest = [f for f in files if f not in set(sources)]
    rng = np.random.default_rng(0)
    for f in sources:
        (root / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / f.parent.name / f"{f.stem}-0-orig.jpg")
        a = np.asarray(Image.open(f).convert("RGB"))
        for suffix, (make, _) in COPIES.items():
            dy, dx = rng.integers(1, 4, 2) * rng.choice([-1, 1], 2)
            copy = np.ascontiguousarray(make(_shifted(a, int(dy), int(dx))))
            Image.fromarray(copy).save(root / f.parent.name / f"{f.stem}-{suffix}.jpg", quality=90)
    for f in rest[::len(rest) // n_others][:n_others]:
        (root / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / f.parent.name / f.name)
    return [f"{f.parent.name}/{f.stem}" for f in sources]


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    root = tmp_path_factory.mktemp("augmented")
    return root, _augmented_set(require_real_data(), root)


def test_turned_and_mirrored_copies_of_a_source_share_one_group_and_one_split(augmented, cache_dir):
    root, sources = augmented
    ds = load_dataset(DataConfig(kind="imagefolder", root=str(root)), cache_dir)
    m = ds.manifest.set_index("path")
    for source in sources:
        copies = m.loc[[f"{source}-0-orig.jpg"] + [f"{source}-{s}.jpg" for s in COPIES]]
        assert copies["group"].nunique() == 1, copies[["group", "split"]]
        assert copies["split"].nunique() == 1
    a = ds.audit()
    assert a["near_duplicates"] == 0
    turned = a["near_duplicates_linked_turned"]
    assert set(turned) >= {"rotated 90°", "rotated 180°", "rotated 270°", "mirrored"}
    assert sum(turned.values()) >= 4 * len(sources)


def test_the_pair_list_names_how_each_copy_was_turned(augmented, cache_dir, capsys):
    from dtl.cli import main

    root, sources = augmented
    ds = load_dataset(DataConfig(kind="imagefolder", root=str(root), protocol="image-level"), cache_dir)
    named = 0
    for first, second, _, _, _ncc, _, transform in ds.near_duplicates:  # (a, b, splits, ncc, bits, transform)
        if first.endswith("-0-orig.jpg") and second.startswith(first[:-len("0-orig.jpg")]):
            assert transform == COPIES[second[len(first) - len("0-orig.jpg"):-len(".jpg")]][1], (first, second)
            named += bool(transform)
    assert named >= 20  # of 150 (orig, turned copy) pairs, about a third cross splits
    assert main(["data", "audit", str(root), "--kind", "imagefolder", "--protocol", "image-level",
                 "--cache-dir", str(cache_dir), "--no-probe"]) == 0
    text = capsys.readouterr().out
    assert "-0-orig.jpg" in text and ", rotated 90°" in text and "of them turned or mirrored: " in text
