"""What a user meets when comparing: the seed's own pre-split folder layout, and the report page."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dtl import DTLError
from dtl.cli import build_parser, load_config, main
from tests.conftest import require_real_data

pytestmark = pytest.mark.realdata


def _presplit(root: Path, per_class: int = 9, splits=("train", "val", "test")) -> Path:
    """The seed's users' layout: ds2/{train,val,test}/<class>/, built from real Aria images (links)."""
    src = require_real_data() / "aria-all-pbs-2021" / "Original"
    for c in ("Benign", "Early", "Pre", "Pro"):
        for i, f in enumerate(sorted((src / c).glob("*.jpg"))[:per_class]):
            d = root / splits[i % len(splits)] / c
            d.mkdir(parents=True, exist_ok=True)
            os.symlink(f, d / f.name)
    return root


def test_a_root_holding_train_val_test_is_presplit_for_dtl_data(tmp_path, capsys):
    root = _presplit(tmp_path / "ds2")
    assert main(["data", "audit", str(root), "--kind", "presplit", "--json", "--no-probe", "--cache-dir", str(tmp_path / "c")]) == 0
    a = json.loads(capsys.readouterr().out)
    assert a["splits"] == {"test": 12, "train": 12, "val": 12} and a["protocol"] == "given"
    assert a["near_duplicates"] >= 1  # consecutive Aria fields: the audit reports pairs across the user's splits
    # the split folders given one by one, without -o phase2.data.kind=presplit
    assert main(["data", "audit", str(tmp_path), "--kind", "presplit", "--json", "--no-probe", "--cache-dir", str(tmp_path / "c"),
                 "-o", f"phase2.data.train_dir={root / 'train'}", "-o", f"phase2.data.val_dir={root / 'val'}"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"] == {"train": 12, "val": 12}


def test_a_presplit_root_is_found_by_phase2_root_and_errors_name_the_missing_folder(tmp_path, capsys):
    root = _presplit(tmp_path / "ds2")
    cfg = load_config(build_parser().parse_args(["main", "--phase2-root", str(root)]))
    assert cfg.phase2.data.kind == "presplit" and cfg.phase2.data.root == str(root)
    aria = load_config(build_parser().parse_args(["main", "--phase2-root", str(tmp_path)]))
    assert aria.phase2.data.kind == "aria"  # no train/ + val/: the phase's default kind
    no_val = _presplit(tmp_path / "only", splits=("train", "test"))
    assert main(["data", "audit", str(no_val), "--kind", "presplit", "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "has no val/ folder (found: train/, test/)" in err and "val/<class>/<image>" in err
    # --kind presplit with one split folder given: the error names the other folder, not the kind it already has
    assert main(["data", "audit", str(tmp_path), "--kind", "presplit", "--cache-dir", str(tmp_path / "c"),
                 "-o", f"phase2.data.train_dir={root / 'train'}"]) == 2
    err = capsys.readouterr().err
    assert "presplit data needs data.val_dir (data.train_dir is given);" in err and "kind=presplit" not in err
    with pytest.raises(DTLError, match=r"phase2\.data\.train_dir is set but phase2\.data\.kind is 'aria'.*kind=presplit"):
        load_config(build_parser().parse_args(["main", "--config", "real", "-o", f"phase2.data.train_dir={root}"]))


@pytest.mark.slow
def test_the_audit_of_a_120_image_presplit_aria_copy_reports_the_pairs_across_the_users_splits(tmp_path, capsys):
    """Issue 27 §9: `dtl data audit ds2 --kind presplit` on the seed users' layout, 30 Aria images per
    class dealt to train/val/test in file order: consecutive fields photographed twice land in two
    of the user's splits, and the audit lists each such pair with the two splits it spans."""
    root = _presplit(tmp_path / "ds2", per_class=30)
    assert main(["data", "audit", str(root), "--kind", "presplit", "--json", "--cache-dir", str(tmp_path / "c")]) == 0
    a = json.loads(capsys.readouterr().out)
    assert a["n_images"] == 120 and a["splits"] == {"test": 40, "train": 40, "val": 40}
    pairs = a["near_duplicate_pairs"]
    assert a["near_duplicates"] == len(pairs) == 12  # measured on this layout (issue 27 said 2 for its copy)
    assert all(sa != sb and {sa, sb} <= {"train", "val", "test"} for _, _, sa, sb, *_ in pairs)
