"""Fault-injection hooks the reliability tests use, in one place.

Each hook is a no-op unless its environment variable names the point the code has reached:

- ``DTL_KILL_AT=<point>``: SIGKILL this process there (once per ``DTL_KILL_MARKER`` file, so the
  rerun that resumes passes the same point alive). Points: ``phase1:epoch0``,
  ``phase1:trial1:start``, ``phase2:trial0:epoch1``, ``between_phases``, ``registration``, ``report``.
- ``DTL_OOM_AT=<phase>:trial<n>``: raise a CUDA out-of-memory error at the start of that trial.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch


def kill_point(point: str) -> None:
    """Kill this process with SIGKILL at ``point`` when ``DTL_KILL_AT`` names it (kill/resume tests)."""
    if os.environ.get("DTL_KILL_AT") != point:
        return
    marker = os.environ.get("DTL_KILL_MARKER")
    if marker and Path(marker).exists():
        return
    if marker:
        Path(marker).write_text(point)
    os.kill(os.getpid(), signal.SIGKILL)


def oom_point(point: str) -> None:
    """Raise ``torch.cuda.OutOfMemoryError`` at ``point`` when ``DTL_OOM_AT`` names it."""
    if os.environ.get("DTL_OOM_AT") == point:
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by DTL_OOM_AT={point})")
