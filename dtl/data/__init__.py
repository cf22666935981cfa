"""Datasets (adapters, manifests, splits), transforms and the decoded-image cache.

Nothing is imported here: a served model imports ``dtl.data.cache`` and ``dtl.data.transforms``
only, and must not need the dataset scanners' dependencies (imagehash, scipy, scikit-learn).
"""
