"""How much memory a learner's state takes (docs/algorithms.md §6.4): persistent optimizer state,
anchor buffers and priors, in bytes and bytes per trainable parameter."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["state_bytes"]


def _tensors(obj: Any, seen: set[int]) -> int:
    """Bytes of the distinct tensors reachable in ``obj`` (dicts, lists, tuples)."""
    if torch.is_tensor(obj):
        key = obj.untyped_storage().data_ptr() if obj.device.type != "meta" else id(obj)
        if key in seen or obj.dim() == 0:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensors(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensors(v, seen) for v in obj)
    return 0


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Persistent state of ``optimizer`` (the parameters themselves excluded; scalars ignored):
    ``{"state": bytes, "anchor": bytes, "total": bytes, "params": n, "bytes_per_param": total/n}``.

    The anchor (PoCo) and the prior (:class:`vbpc.ContinualIVON`) count under ``"anchor"``;
    shared storages are counted once.  Transient workspaces (noise, accumulators) are not state."""
    params: list[Tensor] = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    seen = {p.untyped_storage().data_ptr() for p in params}
    state = sum(_tensors(optimizer.state[p], seen) for p in params if p in optimizer.state)
    anchor = 0
    a = getattr(optimizer, "anchor", None)
    if a is not None:
        anchor = _tensors([a.mean, a.grad, a.hess, a.extra], seen)
    n = sum(p.numel() for p in params)
    total = state + anchor
    return {"state": float(state), "anchor": float(anchor), "total": float(total), "params": float(n),
            "bytes_per_param": total / max(n, 1)}
