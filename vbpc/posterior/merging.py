r"""Model merging by posterior multiplication (docs/algorithms.md §8, eq. 31).

Fine-tuned diagonal posteriors :math:`(m_t,p_t)`, :math:`t=1..T`, that share the base posterior
:math:`(m_0,p_0)` as their prior multiply with the prior counted once, :math:`q_0^{1-T}\prod_t q_t`:

.. math::
    p_{mrg}=p_0+\sum_t(p_t-p_0),\qquad m_{mrg}=m_0+\sum_t\frac{p_t}{p_{mrg}}\odot(m_t-m_0).\tag{31}

Exact for quadratic tasks (the joint posterior); otherwise off by the correction term.
``weights="hessian"`` is the :math:`p_0\to0` limit with :math:`H_t=\max(p_t-p_0,0)`
(Hessian-weighted merging), ``"average"`` gives every task weight :math:`1/T` (with equal
isotropic precisions: task arithmetic, :func:`task_arithmetic`).  Precisions are sum-scale,
:math:`p=\lambda(h+\delta)` (:attr:`DiagonalGaussian.precision`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Optional, Union, cast

import torch
from torch import Tensor

from .._enums import parse_enum
from ..errors import StateDictMismatchError
from .base import Entry
from .diagonal import DiagonalGaussian

__all__ = ["MergeWeights", "merge_posteriors", "task_arithmetic"]


class MergeWeights(str, enum.Enum):
    """How task posteriors are weighted: ``"precision"`` (eq. 31), ``"hessian"`` or ``"average"``."""

    PRECISION = "precision"
    HESSIAN = "hessian"
    AVERAGE = "average"


def _check_same(base: DiagonalGaussian, others: Sequence[DiagonalGaussian]) -> None:
    for i, q in enumerate(others):
        if q.names != base.names:
            missing = sorted(set(base.names) ^ set(q.names))[:3]
            raise StateDictMismatchError(f"posterior {i} covers different parameters than the base "
                                         f"(e.g. {missing}): merging needs one architecture")
        for n in base.names:
            if q.mean[n].shape != base.mean[n].shape:
                raise StateDictMismatchError(f"posterior {i}: {n} has shape {tuple(q.mean[n].shape)}, "
                                             f"the base {tuple(base.mean[n].shape)}: merging needs one architecture")


def merge_posteriors(base: DiagonalGaussian, posteriors: Sequence[DiagonalGaussian],
                     weights: Union[str, MergeWeights] = "precision") -> DiagonalGaussian:
    """Merge fine-tuned ``posteriors`` that share ``base`` as prior (eq. 31); float64 arithmetic.

    Returns a new :class:`DiagonalGaussian` (``ess=1``, ``weight_decay=0``, so its ``precision`` is
    :math:`p_{mrg}` exactly) with copied means, not bound to any module (``sampled(model)`` binds
    it by name).  Raises :class:`~vbpc.errors.StateDictMismatchError` for different architectures."""
    mode = parse_enum(MergeWeights, weights, "weights")
    posteriors = list(posteriors)
    if not posteriors:
        raise ValueError("merge_posteriors: no posterior to merge")
    _check_same(base, posteriors)
    p0s, m0s = base.precision, base.mean
    entries = []
    T = len(posteriors)
    for n in base.names:
        m0, p0 = m0s[n].double(), p0s[n].double()
        pts = [q.precision[n].double() for q in posteriors]
        dms = [q.mean[n].double() - m0 for q in posteriors]
        p_mrg = p0 + sum(p - p0 for p in pts)
        if mode is MergeWeights.PRECISION:
            if not bool((p_mrg > 0).all()):
                raise ValueError(f"{n}: merged precision p0 + Σ(p_t - p0) is not positive: the task posteriors "
                                 "are less certain than their prior; use weights='hessian' or 'average'")
            m = m0 + sum(p / p_mrg * d for p, d in zip(pts, dms))
        elif mode is MergeWeights.HESSIAN:
            hs = [(p - p0).clamp_min(0.0) for p in pts]
            total = cast(Tensor, sum(hs))
            safe = torch.where(total > 0, total, torch.ones_like(total))
            m = m0 + torch.where(total > 0, cast(Tensor, sum(h / safe * d for h, d in zip(hs, dms))),
                                 torch.zeros_like(m0))
            p_mrg = p0 + total
        else:
            m = m0 + sum(dms) / T
            p_mrg = p_mrg.clamp_min(torch.finfo(torch.float64).tiny)
        dtype = m0s[n].dtype
        entries.append(Entry(n, m.to(dtype), p_mrg.to(torch.promote_types(dtype, torch.float32)), 1.0, 0.0))
    return DiagonalGaussian(entries)


def task_arithmetic(base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]],
                    scale: Optional[float] = None) -> dict[str, Tensor]:
    r""":math:`\theta_0+\alpha\sum_t(\theta_t-\theta_0)` over the keys of ``base`` (``scale`` α defaults
    to :math:`1/T`, the equal-precision case of eq. 31)."""
    if not finetuned:
        raise ValueError("task_arithmetic: no fine-tuned model given")
    alpha = 1.0 / len(finetuned) if scale is None else float(scale)
    out = {}
    for k, v in base.items():
        missing = [i for i, f in enumerate(finetuned) if k not in f or f[k].shape != v.shape]
        if missing:
            raise StateDictMismatchError(f"task_arithmetic: model {missing[0]} has no matching {k!r}")
        out[k] = v + alpha * sum(f[k] - v for f in finetuned)
    return out
