"""Dataset adapters: C-NMC 2019, Aria ALL, any class-per-folder set, pre-split folders, demo.

Each adapter reads a dataset exactly as downloaded and returns a :class:`Dataset`: one
manifest table (path relative to the root, label, patient, split, sha256, width, height),
the split protocol, and what the audit found (duplicates removed, listed-but-missing files,
unreadable files, near-duplicate pairs across splits).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from dtl import DTLError
from dtl.config import DataConfig, split_protocol
from dtl.data import demo, kinds
from dtl.data.groups import PARAMS as GROUP_PARAMS
from dtl.data.groups import assign_groups, cluster_sizes, cross_split_pairs, similar_pairs, thumbnail, turned_counts
from dtl.data.splits import fold_split, group_split, patient_overlap, patient_split, resampling_units

IMAGE_EXTS = {".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff"}
ARIA_CLASSES = ("Benign", "Early", "Pre", "Pro")
CNMC_NAME = re.compile(r"^UID_(?P<h>[Hh]?)(?P<patient>\d+)_(?P<image>\d+)_(?P<cell>\d+)_(?P<label>all|hem)\.bmp$")
MANIFEST_COLUMNS = ["path", "label", "patient", "group", "split", "sha256", "width", "height"]
SCAN_VERSION = "2"  # bump when _scan_one's columns change, so old scan caches are not reused

CNMC_LAYOUT = """expected C-NMC 2019 layout (as downloaded):
  ROOT/training_data/fold_{0,1,2}/{all,hem}/UID_<patient>_<image>_<cell>_all.bmp | UID_H<patient>_..._hem.bmp
  ROOT/validation_data/C-NMC_test_prelim_phase_data/<n>.bmp   (optional)
  ROOT/validation_data/C-NMC_test_prelim_phase_data_labels.csv (Patient_ID,new_names,labels)
ROOT may also be the C-NMC_Leukemia/ folder above training_data/."""
ARIA_LAYOUT = """expected Aria ALL layout (as downloaded):
  ROOT/Original/{Benign,Early,Pre,Pro}/WBC-*.jpg
  ROOT/Segmented/{Benign,Early,Pre,Pro}/WBC-*.jpg
ROOT may also be one variant folder (holding the class folders)."""
FOLDER_LAYOUT = "expected a class-per-folder layout: ROOT/<class name>/<image>.{jpg,png,bmp,tif}"


@dataclass
class Dataset:
    """A dataset as read from disk, split, with what the audit found."""

    kind: str
    root: Path
    classes: list[str]
    manifest: pd.DataFrame
    protocol: str  # patient-level | near-duplicate-groups | acquisition-blocks:N | image-level | given
    duplicates_removed: int = 0
    duplicate_pairs: list[tuple[str, str]] = field(default_factory=list)
    missing_listed: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    # linked pairs across splits: (a, b, split a, split b, ncc, hash bits, transform: "" or e.g. "rotated 90°")
    near_duplicates: list[tuple] = field(default_factory=list)
    n_linked: int = 0  # near-duplicate pairs found in the whole set
    linked_turned: dict[str, int] = field(default_factory=dict)  # of those, turned/mirrored copies by transform

    @property
    def digest(self) -> str:
        """sha256 of the manifest's identity columns: same files, labels, groups and split -> same digest."""
        cols = ["path", "label", "patient", "group", "split", "sha256"]
        text = self.manifest[cols].to_csv(index=False, lineterminator="\n")
        return hashlib.sha256(text.encode()).hexdigest()

    def split(self, name: str) -> pd.DataFrame:
        return self.manifest[self.manifest["split"] == name].reset_index(drop=True)

    def label_ids(self, name: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return self.split(name)["label"].map(index).to_numpy(np.int64)

    def audit(self) -> dict:
        m = self.manifest
        has_patients = (m["patient"].astype(str) != "").any()
        return {
            "kind": self.kind,
            "root": str(self.root),
            "protocol": self.protocol,
            "digest": self.digest,
            "n_images": int(len(m)),
            "classes": {c: int((m["label"] == c).sum()) for c in self.classes},
            "duplicates_removed": self.duplicates_removed,
            "splits": {s: int(n) for s, n in m["split"].value_counts().sort_index().items()},
            "class_by_split": {s: {c: int(n) for c, n in g["label"].value_counts().sort_index().items()}
                               for s, g in m.groupby("split")},
            "n_patients": {s: (int(g["patient"].nunique()) if has_patients else None)
                           for s, g in m.groupby("split")},
            "patient_overlap": patient_overlap(m),
            "unreadable": self.unreadable,
            "missing_listed": len(self.missing_listed),
            "missing_listed_files": self.missing_listed[:20],
            "near_duplicates": len(self.near_duplicates),
            "near_duplicate_pairs": [list(p) for p in self.near_duplicates[:20]],
            "near_duplicates_linked": self.n_linked,
            "near_duplicates_linked_turned": self.linked_turned,
            "groups": int(m["group"].nunique()),
            "group_sizes": cluster_sizes(m["group"]),
            "sizes": {f"{w}x{h}": int(n) for (w, h), n in m.groupby(["width", "height"]).size().items()},
        }


# ----------------------------------------------------------------------------- file scanning

def _scan_one(path: Path) -> dict:
    data = path.read_bytes()
    row = {"sha256": hashlib.sha256(data).hexdigest(), "width": 0, "height": 0, "phash": "", "thumb": "",
           "ok": True}
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: truncated files fail here, not in the middle of training
            row["width"], row["height"] = im.size
            rgb = im.convert("RGB")
            row["phash"] = str(imagehash.phash(rgb))
            row["thumb"] = thumbnail(np.asarray(rgb))
    except Exception:  # any decoder error means the file is unusable
        row["ok"] = False
    return row


def scan_files(root: Path, rel_paths: list[str], cache_dir: str | Path) -> pd.DataFrame:
    """sha256, size, perceptual hash, similarity thumbnail and readability of each file, cached by
    (name, size, mtime)."""
    stats = []
    for rel in rel_paths:
        st = (root / rel).stat()
        stats.append(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}")
    key = hashlib.sha256((SCAN_VERSION + str(root.resolve()) + "\n" + "\n".join(stats)).encode()).hexdigest()[:32]
    cache = Path(cache_dir) / "scans" / f"{key}.csv"
    if cache.exists():
        return pd.read_csv(cache, dtype={"path": str, "sha256": str, "phash": str, "thumb": str},
                           keep_default_na=False)
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        rows = list(pool.map(lambda r: _scan_one(root / r), rel_paths))
    df = pd.DataFrame(rows)
    df.insert(0, "path", rel_paths)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    df.to_csv(tmp, index=False)
    os.replace(tmp, cache)
    return df


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _class_folders(root: Path, layout: str) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise DTLError(f"data root {root} does not exist or is not a folder.\n{layout}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DTLError(f"{root} holds no class folders.\n{layout}")
    out = {}
    for f in folders:
        files = _images_under(f)
        if not files:
            raise DTLError(f"class folder {f} is empty (no .jpg/.png/.bmp/.tif images).\n{layout}")
        out[f.name] = files
    return out


# ----------------------------------------------------------------------------- C-NMC

def parse_cnmc_name(name: str) -> dict | None:
    """``UID_H12_4_3_hem.bmp`` -> patient ``H12``, image 4, cell 3, label ``hem`` (the H may be
    lower case in the real release; it is normalised to upper case)."""
    m = CNMC_NAME.match(name)
    if not m:
        return None
    patient = ("H" if m["h"] else "") + m["patient"]
    return {"patient": patient, "image": int(m["image"]), "cell": int(m["cell"]), "label": m["label"]}


def cnmc_root(root: Path) -> Path:
    for cand in (root, root / "C-NMC_Leukemia"):
        if (cand / "training_data").is_dir():
            return cand
    raise DTLError(f"no training_data/ folder under {root}.\n{CNMC_LAYOUT}")


def _cnmc_training(root: Path) -> pd.DataFrame:
    rows, bad_names = [], []
    folds = sorted(p for p in (root / "training_data").iterdir() if p.is_dir() and p.name.startswith("fold_"))
    if not folds:
        raise DTLError(f"{root / 'training_data'} holds no fold_N folders.\n{CNMC_LAYOUT}")
    for fold in folds:
        for label in ("all", "hem"):
            folder = fold / label
            files = _images_under(folder) if folder.is_dir() else []
            if not files:
                raise DTLError(f"class folder {folder} is missing or empty.\n{CNMC_LAYOUT}")
            for f in files:
                info = parse_cnmc_name(f.name)
                if info is None or info["label"] != label:
                    bad_names.append(str(f.relative_to(root)))
                    continue
                rows.append({"path": str(f.relative_to(root)), "label": label, "patient": info["patient"],
                             "fold": int(fold.name.split("_")[1])})
    if bad_names:
        raise DTLError(f"{len(bad_names)} C-NMC training file(s) do not match the naming scheme or "
                       f"their folder: {', '.join(bad_names[:20])}\n{CNMC_LAYOUT}")
    return pd.DataFrame(rows)


def _cnmc_prelim(root: Path) -> tuple[pd.DataFrame, list[str]]:
    vdir = root / "validation_data"
    labels_csv = vdir / "C-NMC_test_prelim_phase_data_labels.csv"
    img_dir = vdir / "C-NMC_test_prelim_phase_data"
    if not labels_csv.exists():
        return pd.DataFrame(columns=["path", "label", "patient"]), []
    lab = pd.read_csv(labels_csv, dtype=str)
    need = {"Patient_ID", "new_names", "labels"}
    if not need <= set(lab.columns):
        raise DTLError(f"{labels_csv} must have columns {sorted(need)}, found {list(lab.columns)}.\n{CNMC_LAYOUT}")
    bad = lab[~lab["labels"].isin(["0", "1"])]
    if len(bad):
        raise DTLError(f"{labels_csv}: labels must be 0 (normal) or 1 (ALL); rows with other values: "
                       f"{bad['new_names'].head(5).tolist()}")
    unknown = lab[~lab["new_names"].str.fullmatch(r"\d+\.bmp") | lab["Patient_ID"].map(parse_cnmc_name).isna()]
    if len(unknown):
        raise DTLError(f"{labels_csv} names {len(unknown)} file(s) that are not C-NMC test images "
                       f"(new_names must be <n>.bmp, Patient_ID an original UID_..._all/hem.bmp name): "
                       f"{unknown[['Patient_ID', 'new_names']].head(5).values.tolist()}\n{CNMC_LAYOUT}")
    present = {p.name for p in _images_under(img_dir)} if img_dir.is_dir() else set()
    unlisted = sorted(present - set(lab["new_names"]))
    if unlisted:
        raise DTLError(f"{img_dir} holds images that {labels_csv.name} does not label: {unlisted[:20]}; "
                       f"the label file must list every test image.\n{CNMC_LAYOUT}")
    rows, missing = [], []
    for _, r in lab.iterrows():
        if r["new_names"] not in present:
            missing.append(r["new_names"])
            continue
        info = parse_cnmc_name(r["Patient_ID"])
        rows.append({"path": str((img_dir / r["new_names"]).relative_to(root)),
                     "label": "all" if r["labels"] == "1" else "hem",
                     "patient": info["patient"] if info else ""})
    return pd.DataFrame(rows, columns=["path", "label", "patient"]), missing


def cnmc_split(train: pd.DataFrame, cfg: DataConfig, has_test: bool) -> pd.Series:
    """Patient-disjoint split of the C-NMC training patients: an official fold or a seeded,
    class-stratified share of patients as validation (and as test when there is no test set)."""
    split = pd.Series("train", index=train.index, dtype=object)
    pool = train
    if not has_test:
        split = patient_split(train, cfg.test_fraction, cfg.split_seed + 1, name="test")
        pool = train[split == "train"]
    if cfg.val_fold is not None:
        folds = sorted(train["fold"].unique())
        if cfg.val_fold not in folds:
            raise DTLError(f"val_fold={cfg.val_fold} does not exist; folds present: {folds}")
        split[pool.index[pool["fold"] == cfg.val_fold]] = "val"
    else:
        split[pool.index] = patient_split(pool, cfg.val_fraction, cfg.split_seed)
    return split


def load_cnmc(cfg: DataConfig, cache_dir: str | Path, kind: str = "cnmc") -> Dataset:
    root = cnmc_root(Path(cfg.root))
    train = _cnmc_training(root)
    test, missing = _cnmc_prelim(root)
    train["split"] = cnmc_split(train, cfg, has_test=len(test) > 0)
    test["split"] = "test"
    df = pd.concat([train.drop(columns="fold"), test], ignore_index=True)
    df["group"] = df["patient"]  # patients are the unit that never crosses splits
    return _finish(kind, root, df, ["all", "hem"], "patient-level", cfg, cache_dir, missing=missing)


# ----------------------------------------------------------------------------- Aria and folders

def aria_root(root: Path, variant: str) -> Path:
    folder = {"original": "Original", "segmented": "Segmented"}[variant]
    if (root / folder).is_dir():
        return root / folder
    if any((root / c).is_dir() for c in ARIA_CLASSES):
        return root  # the user pointed at one variant folder
    if root.is_dir() and any((root / v).is_dir() for v in ("Original", "Segmented")):
        raise DTLError(f"{root} has no {folder}/ folder for variant={variant!r}.\n{ARIA_LAYOUT}")
    raise DTLError(f"{root} is not an Aria ALL root.\n{ARIA_LAYOUT}")


def _folder_table(root: Path, layout: str) -> pd.DataFrame:
    rows = [{"path": str(f.relative_to(root)), "label": cls, "patient": ""}
            for cls, files in _class_folders(root, layout).items() for f in files]
    return pd.DataFrame(rows)


def load_aria(cfg: DataConfig, cache_dir: str | Path, kind: str = "aria") -> Dataset:
    """Aria ALL (one variant folder): the folder-set path, with the Segmented images linked to their
    Original twins so both variants share one grouping and split."""
    root = aria_root(Path(cfg.root), cfg.variant)
    twin = root.parent / "Original" if root.name == "Segmented" else None
    return _load_folder(cfg, cache_dir, kind, root, ARIA_LAYOUT, twin)


def load_imagefolder(cfg: DataConfig, cache_dir: str | Path) -> Dataset:
    """Any class-per-folder set."""
    return _load_folder(cfg, cache_dir, "imagefolder", Path(cfg.root), FOLDER_LAYOUT, None)


def _load_folder(cfg: DataConfig, cache_dir: str | Path, kind: str, root: Path, layout: str,
                 twin: Path | None) -> Dataset:
    """De-duplicate, group (near-duplicate clusters, optionally acquisition blocks), then a
    class-stratified group split."""
    df = _folder_table(root, layout)
    protocol = split_protocol(cfg)
    name = f"{protocol}:{cfg.block_size}" if protocol == "acquisition-blocks" else protocol
    return _finish(kind, root, df, sorted(df["label"].unique()), name, cfg, cache_dir, dedupe=True,
                   grouping=protocol, link_root=twin)


def _linked_pairs(src: pd.DataFrame, cache_dir) -> pd.DataFrame:
    """Near-duplicate pairs of the scanned images, cached by their thumbnails, hashes and the
    linking parameters (a few seconds on Aria, paid once)."""
    text = GROUP_PARAMS + "\n" + "\n".join(src["thumb"] + "|" + src["phash"])
    cache = Path(cache_dir) / "groups" / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.csv"
    if cache.exists():
        return pd.read_csv(cache).astype({"i": int, "j": int, "ncc": float, "hash_bits": int, "transform": int})
    linked = similar_pairs(src["thumb"], src["phash"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    linked.to_csv(tmp, index=False)
    os.replace(tmp, cache)
    return linked


def _link_table(df: pd.DataFrame, link_root: Path | None, cache_dir) -> pd.DataFrame:
    """The scan that near-duplicates are found on: the images themselves, or for Aria
    ``Segmented`` their ``Original`` twins (same fields, same names). On a black background
    every segmented field correlates with every other, so links are only trustworthy on the
    unsegmented photos."""
    if link_root is None or not all((link_root / p).is_file() for p in df["path"]):
        return df
    twin = scan_files(link_root, df["path"].tolist(), cache_dir)
    return twin.set_index("path").loc[df["path"]].reset_index()


PRESPLIT_LAYOUT = ("a presplit root holds train/<class>/<image>, val/<class>/<image> and optionally "
                   "test/<class>/<image>; or give data.train_dir and data.val_dir (data.test_dir optional)")


def presplit_dirs(cfg: DataConfig) -> dict[str, str]:
    """The split folders of pre-split data: ``train_dir``/``val_dir``/``test_dir`` as given, else
    ``root``'s ``train/``, ``val/`` and (when present) ``test/``; a DTLError names the one missing."""
    dirs = {"train": cfg.train_dir, "val": cfg.val_dir, "test": cfg.test_dir}
    if cfg.root and not (dirs["train"] or dirs["val"]):
        root = Path(cfg.root)
        if not root.is_dir():
            raise DTLError(f"presplit root {root} does not exist or is not a folder; {PRESPLIT_LAYOUT}")
        dirs = {s: str(root / s) if (root / s).is_dir() else "" for s in dirs}
        found = ", ".join(f"{s}/" for s, d in dirs.items() if d) or "none of train/, val/, test/"
        for s in ("train", "val"):
            if not dirs[s]:
                raise DTLError(f"presplit root {root} has no {s}/ folder (found: {found}); {PRESPLIT_LAYOUT}")
        return dirs
    for s in ("train", "val"):
        if not dirs[s]:
            other = "val" if s == "train" else "train"
            raise DTLError(f"presplit data needs data.{s}_dir" + (f" (data.{other}_dir is given)" if dirs[other] else "")
                           + f"; {PRESPLIT_LAYOUT}.\n{FOLDER_LAYOUT}")  # the kind is presplit already: only the folder is missing
    return dirs


def load_presplit(cfg: DataConfig, cache_dir: str | Path) -> Dataset:
    dirs = presplit_dirs(cfg)
    given = {s: Path(d).resolve() for s, d in dirs.items() if d}
    root = Path(os.path.commonpath([str(p) for p in given.values()]))
    parts = []
    for s, d in given.items():
        t = _folder_table(d, FOLDER_LAYOUT)
        t["path"] = [str((d / p).relative_to(root)) for p in t["path"]]
        t["split"] = s
        parts.append(t)
    df = pd.concat(parts, ignore_index=True)
    classes = sorted(df["label"].unique())
    for s, t in zip(given, parts):
        lacking = sorted(set(classes) - set(t["label"]))
        if lacking and s != "test":
            raise DTLError(f"{given[s]} lacks class folder(s) {lacking} that the other splits have")
    df["group"] = df["path"]
    return _finish("presplit", root, df, classes, "given", cfg, cache_dir)


# ----------------------------------------------------------------------------- shared tail

def _finish(kind, root, df, classes, protocol, cfg, cache_dir, missing=(), dedupe=False,
            grouping: str | None = None, link_root: Path | None = None) -> Dataset:
    scan = scan_files(root, df["path"].tolist(), cache_dir)
    df = df.merge(scan, on="path", how="left")
    unreadable = df.loc[~df["ok"].astype(bool), "path"].tolist()
    if unreadable and not cfg.skip_bad:
        raise DTLError(f"{len(unreadable)} unreadable or truncated image(s) under {root}: "
                       f"{', '.join(unreadable[:20])}{' ...' if len(unreadable) > 20 else ''}\n"
                       "Fix or remove them, or pass --skip-bad (data.skip_bad=true) to skip them "
                       "(they are then listed in the run).")
    df = df[df["ok"].astype(bool)].reset_index(drop=True)
    pairs: list[tuple[str, str]] = []
    if dedupe:
        df = df.sort_values("path").reset_index(drop=True)
        first = df.groupby("sha256")["path"].transform("first")
        dup = df["path"] != first
        pairs = list(zip(first[dup], df.loc[dup, "path"]))
        df = df[~dup].reset_index(drop=True)
    linked = _linked_pairs(_link_table(df, link_root, cache_dir), cache_dir)
    if grouping is not None:  # folder sets: groups from the pairs, then a group split
        df["group"] = assign_groups(df, grouping, cfg.block_size, linked)
        df["split"] = group_split(df["label"], df["group"], cfg.val_fraction, cfg.test_fraction,
                                  cfg.split_seed)
    _check_classes(cfg, classes, root)
    cross = cross_split_pairs(df, linked)
    manifest = df[MANIFEST_COLUMNS].copy()
    manifest["patient"] = manifest["patient"].fillna("").astype(str)
    manifest["group"] = manifest["group"].fillna("").astype(str)
    manifest["width"] = manifest["width"].astype(int)
    manifest["height"] = manifest["height"].astype(int)
    return Dataset(kind, root, list(classes), manifest, protocol, len(pairs), pairs, list(missing),
                   unreadable, list(cross.itertuples(index=False, name=None)), len(linked),
                   turned_counts(linked))


def _check_classes(cfg: DataConfig, found: list[str], root: Path) -> None:
    if not cfg.classes:
        return
    lacking = sorted(set(cfg.classes) - set(found))
    extra = sorted(set(found) - set(cfg.classes))
    if lacking:
        raise DTLError(f"the config names class(es) {lacking} that the data under {root} lacks; "
                       f"classes found: {sorted(found)}")
    if extra:
        raise DTLError(f"the data under {root} has class(es) {extra} that the config does not name "
                       f"(data.classes={list(cfg.classes)}); add them or remove those folders")


def load_demo_cnmc(cfg: DataConfig, cache_dir: str | Path) -> Dataset:
    """The built-in synthetic C-NMC-layout set, generated into ``cache_dir`` first."""
    return load_cnmc(replace(cfg, root=str(demo.make_cnmc(cache_dir))), cache_dir, kind="demo-cnmc")


def load_demo_aria(cfg: DataConfig, cache_dir: str | Path) -> Dataset:
    """The built-in synthetic Aria-layout set, generated into ``cache_dir`` first."""
    return load_aria(replace(cfg, root=str(demo.make_aria(cache_dir))), cache_dir, kind="demo-aria")


def load_dataset(cfg: DataConfig, cache_dir: str | Path) -> Dataset:
    """The dataset of ``cfg.kind``, read by the loader the registry (:mod:`dtl.data.kinds`) names;
    with ``cv_folds`` set, re-split into that cross-validation fold (:func:`fold_dataset`)."""
    if cfg.cv_folds:
        return fold_dataset(load_dataset(replace(cfg, cv_folds=0, cv_fold=0, cv_repeat=0), cache_dir),
                            cfg.cv_folds, cfg.cv_fold, cfg.split_seed + cfg.cv_repeat)
    kind = kinds.get(cfg.kind)
    if kind.needs_root and not cfg.root:
        raise DTLError(f"data.kind={cfg.kind!r} needs data.root (e.g. --phase1-root / -P phase2_root=...)")
    return globals()[kind.loader](cfg, cache_dir)


def fold_dataset(ds: Dataset, k: int, fold: int, seed: int) -> Dataset:
    """``ds`` with every item (train, val and test alike) re-split for fold ``fold`` of a stratified
    group K-fold over its resampling units (:func:`dtl.data.splits.fold_split`): the protocol's
    groups stay whole, and the same data and seed give every model the same folds."""
    m = ds.manifest.copy()
    _, units = resampling_units(m)
    m["split"] = fold_split(m["label"].to_numpy(), units, k, fold, seed)
    return replace(ds, manifest=m, near_duplicates=[])
