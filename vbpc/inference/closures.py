"""Checks shared by the learners' ``step(closure)``: the closure must return its loss and must
have called ``backward()``; otherwise the step would silently train on zero gradients."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import SamplingError

__all__ = ["closure_loss", "require_grads"]


def closure_loss(loss: Any, who: str) -> Tensor:
    """The closure's loss, detached; ``None`` (a closure without ``return``) is a ``TypeError``."""
    if loss is None:
        raise TypeError(f"{who}.step(closure): the closure returned None; it must return the loss "
                        "(end it with `loss.backward(); return loss`)")
    return torch.as_tensor(loss).detach()


def require_grads(params: Iterable[Tensor], who: str) -> None:
    """Raise :class:`~vbpc.errors.SamplingError` when no parameter received a gradient (the closure,
    or the ``sampled_params`` block, never called ``backward()``)."""
    params = list(params)
    if params and all(p.grad is None for p in params):
        raise SamplingError(f"{who}: no trainable parameter has a gradient after the sample; the closure (or the "
                            "sampled_params block) must call loss.backward(), and the loss must depend on the "
                            "learner's parameters")
