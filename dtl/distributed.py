"""Data-parallel trials under ``torchrun`` (DDP), on the existing engine.

``torchrun --nproc-per-node N -m dtl main ...``: rank 0 runs the command as usual (Optuna,
MLflow, checkpoints, reports); every other rank is a *follower* that receives each
``run_phase`` job from rank 0, trains its shard of every epoch in lock-step (gradients are
averaged by DDP) and logs nothing. Metrics and checkpoints come from rank 0 only.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    return not active() or dist.get_rank() == 0


def init() -> None:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA)."""
    if world_size() <= 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))


def broadcast(obj=None):
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def release() -> None:
    """Rank 0: tell the followers there is no more work, then leave the group together with
    them (a rank exiting while another still tears down gloo can abort the other)."""
    if active() and is_main():
        broadcast(None)
        _leave()


def _leave() -> None:
    dist.barrier()
    dist.destroy_process_group()


def follow() -> int:
    """A follower rank: run the jobs rank 0 sends until it sends None."""
    from pathlib import Path

    from dtl.config import from_dict
    from dtl.phases import run_phase

    while True:
        job = broadcast(None)
        if job is None:
            _leave()
            return 0
        cfg = from_dict(job["cfg"])
        try:
            run_phase(cfg, job["phase"], job["backbone"], Path(job["workdir"]), init_from=job["init_from"],
                      resume=job["resume"], init_label=job["init_label"])
        except _Stop:
            continue


class _Stop(Exception):
    """Rank 0 stopped this job (pruned, early stop or failed): followers move on."""
