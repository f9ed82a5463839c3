"""Runtime utilities the learners share (private): global random-state capture and replay, and the
few ``torch.distributed`` collectives.

**Random state** (docs/algorithms.md §6.3).  The posterior-corrected learners evaluate the closure twice on the
same batch: once at the current weight sample and once at the anchor sample.  In-forward randomness
(dropout, drop-path, in-step augmentation) must be identical in both passes, so the learner saves the
global states :math:`R_0` after drawing the weight noise, runs one pass, saves :math:`R_1`, restores
:math:`R_0`, runs the other pass, and sets :math:`R_1`
(:meth:`vbpc.inference.correction.Correction.two_pass`).  Global RNG use then equals one pass of the
base learner.

**Collectives** (``sync=True``): one decision on non-finite losses for every rank, and rank means of
statistics; and, for sharded (FSDP2) parameters, one decision for every rank and a check that the
ranks draw different noise.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import NonFiniteError

try:  # numpy is a core dependency, but keep the helper importable without it
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

__all__ = ["RNGState", "capture_rng", "restore_rng", "rng_state_dict", "rng_from_state_dict", "active", "agree_finite",
           "all_true", "mean_", "warn_if_same_noise", "world_size"]


@dataclass
class RNGState:
    """Global RNG states: torch CPU, every initialised CUDA device, NumPy, Python ``random``,
    and any user-registered ``torch.Generator`` objects."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] = field(default_factory=list)
    numpy: Optional[Any] = None
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


# ====================================================================== collectives


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
