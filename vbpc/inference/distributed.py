"""The few ``torch.distributed`` collectives the learners share (``sync=True``): one decision on
non-finite losses for every rank, and rank means of statistics."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import NonFiniteError

__all__ = ["active", "agree_finite", "mean_", "world_size"]


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Ranks in the process group (1 outside one)."""
    return dist.get_world_size() if active() else 1


def agree_finite(finite: bool) -> None:
    """Raise :class:`NonFiniteError` on every rank if any rank's loss was not finite (one collective:
    a rank that raised alone would leave the others waiting in the next all-reduce)."""
    ok = torch.tensor([float(finite)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() == 0.0:
        raise NonFiniteError("a closure returned a non-finite loss on some rank; the step was skipped on every "
                             "rank and no state changed")


def mean_(tensors: Iterable[Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in place."""
    world = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t)
        t.div_(world)
