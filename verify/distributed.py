"""Data-parallel verification across processes: ``torchrun`` + DistributedDataParallel (DDP).

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``), every process runs the same ``protect verify`` command; :func:`setup` joins them
into one process group (NCCL on GPUs, Gloo on CPUs) and pins each process to GPU ``LOCAL_RANK``.
Every cell is then trained data-parallel: each global batch of the recipe is split across the
processes, DDP averages the gradients, and test accuracy is counted on a shard of the test set per
process and summed. The recipe's batch size and learning rate stay global, and on GPUs every
BatchNorm becomes a SyncBatchNorm (batch statistics over the whole global batch), so a run on 4
GPUs trains the same recipe as on one (up to the order of floating-point sums and the per-process
crop, defense and attack draws). On CPUs (Gloo) PyTorch's SyncBatchNorm does not run, so each
process normalises over its own share of the batch; the certificate records which one was used
(:func:`batchnorm_mode`). Only rank 0 prints progress, writes the baseline cache, the finished
cells and the report; it also decides which finished cells a resumed run reuses and tells the others.

    torchrun --standalone --nproc_per_node 4 -m cli.main verify out/ --test test/ --clean train/ --tier paper

Outside ``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op: :func:`world` is 1
and :func:`rank` is 0.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from perturbations.errors import ConfigError

__all__ = [
    "all_reduce_sum",
    "batchnorm_mode",
    "broadcast_buffers",
    "broadcast_object",
    "convert_batchnorm",
    "env_world_size",
    "is_main",
    "rank",
    "setup",
    "world",
]

log = logging.getLogger(__name__)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset or unreadable)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def active() -> bool:
    """True when this process is part of an initialised process group with more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device: str | torch.device = "auto") -> str | torch.device:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (idempotent) and return the
    device this process should use: ``cuda:LOCAL_RANK`` when GPUs are used, else ``device``
    unchanged. Without ``torchrun`` it returns ``device`` and does nothing."""
    if env_world_size() <= 1:
        return device
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    want_cuda = str(device) in ("auto", "cuda") and torch.cuda.is_available() or str(device).startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible: start torchrun "
                f"with --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        backend = "nccl" if want_cuda else "gloo"
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot join the torchrun process group ({backend}): {exc}") from None
        log.info("distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return torch.device("cuda", local) if want_cuda else device


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all processes in place (no-op when not distributed); returns ``t``."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process, so all evaluate the
    same model (DDP keeps the parameters in sync, but each process updates its running stats from
    its own shard of the batch)."""
    if not active():
        return
    for b in model.buffers():
        dist.broadcast(b.data, src=0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (identity when not distributed)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def uses_sync_batchnorm(device: str | torch.device) -> bool:
    """True when cells train data-parallel on GPUs, where BatchNorm becomes SyncBatchNorm."""
    return world() > 1 and torch.device(device).type == "cuda"


def batchnorm_mode(device: str | torch.device) -> str:
    """How BatchNorm statistics are taken, for the certificate: ``"single process"``,
    ``"synchronized (SyncBatchNorm over N processes)"`` or ``"per process (...)"`` on CPUs."""
    w = world()
    if w == 1:
        return "single process"
    if uses_sync_batchnorm(device):
        return f"synchronized (SyncBatchNorm over {w} processes)"
    return (f"per process (each of {w} processes normalises over its share of the batch: "
            "PyTorch's SyncBatchNorm needs GPUs)")


def convert_batchnorm(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model`` with every BatchNorm layer turned into :class:`torch.nn.SyncBatchNorm` when
    :func:`uses_sync_batchnorm` (GPUs under torchrun); else ``model`` unchanged."""
    if not uses_sync_batchnorm(device):
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
