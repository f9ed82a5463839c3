"""DTensor parameters (PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard``) in the learners.

FSDP2 turns every parameter it shards into a ``DTensor`` whose local tensor is this rank's shard.
The learners keep their state as DTensors laid out like the parameters (each rank holds its shard,
and ``torch.distributed.checkpoint`` saves and reshards them like any optimizer's state), and run
their elementwise kernels on the local tensors: an elementwise update of the shard is the shard
of the elementwise update.  Only reductions over a whole tensor (a gradient norm, a per-tensor
sum) need the other shards: :func:`global_sums`.  Nothing here shards anything.
"""

from __future__ import annotations

from typing import Optional, overload

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
except ImportError:  # torch without (public) DTensors: no parameter is one
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["is_dtensor", "any_dtensor", "local", "locals_", "randn_like", "global_sums"]


def is_dtensor(t: Optional[Tensor]) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(ts: list[Tensor]) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in ts)


@overload
def local(t: Tensor) -> Tensor: ...
@overload
def local(t: None) -> None: ...
def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """This rank's shard of a DTensor (an alias: in-place writes update the DTensor), else ``t``."""
    if DTensor is None or not isinstance(t, DTensor):
        return t
    with torch.no_grad():  # outside autograd: the local tensor itself, not a differentiable view
        return t.to_local()


def locals_(ts: list[Tensor]) -> list[Tensor]:
    """:func:`local` of each tensor (``ts`` itself when none is a DTensor)."""
    if not any_dtensor(ts):
        return ts
    return [local(t) for t in ts]  # type: ignore[misc]


def randn_like(like: Tensor, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Standard normals shaped like ``like`` from ``generator`` (on its device, then moved to ``like``'s).

    For a DTensor the full tensor is drawn and each rank keeps its shard (no communication), so the
    draw equals the unsharded one and the shards are independent: ``generator`` is seeded alike on
    every rank (an anchor's), so a draw of the local shape would repeat the same numbers on every
    shard.  The full draw is transient, one tensor at a time."""
    full = torch.randn(like.shape, generator=generator, dtype=dtype).to(like.device)
    if DTensor is None or not isinstance(like, DTensor):
        return full
    try:
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    except TypeError:  # torch < 2.6: a broadcast from rank 0, of the same numbers
        return distribute_tensor(full, like.device_mesh, like.placements)


def global_sums(values: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    """``values[j]``, a 0-dim sum over the local tensor of ``like[j]``, summed over the shards of
    ``like[j]`` (over the mesh dimensions it is sharded on; replicas are not added twice).  Plain
    tensors' values are returned as they are; one all-reduce per distinct (mesh, placements)."""
    out = list(values)
    groups: dict[tuple, list[int]] = {}
    for j, t in enumerate(like):
        if DTensor is not None and isinstance(t, DTensor) and any(p.is_shard() for p in t.placements):
            groups.setdefault((t.device_mesh, tuple(t.placements)), []).append(j)
    for (mesh, placements), idx in groups.items():
        partial = [Partial() if p.is_shard() else Replicate() for p in placements]
        stacked = torch.stack([values[j].reshape(()) for j in idx])
        total = DTensor.from_local(stacked, mesh, partial, run_check=False).full_tensor()
        for k, j in enumerate(idx):
            out[j] = total[k]
    return out
