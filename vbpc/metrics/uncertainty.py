r"""Uncertainty decomposition of a Bayesian model average (docs/algorithms.md §9, eq. 35).

From a **sample-first** stack ``(S, N, C)`` of per-sample predictive distributions
:math:`p_s` (torch-uncertainty uses ``(B, N, C)`` instead), in nats, with :math:`0\log0=0`
via ``xlogy``:

.. math::
    \mathcal H[\bar p]=-\textstyle\sum_c\bar p_c\log\bar p_c,\qquad
    \text{aleatoric}=\tfrac1S\sum_s\mathcal H[p_s],\qquad
    \mathrm{MI}=\mathcal H[\bar p]-\text{aleatoric}\ \ (\text{clamped at }0).\tag{35}
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor

from ._checks import Inputs, check_stack, to_probs

__all__ = ["Uncertainty", "entropy", "uncertainty_decomposition"]


class Uncertainty(NamedTuple):
    """Per-example uncertainties (eq. 35), float64 ``(N,)`` each: ``total`` :math:`\\mathcal H[\\bar p]`,
    ``aleatoric`` :math:`\\frac1S\\sum_s\\mathcal H[p_s]`, ``epistemic`` the mutual information."""

    total: Tensor
    aleatoric: Tensor
    epistemic: Tensor


def entropy_of(probs: Tensor) -> Tensor:
    r""":math:`-\sum_c p_c\log p_c` over the last dimension (``xlogy``: :math:`0\log 0=0`)."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def decompose(sample_probs: Tensor, probs: Optional[Tensor] = None) -> Uncertainty:
    """Eq. (35) on validated float64 tensors; ``probs`` defaults to the stack's mean."""
    p_bar = sample_probs.mean(0) if probs is None else probs
    total = entropy_of(p_bar)
    aleatoric = entropy_of(sample_probs).mean(0)
    return Uncertainty(total, aleatoric, (total - aleatoric).clamp_min(0.0))


def entropy(pred: Any, *, inputs: Union[str, Inputs] = "probs") -> Tensor:
    r"""Predictive entropy :math:`\mathcal H[\bar p]` (eq. 35) per example, float64 ``(N,)``."""
    probs, _ = to_probs(pred, inputs, "pred")
    return entropy_of(probs)


def uncertainty_decomposition(sample_stack: Any, pred: Optional[Any] = None, *,
                              inputs: Union[str, Inputs] = "probs") -> Uncertainty:
    r"""Total / aleatoric / epistemic uncertainty (eq. 35) from a sample stack ``(S, N, C)``.

    Args:
        sample_stack: per-sample predictions, sample-first ``(S, N, C)``, of kind ``inputs``.
        pred: the predictive :math:`\bar p` ``(N, C)`` (e.g. from the logsumexp of eq. 33); the
            stack's mean when omitted.  Its shape must match the stack's ``(N, C)``.
        inputs: ``"probs"``, ``"log_probs"`` or ``"logits"`` for both tensors.

    The mutual information is clamped at 0 (rounding, or a ``pred`` not exactly the stack mean).
    """
    if pred is None:
        probs = None
        stack = to_probs(sample_stack, inputs, "sample_stack", ndim=3)[0]
    else:
        probs, _ = to_probs(pred, inputs, "pred")
        stack = check_stack(sample_stack, inputs, probs.shape[0], probs.shape[1]).to(probs.device)
    return decompose(stack, probs)
