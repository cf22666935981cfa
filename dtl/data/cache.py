"""Decoded-image cache and batch loaders.

Each split is decoded, optionally HSV-segmented and resized **once** into a uint8
``N×S×S×3`` ``.npy`` file keyed by the manifest digest, the split, the size and the
preprocessing (HSV, annotation mask, colour); later runs memory-map it. The file is written under a temporary name and
renamed only when complete, so a half-written cache (disk full, kill) is never read back.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from dtl import DTLError
from dtl.model.preprocess import InputSpec, decode
from dtl.progress import live

if TYPE_CHECKING:  # a type only: the cache does not need the dataset scanners at run time
    from dtl.data.datasets import Dataset

CACHE_VERSION = "1"


def cache_key(ds: Dataset, split: str, spec: InputSpec, segment: bool) -> str:
    text = f"{CACHE_VERSION}|{ds.digest}|{split}|{spec.cache_size}|{spec.interpolation}|hsv={segment}"
    if spec.mask is not None:  # unmasked keys stay as they were, so existing caches remain valid
        text += f"|mask={spec.mask.to_dict()}"
    if spec.colour != "raw":  # likewise raw keys: a raw decode is never read back as greyscale
        text += f"|colour={spec.colour}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def split_array(ds: Dataset, split: str, spec: InputSpec, segment: bool, cache_dir: str | Path,
                progress: bool = False) -> np.ndarray:
    """The split's images as a (memory-mapped) uint8 array, building the cache file on a miss."""
    target = Path(cache_dir) / "arrays" / f"{cache_key(ds, split, spec, segment)}.npy"
    if target.exists():
        return np.load(target, mmap_mode="r")
    files = [ds.root / p for p in ds.split(split)["path"]]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.tmp{os.getpid()}.npy")
    size = spec.cache_size
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3))

        def work(i):
            out[i] = decode(files[i], size, spec.interpolation, segment, spec.mask, spec.colour)

        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
            it = pool.map(work, range(len(files)))
            if progress and live():  # no carriage-return bars in logs, none with --quiet

                it = tqdm(it, total=len(files), desc=f"caching {ds.kind}/{split}", unit="img", leave=False)
            for _ in it:
                pass
        out.flush()
        os.replace(tmp, target)  # only a complete file ever gets the final name
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DTLError(f"could not write the image cache {target}: {e}. Nothing was kept; free space "
                       f"or set cache_dir elsewhere and rerun.") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return np.load(target, mmap_mode="r")


class BatchLoader:
    """Batches of (uint8 images, labels) from a cached split.

    On CUDA the whole split is copied to the GPU once and batches are gathered there; on the
    CPU they are gathered from the memory map. The order is a seeded permutation per epoch, so
    a resumed run sees the same batches as an uninterrupted one. No worker processes: host
    memory does not grow with workers because there are none.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device,
                 shuffle: bool, seed: int = 0, drop_last: bool = False, shard: tuple[int, int] = (0, 1)):
        # One copy out of the memory map (a few hundred MB at most for these datasets); on CUDA
        # the split then lives on the GPU and batches never cross the PCIe bus again.
        # (tensors already on ``device``, as :class:`dtl.data.store.DataStore` keeps them, are used as they are)
        self.images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images)).to(device)
        self.labels = torch.as_tensor(labels if isinstance(labels, torch.Tensor) else np.array(labels),
                                      dtype=torch.long, device=device)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.device = device
        self.epoch = 0
        self.rank, self.world = shard  # DDP: this rank's slice of every epoch's permutation

    def _n(self) -> int:
        return len(self.labels) // self.world if self.world > 1 else len(self.labels)

    def __len__(self) -> int:
        n = self._n()
        return n // self.batch_size if self.drop_last and n >= self.batch_size else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world > 1:  # every rank the same number of samples, disjoint
            order = order[self.rank:self._n() * self.world:self.world]
        order = order.to(self.images.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images.index_select(0, idx)
            yield x.to(self.device, non_blocking=True), self.labels[idx.to(self.labels.device)]
