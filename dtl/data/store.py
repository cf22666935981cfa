"""The job's data in memory: datasets (manifests) by data config, and each split decoded once
into tensors on the training device, shared by a study's trials and its seed repeats.

The pipeline owns one store per job (``with scope() as data``) and calls ``data.release()``
after each backbone, so a split kept on the GPU for one backbone's input size does not stay
there for the next. Code outside a pipeline (one evaluation, a test) uses the process's store.
Loaders are built per call from the stored tensors: batch size, order seed and sharding are the
caller's, never those of whoever filled the store first.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import numpy as np
import torch

from dtl import DTLError
from dtl.config import DataConfig
from dtl.data.cache import BatchLoader, split_array
from dtl.data.datasets import Dataset, load_dataset
from dtl.model.preprocess import InputSpec


class DataStore:
    """Datasets by (data config, cache dir); split tensors by (digest, split, input spec, HSV, device)."""

    def __init__(self) -> None:
        self._datasets: dict = {}
        self._splits: dict = {}

    def dataset(self, data: DataConfig, cache_dir: str | Path) -> Dataset:
        key = (data, str(cache_dir))
        if key not in self._datasets:
            self._datasets[key] = load_dataset(data, cache_dir)
        return self._datasets[key]

    def tensors(self, ds: Dataset, split: str, spec: InputSpec, segment: bool, cache_dir: str | Path,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's uint8 images and label ids on ``device`` (decoded through the disk cache once)."""
        key = (ds.digest, split, spec, segment, str(device))
        if key not in self._splits:
            if not (ds.manifest["split"] == split).any():
                raise DTLError(f"the {ds.kind} data at {ds.root} has no {split!r} split (splits: "
                               f"{', '.join(sorted(ds.manifest['split'].unique()))})")
            arr = split_array(ds, split, spec, segment, cache_dir, progress=True)
            # one copy out of the memory map; on CUDA the split then lives on the GPU
            self._splits[key] = (torch.from_numpy(np.array(arr)).to(device),
                                 torch.as_tensor(np.array(ds.label_ids(split)), dtype=torch.long, device=device))
        return self._splits[key]

    def loader(self, ds: Dataset, split: str, spec: InputSpec, segment: bool, cache_dir: str | Path,
               device: torch.device, batch_size: int, train: bool, seed: int,
               shard: tuple[int, int] = (0, 1)) -> BatchLoader:
        images, labels = self.tensors(ds, split, spec, segment, cache_dir, device)
        return BatchLoader(images, labels, batch_size, device, shuffle=train, seed=seed,
                           drop_last=train and len(labels) > batch_size, shard=shard)

    def release(self) -> None:
        """Drop the split tensors (the datasets' manifests are small and stay for the job)."""
        self._splits.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


_STORES: list[DataStore] = [DataStore()]  # the process's store at the bottom, job scopes above it


def current() -> DataStore:
    """The store of the innermost open :func:`scope` (else the process's)."""
    return _STORES[-1]


@contextlib.contextmanager
def scope():
    """A job's own store, released when the job ends."""
    store = DataStore()
    _STORES.append(store)
    try:
        yield store
    finally:
        _STORES.remove(store)
        store.release()
