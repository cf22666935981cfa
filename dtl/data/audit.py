"""``dtl data``: the audit of a dataset as a recipe would read and split it (counts, duplicates,
near-duplicates, groups, the shortcut probe and baselines) and the augmentation preview."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dtl.config import AugmentConfig, DataConfig
from dtl.data.datasets import Dataset, load_dataset
from dtl.model.mask import annotation_mask
from dtl.model.preprocess import InputSpec, decode
from dtl.train.augment import train_transform


def audit(dc: DataConfig, cache_dir: str, probe: bool | None = None, manifest_out: str = "") -> tuple[Dataset, dict]:
    """The dataset of ``dc`` and its audit dict (what ``--json`` prints). The shortcut probe runs
    when asked (``probe``), or by default where the annotation mask is on; the shortcut
    baselines run unless ``probe`` is False. The per-image manifest goes to ``manifest_out``."""
    from dtl.data.probe import audit_baselines, shortcut_probe  # deferred: scikit-learn, only for the audit

    ds = load_dataset(dc, cache_dir)
    a = ds.audit()
    mask = annotation_mask(dc.mask_annotation, ds.kind, dc.variant)
    run_probe = probe or (probe is None and mask is not None)
    a["shortcut_probe"] = shortcut_probe(ds, mask, cache_dir, seed=dc.split_seed) if run_probe else None
    a["shortcut_baselines"] = [] if probe is False else audit_baselines(ds, mask, cache_dir, seed=dc.split_seed, colour=dc.colour)
    if manifest_out:
        ds.manifest[["path", "label", "group", "split", "sha256"]].to_csv(manifest_out, index=False)
    return ds, a


def audit_text(ds: Dataset, a: dict) -> str:
    """The audit as ``dtl data audit`` prints it."""
    lines = [f"{ds.kind} at {ds.root}  ({ds.protocol} split, digest {ds.digest[:12]})",
             f"{'split':8s}" + "".join(f"{c:>10s}" for c in ds.classes) + f"{'total':>8s}{'patients':>10s}"]
    for s in sorted(a["splits"]):
        byc = a["class_by_split"].get(s, {})
        lines.append(f"{s:8s}" + "".join(f"{byc.get(c, 0):>10d}" for c in ds.classes) + f"{a['splits'][s]:>8d}"
                     f"{str(a['n_patients'].get(s)):>10s}")
    lines += [f"images {a['n_images']}, duplicates removed {a['duplicates_removed']}, patient overlap "
              f"{a['patient_overlap']}, unreadable {len(a['unreadable'])}, listed but missing {a['missing_listed']}, "
              f"near-duplicate pairs across splits {a['near_duplicates']}",
              "sizes: " + ", ".join(f"{k} ({v})" for k, v in a["sizes"].items()),
              f"groups {a['groups']} (near-duplicate pairs linked {a['near_duplicates_linked']}{_turned(a)}); "
              "group sizes: " + ", ".join(f"{n}x{size}" for size, n in a["group_sizes"].items()), *pairs_text(a)]
    p = a["shortcut_probe"]
    if p:
        lines.append(f"shortcut probe (logistic regression, {p['n_images']} images, grouped 5-fold CV): annotation box "
                     f"rows {p['region']['rows']} cols {p['region']['cols']}: {p['annotation']:.3f} unmasked, "
                     f"{p['annotation_masked']:.3f} masked; central box {p['centre']:.3f}; field colour "
                     f"{p['field_colour']:.3f}; majority class {p['majority']:.3f}")
    if a["shortcut_baselines"]:
        b0 = a["shortcut_baselines"][0]
        lines.append(f"shortcut baselines ({b0['folds']}-fold CV grouped by {b0['grouping']}; majority class "
                     f"{b0['majority']:.3f}): what a model could score without looking at the cells")
        lines += [f"  {b['name']:18s} {b['model']:9s} accuracy {b['accuracy']:.3f}  macro-F1 {b['macro_f1']:.3f}"
                  for b in a["shortcut_baselines"]]
    return "\n".join(lines)


def _turned(a: dict) -> str:
    turned = ", ".join(f"{name} {n}" for name, n in a.get("near_duplicates_linked_turned", {}).items())
    return f"; of them turned or mirrored: {turned}" if turned else ""


def pairs_text(a: dict, most: int = 10) -> list[str]:
    """The first near-duplicate pairs across splits, each with how the second image was made from
    the first where it is a turned or mirrored copy."""
    out = [f"  {first} ({split_a}) ~ {second} ({split_b}): ncc {ncc:.2f}" + (f", {transform}" if transform else "")
           for first, second, split_a, split_b, ncc, _, transform in a["near_duplicate_pairs"][:most]]
    if a["near_duplicates"] > most:
        out.append(f"  ... and {a['near_duplicates'] - most} more near-duplicate pairs across splits")
    return out


def preview(dc: DataConfig, cache_dir: str, size: int, per_class: int, out: str) -> str:
    """A grid of ``per_class`` augmented training images per class (the default augmentation, at
    ``size`` px, not normalised), written to ``out``; returns what the command prints."""
    import matplotlib  # deferred: plotting, only for the preview

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plotting, only for the preview

    ds = load_dataset(dc, cache_dir)
    spec = InputSpec(size, int(round(size / 0.875)), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    fig, axes = plt.subplots(len(ds.classes), per_class, figsize=(1.6 * per_class, 1.7 * len(ds.classes)), squeeze=False)
    gen = torch.Generator().manual_seed(0)
    train = ds.split("train")
    for i, c in enumerate(ds.classes):
        rows = train[train["label"] == c].head(per_class)
        imgs = torch.from_numpy(np.stack([decode(ds.root / p, spec.cache_size, colour=dc.colour) for p in rows["path"]]))
        x = train_transform(imgs, spec, AugmentConfig(), gen).permute(0, 2, 3, 1).clamp(0, 1).numpy()
        for j in range(per_class):
            ax = axes[i][j]
            ax.set_axis_off()
            if j < len(x):
                ax.imshow(x[j])
            if j == 0:
                ax.set_title(c, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(Path(out), dpi=100)
    plt.close(fig)
    return f"wrote {out}"
