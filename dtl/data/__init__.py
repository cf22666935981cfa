"""Datasets (adapters, manifests, splits), transforms and the decoded-image cache."""

from dtl.data.datasets import Dataset, load_dataset  # noqa: F401
