"""Exact, hand-computed cases for the seeded splitters of :mod:`dtl.data.splits`.

The statistical properties (disjoint, stratified, seeded) are in ``test_data.py`` and
``test_reproducible.py``; here each case is built so that the answer does not depend on the seeded
visiting order (every patient or group of a class has the same size), so it can be worked out by hand.
"""

import numpy as np
import pandas as pd
import pytest

from dtl.data.splits import cv_folds, fold_split, group_split, patient_overlap, patient_split, resampling_units


def _patients(sizes: dict[str, list[int]]) -> pd.DataFrame:
    """Rows of patients ``{label: [images of patient 0, of patient 1, ...]}``, patient ids ``<label><i>``."""
    rows = [{"patient": f"{label}{i}", "label": label}
            for label, per in sizes.items() for i, n in enumerate(per) for _ in range(n)]
    return pd.DataFrame(rows)


def _val_patients(df: pd.DataFrame, split: pd.Series, name: str = "val") -> dict[str, int]:
    return {label: df.loc[(split == name) & (df["label"] == label), "patient"].nunique()
            for label in sorted(df["label"].unique())}


# ---------------------------------------------------------------------------- patient_split


def test_patient_split_with_fraction_zero_puts_everyone_in_the_rest_as_an_object_column():
    df = _patients({"all": [3, 2, 4], "hem": [1, 5]})
    split = patient_split(df, 0.0, seed=0)
    # object dtype, like cnmc_split's and group_split's columns (a str-dtype Series never .equals an object one)
    pd.testing.assert_series_equal(split, pd.Series("train", index=df.index, dtype=object))
    assert patient_split(df, 0.0, seed=0, rest="pool").eq("pool").all()


def test_patient_split_takes_a_patient_only_when_it_gets_strictly_closer_to_the_target():
    # 4 patients of 2 images per class. fraction 0.5 -> target 4 images: 2 patients (2 -> 4 reaches it).
    df = _patients({"all": [2, 2, 2, 2], "hem": [2, 2, 2, 2]})
    for seed in range(3):
        assert _val_patients(df, patient_split(df, 0.5, seed)) == {"all": 2, "hem": 2}
    # fraction 0.375 -> target 3: the first patient (2) is taken; a second (4) would be as far (1) as
    # stopping at 2, and a tie does not take it.
    for seed in range(3):
        assert _val_patients(df, patient_split(df, 0.375, seed)) == {"all": 1, "hem": 1}


def test_patient_split_takes_the_first_patient_even_when_the_target_is_tiny():
    df = _patients({"all": [3, 3, 3], "hem": [4, 4]})
    split = patient_split(df, 0.01, seed=5, name="test", rest="trainval")
    assert _val_patients(df, split, "test") == {"all": 1, "hem": 1}
    assert set(split) == {"test", "trainval"}
    assert (split == "test").sum() == 3 + 4


@pytest.mark.parametrize("fraction", [0.9, 1.0, 2.0])
def test_patient_split_always_leaves_one_patient_of_each_class_in_the_rest(fraction):
    df = _patients({"all": [2, 2, 2], "hem": [5, 5, 5, 5]})
    split = patient_split(df, fraction, seed=1)
    assert _val_patients(df, split) == {"all": 2, "hem": 3}
    assert _val_patients(df, split, "train") == {"all": 1, "hem": 1}
    assert (split[df["label"] == "all"] == "val").sum() == 4 and (split[df["label"] == "hem"] == "val").sum() == 15


def test_patient_split_stratifies_each_class_on_its_own_images():
    # "big": 4 patients of 5 images (20), "small": 5 patients of 1 image (5), "mid": 3 of 2 (6).
    # fraction 0.2: one patient of "big" (5 of 20), one of "small" (1 of 5) and one of "mid" (the
    # first is always taken: 2 images for a target of 1.2); whole patients only.
    df = _patients({"big": [5, 5, 5, 5], "small": [1, 1, 1, 1, 1], "mid": [2, 2, 2]})
    split = patient_split(df, 0.2, seed=3)
    assert _val_patients(df, split) == {"big": 1, "mid": 1, "small": 1}
    assert (split == "val").sum() == 5 + 1 + 2
    assert (split.groupby(df["patient"]).nunique() == 1).all()


# ---------------------------------------------------------------------------- group_split


def test_group_split_leaves_unassigned_groups_in_train():
    labels = pd.Series(["a"] * 10)
    groups = pd.Series([f"g{i}" for i in range(10)])
    s = group_split(labels, groups, 0.2, 0.1, seed=0)
    assert s.dtype == object
    assert s.value_counts().to_dict() == {"train": 7, "val": 2, "test": 1}
    assert group_split(labels, groups, 0.0, 0.0, seed=0).eq("train").all()


def test_group_split_stratifies_three_classes_separately():
    # 3 classes of 10 single-image groups: each gets exactly 2 test and 2 val groups of its own
    labels = pd.Series([c for c in "abc" for _ in range(10)])
    groups = pd.Series([f"{c}{i}" for c in "abc" for i in range(10)])
    for seed in range(3):
        s = group_split(labels, groups, 0.2, 0.2, seed)
        counts = pd.crosstab(labels, s)
        assert counts.to_dict("index") == {c: {"test": 2, "train": 6, "val": 2} for c in "abc"}


def test_group_split_takes_a_group_only_when_it_gets_strictly_closer_to_the_target():
    # 5 groups of 2 images (10): test_fraction 0.1 -> target 1 image; a group of 2 would be as far
    # from it (1) as taking nothing, so nothing is taken. Groups of 1 image: target 1 takes exactly one.
    pairs = pd.Series([f"g{i // 2}" for i in range(10)])
    s = group_split(pd.Series(["a"] * 10), pairs, 0.0, 0.1, seed=0)
    assert s.eq("train").all()
    singles = pd.Series([f"g{i}" for i in range(10)])
    s = group_split(pd.Series(["a"] * 10), singles, 0.0, 0.1, seed=0)
    assert (s == "test").sum() == 1
    s = group_split(pd.Series(["a"] * 10), singles, 0.06, 0.0, seed=0)  # target 0.6: one image is closer
    assert (s == "val").sum() == 1


def test_group_split_always_leaves_the_last_group_of_a_class_for_training():
    labels = pd.Series(["a"] * 3 + ["b"] * 4)
    groups = pd.Series(["a0", "a1", "a2", "b0", "b1", "b2", "b3"])
    s = group_split(labels, groups, 0.0, 0.9, seed=0)  # targets 2.7 and 3.6: take all but one
    assert pd.crosstab(labels, s).to_dict("index") == {"a": {"test": 2, "train": 1}, "b": {"test": 3, "train": 1}}
    s = group_split(labels, groups, 0.0, 1.0, seed=4)
    assert (s[labels == "a"] == "train").sum() == 1 and (s[labels == "b"] == "train").sum() == 1


def test_a_tied_group_counts_under_the_first_label_in_sorted_order():
    # "mix" holds one b then one a: it counts under a (sorted order, not the order seen), so it is
    # class a's only group and its last, which always stays in train; b's two groups split 1 test, 1 train
    labels = pd.Series(["b", "a", "b", "b"])
    groups = pd.Series(["mix", "mix", "b0", "b1"])
    for seed in range(10):
        s = group_split(labels, groups, 0.0, 0.9, seed)
        assert (s[groups == "mix"] == "train").all(), seed
        assert sorted(s[groups != "mix"]) == ["test", "train"], seed


def test_group_split_of_no_item_is_empty():
    s = group_split(pd.Series([], dtype=object), pd.Series([], dtype=object), 0.2, 0.1, seed=0)
    assert len(s) == 0 and s.dtype == object


# ---------------------------------------------------------------------------- resampling_units


def test_resampling_units_are_patients_when_every_row_has_one():
    t = pd.DataFrame({"patient": ["p1", "p1", "p2"], "group": ["g1", "g2", "g3"]})
    kind, units = resampling_units(t)
    assert kind == "patient" and units.tolist() == ["p1", "p1", "p2"]


def test_resampling_units_fall_back_to_groups_then_images():
    t = pd.DataFrame({"patient": ["p1", "", "p2"], "group": ["g1", "g1", 7]})
    kind, units = resampling_units(t)
    assert kind == "group" and units.tolist() == ["g1", "g1", "7"]
    assert resampling_units(t.assign(group=["g1", "", "g2"])) == ("image", None)  # a blank group
    assert resampling_units(t.drop(columns="group")) == ("image", None)  # no group column
    assert resampling_units(pd.DataFrame({"patient": [], "group": []})) == ("image", None)
    assert resampling_units(pd.DataFrame({"patient": []})) == ("image", None)


# ---------------------------------------------------------------------------- cv_folds / fold_split


def test_cv_folds_allow_k_from_two_to_the_number_of_units():
    labels = ["a"] * 10
    units = ["u1", "u1", "u2", "u2", "u3", "u3", "u4", "u4", "u5", "u6"]
    two = cv_folds(labels, units, 2, seed=0)
    assert np.issubdtype(two.dtype, np.integer) and set(two.tolist()) == {0, 1}
    every = cv_folds(labels, units, 6, seed=0)  # one unit per fold
    assert np.issubdtype(every.dtype, np.integer)
    assert sorted(pd.Series(every).groupby(units).first().tolist()) == list(range(6))
    assert (pd.Series(every).groupby(units).nunique() == 1).all()


@pytest.mark.parametrize("k", [1, 0, 7])
def test_cv_folds_refuse_k_outside_two_to_the_number_of_units(k):
    units = ["u1", "u1", "u2", "u3", "u4", "u5", "u6"]
    with pytest.raises(ValueError) as e:
        cv_folds(["a"] * 7, units, k, seed=0)
    assert str(e.value) == f"cross-validation needs 2 <= k <= the number of units (6), got k={k}"


def test_cv_folds_without_units_make_each_image_its_own_unit():
    folds = cv_folds(["a"] * 5, None, 5, seed=0)
    assert sorted(folds.tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"the number of units \(5\), got k=6"):
        cv_folds(["a"] * 5, None, 6, seed=0)


def test_cv_folds_do_not_depend_on_whether_labels_and_units_are_numbers_or_strings():
    # a manifest column read as integers must give the folds of the same column read as text
    labels = [2, 10, 2, 10, 2, 10, 10, 2, 2, 10, 10, 2, 10, 2, 2]
    units = [3, 12, 3, 1, 20, 12, 9, 100, 7, 1, 5, 8, 40, 7, 11]
    as_text = cv_folds([str(v) for v in labels], [str(v) for v in units], 3, seed=0)
    for seed_labels, seed_units in ((labels, units), (labels, [str(v) for v in units]),
                                    ([str(v) for v in labels], units)):
        assert (cv_folds(seed_labels, seed_units, 3, seed=0) == as_text).all()
    assert (cv_folds(np.array(labels), None, 3, seed=0)
            == cv_folds([str(v) for v in labels], [str(i) for i in range(15)], 3, seed=0)).all()


def test_cv_folds_treat_numeric_labels_as_classes_not_as_a_continuous_target():
    # grades such as 0.5 / 1.5 are two classes: the folds of their text, not scikit-learn's refusal
    grades = [0.5, 1.5] * 6
    units = [f"u{i}" for i in range(12)]
    folds = cv_folds(grades, units, 3, seed=0)
    assert (folds == cv_folds([str(v) for v in grades], units, 3, seed=0)).all()
    assert [np.bincount(folds[np.array(grades) == g], minlength=3).tolist() for g in (0.5, 1.5)] == [[2, 2, 2]] * 2


def test_fold_split_names_the_splits_train_val_and_test():
    labels = ["a", "b"] * 6
    units = [f"u{i}" for i in range(12)]
    ids = cv_folds(labels, units, 3, seed=0)
    split = fold_split(labels, units, 3, 2, seed=0)
    assert split.dtype == object
    assert split.tolist() == [{2: "test", 0: "val", 1: "train"}[f] for f in ids.tolist()]


# ---------------------------------------------------------------------------- patient_overlap


def test_patient_overlap_counts_patients_in_two_or_more_splits_and_ignores_blank_ids():
    df = pd.DataFrame({"patient": ["p1", "p1", "p2", "p2", "p2", "p3", "", ""],
                       "split": ["train", "val", "train", "val", "test", "test", "train", "val"]})
    assert patient_overlap(df) == 2  # p1 (two splits) and p2 (three); p3 once; blank ids are no patient
    assert patient_overlap(df[df["patient"] != "p2"]) == 1
    assert patient_overlap(df[df["patient"].isin(["p3", ""])]) == 0
    assert patient_overlap(df[df["patient"] == ""]) == 0  # no patient IDs at all
