"""Data-parallel trials under ``torchrun`` (DDP), on the existing engine.

``torchrun --nproc-per-node N -m dtl main ...``: rank 0 runs the command as usual (Optuna,
MLflow, checkpoints, reports); every other rank is a *follower* that receives each training
job from rank 0 (:func:`lead`), trains its shard of every epoch in lock-step (gradients are
averaged by DDP; :func:`end_epoch`) and logs nothing. Metrics and checkpoints come from rank 0
only. The protocol lives here; the training function is passed in (:func:`follow`), so this
module imports nothing of the training code.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

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


def shard(train: bool) -> tuple[int, int]:
    """``(rank, world)``: the slice of every epoch a training loader of this process draws."""
    return (rank(), world_size()) if train and active() else (0, 1)


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


def lead(job: dict) -> None:
    """Rank 0: send the followers the keyword arguments of the training call it starts now."""
    if active() and is_main():
        broadcast(job)


def end_epoch(report: Callable[[int, dict], None] | None, epoch: int, row: dict, stop: bool) -> None:
    """The end of one epoch, in lock-step. Rank 0 reports the row (Optuna may prune, tracking may
    fail) and tells the followers whether the job goes on; a follower told to stop raises
    :class:`Stop` and waits for the next job. Without DDP this is just ``report(epoch, row)``."""
    if not active():
        if report is not None:
            report(epoch, row)
        return
    if is_main():
        try:
            if report is not None:
                report(epoch, row)
        except BaseException:
            broadcast(True)  # pruned or failed: release the followers from this job
            raise
        broadcast(stop)
    elif broadcast(None):
        raise Stop()


def release() -> None:
    """Rank 0: tell the followers there is no more work, then leave the group together with
    them (a rank exiting while another still tears down gloo can abort the other)."""
    if active() and is_main():
        broadcast(None)
        _leave()


def _leave() -> None:
    dist.barrier()
    dist.destroy_process_group()


def follow(train: Callable[..., object]) -> int:
    """A follower rank: call ``train(**job)`` for every job rank 0 sends, until it sends None."""
    while True:
        job = broadcast(None)
        if job is None:
            _leave()
            return 0
        try:
            train(**job)
        except Stop:
            continue


class Stop(Exception):
    """Rank 0 stopped this job (pruned, early stop or failed): followers move on."""
