"""Shared test helpers (imported as ``helpers``; pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import torch
from torch import nn


def ce_closure(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0):
    """The standard closure: zero_grad, mean cross-entropy, backward, return the loss."""

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) * scale
        loss.backward()
        return loss

    return closure


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """``steps`` optimizer steps on one fixed batch."""
    closure = ce_closure(model, opt, x, y)
    for _ in range(steps):
        opt.step(closure)
