"""Input validation and conversions shared by :mod:`vbpc.metrics` (docs/algorithms.md §9).

Every public metric converts its inputs here, so that bad input fails with one clear
:class:`ValueError` naming the argument and the problem, and every metric computes in
float64 (docs/algorithms.md §9: "Classification metrics on p̄ (float64)").

Normalisation tolerance.  Probabilities must sum to 1 (log-probabilities: ``logsumexp`` 0)
within ``max(1e-4, 2·C·eps(dtype))`` per row: 1e-4 for float32/float64 inputs of moderate
``C``, looser for 16-bit inputs or very many classes, where a correctly normalised softmax
rounds further from 1.  Logits passed as probabilities fail this check.
"""

from __future__ import annotations

import enum
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .._enums import parse_enum

__all__ = ["Inputs", "as_enum", "check_n_bins", "check_labels", "check_level", "to_probs", "check_stack",
           "as_tensor", "norm_tolerance", "f64"]



class Inputs(str, enum.Enum):
    """What a prediction tensor holds: ``"probs"`` (:math:`\\bar p`), ``"log_probs"``
    (:math:`\\log\\bar p`, as eq. 33 and :func:`vbpc.predictive.predict` give it) or ``"logits"``
    (unnormalised; a softmax is applied)."""

    PROBS = "probs"
    LOG_PROBS = "log_probs"
    LOGITS = "logits"


as_enum = parse_enum  # the one string-enum parser (vbpc._enums)


def as_tensor(x: Any, what: str) -> Tensor:
    """``x`` as a tensor (NumPy arrays and nested lists accepted; Python floats become float64)."""
    if isinstance(x, Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{what} must be a tensor or array, got {type(x).__name__}: {e}") from None


def f64(x: Tensor) -> Tensor:
    """``x`` in float64 (on the CPU for devices without float64, e.g. MPS)."""
    if x.device.type == "mps":
        x = x.cpu()
    return x.to(torch.float64)


def check_n_bins(n_bins: Any) -> int:
    """``n_bins`` as a positive int, else ValueError."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")
    return n_bins


def check_level(level: Any) -> float:
    """A confidence level in (0, 1)."""
    if not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return float(level)


def norm_tolerance(dtype: torch.dtype, n_classes: int) -> float:
    """Allowed ``|sum_c p_c - 1|`` (or ``|logsumexp|``) for a row of ``n_classes`` values of ``dtype``."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(1e-4, 2.0 * n_classes * eps)


def _check_finite_rows(x: Tensor, kind: Inputs, what: str, tol: float) -> None:
    if torch.isnan(x).any():
        raise ValueError(f"{what} contains NaN")
    if kind is Inputs.PROBS:
        if torch.isinf(x).any():
            raise ValueError(f"{what} contains Inf")
        if (x < 0).any():
            raise ValueError(f"{what} contains negative probabilities (min {x.min().item():.3g})")
    else:
        if torch.isposinf(x).any():
            raise ValueError(f"{what} contains +Inf")
        if torch.isneginf(x).all(-1).any():
            raise ValueError(f"{what} has a row that is -Inf everywhere")
        if kind is Inputs.LOG_PROBS and (x > tol).any():  # log-mean-exp of saturated samples may round to +1e-9
            raise ValueError(f"{what} contains positive log-probabilities (max {x.max().item():.3g})")


def to_probs(x: Any, kind: Any = Inputs.PROBS, what: str = "probs", *, ndim: int = 2) -> tuple[Tensor, Tensor]:
    """Validate predictions of ``kind`` and return ``(probs, log_probs)`` in float64.

    ``x`` has shape ``(..., C)`` with ``ndim`` dimensions, at least one row and ``C >= 1``.
    Raises ValueError for NaN, +Inf, negative probabilities, rows not normalised within
    :func:`norm_tolerance`, wrong rank or empty input.  ``log_probs`` of probabilities is
    ``log p`` (``-inf`` where ``p = 0``); probabilities of log-probabilities are ``exp``.
    """
    kind = as_enum(Inputs, kind, "inputs")
    x = as_tensor(x, what)
    if x.dim() != ndim:
        shape = {2: "(N, C)", 3: "(S, N, C)"}.get(ndim, f"{ndim}-D")
        raise ValueError(f"{what} must have shape {shape}, got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)})")
    if not (x.dtype.is_floating_point or kind is Inputs.PROBS):
        raise ValueError(f"{what} ({kind.value}) must be floating point, got {x.dtype}")
    if x.dtype.is_complex:
        raise ValueError(f"{what} must be real, got {x.dtype}")
    tol = norm_tolerance(x.dtype, x.shape[-1])
    _check_finite_rows(x, kind, what, tol)
    x64 = f64(x)
    if kind is Inputs.LOGITS:
        log_p = torch.log_softmax(x64, -1)
        return log_p.exp(), log_p
    if kind is Inputs.LOG_PROBS:
        err = torch.logsumexp(x64, -1).abs().max().item()
        if err > tol:
            raise ValueError(f"{what} are not normalised log-probabilities: max |logsumexp - 0| = {err:.3g} "
                             f"> tolerance {tol:.3g} (pass inputs='logits' for unnormalised scores)")
        return x64.exp(), x64
    err = (x64.sum(-1) - 1.0).abs().max().item()
    if err > tol:
        raise ValueError(f"{what} rows do not sum to 1: max |sum - 1| = {err:.3g} > tolerance {tol:.3g} "
                         "(pass inputs='logits' or 'log_probs' for other representations)")
    return x64, torch.log(x64)


def check_labels(labels: Any, n: int, n_classes: Optional[int], what: str = "labels", *,
                 ignore_index: Optional[int] = None, shape: Optional[tuple[int, ...]] = None) -> Tensor:
    """Validate integer class labels: shape ``(n,)`` (or ``shape``), integer dtype, values in
    ``[0, n_classes)`` (``ignore_index`` also allowed when given).  Returns int64 labels."""
    y = as_tensor(labels, what)
    if y.dtype == torch.bool or y.dtype.is_floating_point or y.dtype.is_complex:
        raise ValueError(f"{what} must be integer class indices, got dtype {y.dtype}")
    want = shape if shape is not None else (n,)
    if tuple(y.shape) != tuple(want):
        raise ValueError(f"{what} has shape {tuple(y.shape)} but the predictions need {tuple(want)}")
    if y.numel() == 0:
        raise ValueError(f"{what} is empty")
    y = y.long()
    valid = y if ignore_index is None else y[y != ignore_index]
    if valid.numel() and n_classes is not None and (valid.min() < 0 or valid.max() >= n_classes):
        bad = valid[(valid < 0) | (valid >= n_classes)][0].item()
        extra = "" if ignore_index is None else f" or {ignore_index} (ignore_index)"
        raise ValueError(f"{what} out of range: found {bad}, expected values in [0, {n_classes}){extra}")
    return y


def check_stack(stack: Any, kind: Any, n: int, n_classes: int, what: str = "sample_stack") -> Tensor:
    """Validate a sample-first stack ``(S, N, C)`` of per-sample predictions of ``kind`` whose
    ``N, C`` match the predictive's; returns per-sample probabilities in float64."""
    s = as_tensor(stack, what)
    if s.dim() != 3:
        raise ValueError(f"{what} must have shape (S, N, C) (sample-first), got {tuple(s.shape)}")
    if tuple(s.shape[1:]) != (n, n_classes):
        raise ValueError(f"{what} has shape {tuple(s.shape)} but the predictive p̄ has (N, C) = ({n}, {n_classes})")
    probs, _ = to_probs(s, kind, what, ndim=3)
    return probs
