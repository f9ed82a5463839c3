"""Shared test helpers (imported as ``helpers``; pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import math
import socket

import torch
from torch import nn


def free_port() -> int:
    """A free localhost TCP port for a torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def poco_loop(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
              bs: int = 6, chunks: int = 8) -> None:
    """``steps`` steps over consecutive batches of ``(x, y)``, refreshing the anchor (over chunks
    of the whole data, BatchNorm-neutral) whenever a corrected learner says one is due."""
    loss_fn = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    data = [(x[i:i + chunks], y[i:i + chunks]) for i in range(0, len(x), chunks)]
    for t in range(steps):
        if getattr(opt, "refresh_due", False):
            opt.refresh(loss_fn, data, model=model, progress=False)
        i = (t * bs) % len(x)
        opt.step(ce_closure(model, opt, x[i:i + bs], y[i:i + bs]))


def finite(d: dict) -> bool:
    """Every value of ``d`` is a finite number."""
    return all(math.isfinite(v) for v in d.values())


def load_example(name: str, folder: str = ""):
    """Import ``examples/<folder>/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
