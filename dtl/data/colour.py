"""``data.colour``: the one colour preprocessing of training, serving and the audit (raw,
greyscale, Reinhard stain normalisation to a fixed reference). It lives in the served package,
:mod:`dtl.model.colour`, so a logged model applies it too; this module re-exports it for
training-side code."""

from dtl.model.colour import METHODS, REINHARD_MEAN, REINHARD_STD, apply, check_method

__all__ = ["METHODS", "REINHARD_MEAN", "REINHARD_STD", "apply", "check_method"]
