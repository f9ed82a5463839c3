"""The few ``torch.distributed`` collectives the learners share (``sync=True``): one decision on
non-finite losses for every rank, and rank means of statistics; and, for sharded (FSDP2) parameters,
one decision for every rank and a check that the ranks draw different noise."""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import NonFiniteError

__all__ = ["active", "agree_finite", "all_true", "mean_", "warn_if_same_noise", "world_size"]


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


def all_true(flag: bool, device: Optional[torch.device] = None) -> bool:
    """``flag`` and-ed over every rank (one all-reduce, on ``device``: the backend's device)."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() == 1.0)


def warn_if_same_noise(noise: list[Tensor], owner: str) -> None:
    """Warn (on every rank) when two ranks drew the same first weight-noise number: with sharded
    parameters each rank draws the noise of its own shards from its global RNG, and identically
    seeded ranks would give every shard the same numbers (correlated coordinates, which bias the
    Price Hessian).  One all-gather of one number, once per learner."""
    first = next((z.reshape(-1)[:1] for z in noise if z.numel()), None)
    dev = noise[0].device if noise else None
    mine = first.to(torch.float64) if first is not None else torch.full((1,), math.nan, dtype=torch.float64, device=dev)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    values = [float(v) for v in everyone if not math.isnan(float(v))]
    if len(set(values)) < len(values):
        warnings.warn(f"{owner} on sharded (DTensor) parameters: ranks drew identical weight noise, so every shard "
                      "gets the same numbers. Seed each rank differently after building the model, e.g. "
                      "torch.manual_seed(seed + dist.get_rank()).", RuntimeWarning, stacklevel=4)
