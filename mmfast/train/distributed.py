"""DistributedDataParallel plumbing for runs launched with ``torchrun``.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; when ``WORLD_SIZE > 1`` the
trainer joins the process group (gloo on CPU, nccl on CUDA) and wraps the model's objective in
DDP. The objective is called through :class:`ObjectiveModule` because DDP synchronises
gradients only for calls that go through its own ``forward``.
"""
from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch import nn


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> tuple[int, int]:
    """Join the process group if launched by torchrun: returns ``(rank, world_size)``."""
    if not launched_distributed():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    """Leave the process group, if one was joined. A process that exits with gloo's threads
    still running can abort ("terminate called without an active exception"), failing the
    launcher even after a successful run. Close the :class:`~mmfast.train.Trainer` first: its
    DDP reducer holds the group; the collection here frees wrappers no longer referenced."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class ObjectiveModule(nn.Module):
    """``forward(x, observed, **options)`` = ``model.objective(...)``, returning ``(loss, value)``
    as plain tensors (DDP looks for tensors in the output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, observed, **options):
        out = self.model.objective(x, observed=observed, **options)
        return out.loss, out.value
