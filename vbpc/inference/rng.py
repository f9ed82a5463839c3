"""Capture and restore every global random-number state (docs/algorithms.md §6.3).

The posterior-corrected learners evaluate the closure twice on the same batch: once at the
current weight sample and once at the anchor sample.  In-forward randomness (dropout,
drop-path, in-step augmentation) must be identical in both passes, so the learner saves the
global states :math:`R_0` after drawing the weight noise, runs the current pass, saves
:math:`R_1`, restores :math:`R_0`, runs the anchor pass, and sets :math:`R_1`.  Global RNG use
then equals one pass of the base learner.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

try:  # numpy is a core dependency, but keep the helper importable without it
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

__all__ = ["RNGState", "capture_rng", "restore_rng"]


@dataclass
class RNGState:
    """Global RNG states: torch CPU, every initialised CUDA device, NumPy, Python ``random``,
    and any user-registered ``torch.Generator`` objects."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] = field(default_factory=list)
    numpy: Optional[tuple] = None
    python: Any = None
    extra: list[torch.Tensor] = field(default_factory=list)


def capture_rng(generators: tuple[torch.Generator, ...] = ()) -> RNGState:
    """Snapshot all global generators (and ``generators``)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return RNGState(
        torch_cpu=torch.get_rng_state(),
        torch_cuda=list(cuda),
        numpy=np.random.get_state() if np is not None else None,
        python=random.getstate(),
        extra=[g.get_state() for g in generators],
    )


def restore_rng(state: RNGState, generators: tuple[torch.Generator, ...] = ()) -> None:
    """Restore a snapshot taken by :func:`capture_rng` (same ``generators``, same order)."""
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda:
        torch.cuda.set_rng_state_all(state.torch_cuda)
    if state.numpy is not None and np is not None:
        np.random.set_state(state.numpy)
    if state.python is not None:
        random.setstate(state.python)
    for g, s in zip(generators, state.extra):
        g.set_state(s)


def rng_state_dict(state: Optional[RNGState] = None) -> dict[str, Any]:
    """A serialisable form (tensors, ints, lists) of ``state`` (default: the current global states),
    for checkpoints (:mod:`vbpc.checkpoint`); :func:`rng_from_state_dict` inverts it."""
    s = capture_rng() if state is None else state
    out: dict[str, Any] = {"torch_cpu": s.torch_cpu.clone(), "torch_cuda": [t.clone() for t in s.torch_cuda],
                           "extra": [t.clone() for t in s.extra]}
    if s.numpy is not None:
        kind, keys, pos, has_gauss, cached = s.numpy
        out["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    if s.python is not None:
        version, internal, gauss = s.python
        out["python"] = {"version": int(version), "internal": [int(v) for v in internal], "gauss": gauss}
    return out


def rng_from_state_dict(state: dict[str, Any]) -> RNGState:
    """Inverse of :func:`rng_state_dict`."""
    numpy_state = None
    if state.get("numpy") is not None and np is not None:
        n = state["numpy"]
        numpy_state = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    py = state.get("python")
    python_state = None if py is None else (py["version"], tuple(py["internal"]), py["gauss"])
    return RNGState(torch_cpu=state["torch_cpu"].to(torch.uint8), torch_cuda=list(state.get("torch_cuda", [])),
                    numpy=numpy_state, python=python_state, extra=list(state.get("extra", [])))
