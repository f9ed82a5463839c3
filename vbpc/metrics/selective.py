r"""Selective prediction: risk–coverage curve and AURC (docs/algorithms.md §9).

Examples are sorted by confidence :math:`c_i=\max_c\bar p_{ic}` in **descending** order with a
stable sort (equal confidences keep their input order).  Answering only the :math:`k` most
confident examples gives coverage :math:`k/n` and selective risk

.. math::
    r_k=\tfrac1k\textstyle\sum_{j\le k}\mathbb 1[\hat y_{(j)}\ne y_{(j)}],\qquad
    \mathrm{AURC}=\tfrac1n\sum_{k=1}^n r_k .

Convention: the AURC is the plain mean of the :math:`n` risks (a right Riemann sum over coverages
:math:`1/n,\dots,1`), with no point at coverage 0 and no trapezoid.  Ties in confidence make the
curve depend on the input order; the stable sort makes it deterministic.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import Tensor

from ._checks import Inputs
from .classification import confidence_correct, prepare

__all__ = ["aurc", "risk_coverage_curve"]


def risks_from(confidence: Tensor, correct: Tensor) -> Tensor:
    """Selective risks :math:`r_1..r_n` of validated confidences and correctness flags."""
    order = torch.sort(confidence, descending=True, stable=True).indices
    errors = (~correct[order]).to(torch.float64).cumsum(0)
    return errors / torch.arange(1, confidence.numel() + 1, dtype=torch.float64, device=confidence.device)


def risk_coverage_curve(pred: Any, labels: Any, *, inputs: Union[str, Inputs] = "probs") -> tuple[Tensor, Tensor]:
    """``(coverage, risk)``, float64 ``(N,)`` each: coverage :math:`k/n` and the error rate among
    the :math:`k` most confident examples, :math:`k=1..n`."""
    probs, _, y = prepare(pred, labels, inputs)
    risk = risks_from(*confidence_correct(probs, y))
    n = risk.numel()
    return torch.arange(1, n + 1, dtype=torch.float64, device=risk.device) / n, risk


def aurc(pred: Any, labels: Any, *, inputs: Union[str, Inputs] = "probs") -> float:
    """Area under the risk–coverage curve: the mean of the selective risks over :math:`k=1..n`."""
    return float(risk_coverage_curve(pred, labels, inputs=inputs)[1].mean())
