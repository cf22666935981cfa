"""The dataset registry: every data kind the tool reads, in one table.

Each entry names its loader (a function of ``dtl.data.datasets``, imported when a dataset is
loaded: config validation and the CLI's help read this table without importing pandas, Pillow
or the near-duplicate scanners), the split protocols it accepts (the first is ``auto``), the
phase whose default data it is, and one line of help. The config's valid ``data.kind`` values,
the CLI's ``--kind`` choices and help and the default kind of ``--phaseN-root`` all come from
here: adding a kind is one entry plus its loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GROUPED = ("near-duplicate-groups", "acquisition-blocks", "image-level")


@dataclass(frozen=True)
class DataKind:
    name: str
    loader: str  # function name in dtl.data.datasets: loader(DataConfig, cache_dir) -> Dataset
    protocols: tuple[str, ...]  # split protocols accepted; the first is what "auto" means
    phase: str  # the phase this kind is the default of for --phaseN-root, or "" if none
    needs_root: bool  # data.root must be given (the demo kinds generate theirs; presplit uses *_dir)
    help: str


KINDS: dict[str, DataKind] = {k.name: k for k in (
    DataKind("cnmc", "load_cnmc", ("patient-level",), "phase1", True,
             "C-NMC 2019 as downloaded (training_data/fold_*; patient-level split)"),
    DataKind("aria", "load_aria", GROUPED, "phase2", True,
             "Aria ALL as downloaded ({Original,Segmented}/{Benign,Early,Pre,Pro})"),
    DataKind("imagefolder", "load_imagefolder", GROUPED, "", True, "any class-per-folder set (ROOT/<class>/<image>)"),
    DataKind("presplit", "load_presplit", ("given",), "", False,
             "class-per-folder train/val/test folders (data.train_dir, val_dir, test_dir)"),
    DataKind("demo-cnmc", "load_demo_cnmc", ("patient-level",), "", False,
             "built-in synthetic cells in the C-NMC layout"),
    DataKind("demo-aria", "load_demo_aria", GROUPED, "", False, "built-in synthetic smears in the Aria layout"),
)}


def names() -> tuple[str, ...]:
    return tuple(KINDS)


def get(name: str) -> DataKind:
    if name not in KINDS:
        raise KeyError(name)
    return KINDS[name]


def default_kind(phase: str) -> str:
    """The kind a bare ``--phaseN-root`` means (C-NMC for phase 1, Aria for phase 2)."""
    return next(k.name for k in KINDS.values() if k.phase == phase)


PRESPLIT_FOLDERS = ("train", "val", "test")  # a presplit root: train/ and val/ (test/ optional), each class-per-folder


def is_presplit_root(root: str) -> bool:
    """A root holding ``train/`` and ``val/`` folders is pre-split data (the layout the seed's users keep)."""
    return bool(root) and all((Path(root) / f).is_dir() for f in PRESPLIT_FOLDERS[:2])


def phase_of(name: str) -> str:
    """The config block (phase1/phase2) a kind's data is read into by ``dtl data``."""
    return KINDS[name].phase or ("phase1" if "cnmc" in name else "phase2")


def help_text() -> str:
    return "; ".join(f"{k.name}: {k.help}" for k in KINDS.values())
