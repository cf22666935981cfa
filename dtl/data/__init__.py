"""Datasets (adapters, manifests, splits, near-duplicate groups), the decoded-image cache and
the shortcut probes. Training-side only: a served model needs nothing from here (its
preprocessing is :mod:`dtl.model.preprocess`). Nothing is imported here, so importing one
module does not pull in the scanners' dependencies (imagehash, scipy, scikit-learn).
"""
