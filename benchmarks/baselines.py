"""Post-hoc and reference baselines for the uncertainty study, each from a kept library where one exists:

* :func:`fit_temperature`: temperature scaling (Guo et al., 2017), one scalar T > 0 fitted by
  minimising the validation NLL of ``softmax(logits / T)`` (float64 L-BFGS over log T);
* :func:`laplace_last_layer`: last-layer KFAC Laplace from **laplace-torch** on a trained network,
  prior precision from the marginal likelihood, probit predictive (not reimplemented here);
* :func:`ece_cross_check`: vbpc's ECE against torchmetrics' ``MulticlassCalibrationError`` on the
  same predictions; raises on a disagreement above ``tol`` (the study fails rather than reports
  a number two libraries disagree on).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vbpc.metrics import ece

__all__ = ["fit_temperature", "laplace_last_layer", "ece_cross_check"]


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` on (validation) ``logits``, ``labels``."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError("fit_temperature takes logits (N, C) and labels (N,)")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("fit_temperature: the logits hold NaN or inf")
    z, y = logits.detach().double(), labels.detach().long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss
    opt.step(closure)
    t = float(log_t.exp())
    if not (math.isfinite(t) and t > 0):
        raise RuntimeError(f"temperature scaling did not converge (T = {t})")
    return t


def ece_cross_check(probs: Tensor, labels: Tensor, n_bins: int = 15, tol: float = 1e-5,
                    ece_fn: Optional[Callable[[Tensor, Tensor], float]] = None) -> float:
    """vbpc's ECE of ``probs`` (N, C); raises ``RuntimeError`` when torchmetrics' L1 calibration error with
    the same equal-width bins differs by more than ``tol``."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    ours = float(ece(probs, labels, n_bins) if ece_fn is None else ece_fn(probs, labels))
    theirs = float(multiclass_calibration_error(probs.double(), labels.long(), num_classes=probs.shape[1],
                                                n_bins=n_bins, norm="l1"))
    if not abs(ours - theirs) <= tol:
        raise RuntimeError(f"ECE disagreement: vbpc {ours:.8f} against torchmetrics {theirs:.8f} "
                           f"(|diff| {abs(ours - theirs):.2e} > {tol:g})")
    return ours


def laplace_last_layer(model: nn.Module, train_loader: Iterable[Any]) -> tuple[Callable[[Tensor], Tensor], float]:
    """Fit laplace-torch's last-layer KFAC Laplace of ``model`` (a trained classifier returning logits) on
    ``train_loader`` and tune the prior precision by the marginal likelihood.  Returns
    ``(predict, prior_precision)``; ``predict(x)`` gives the probit-approximated predictive probabilities."""
    from laplace import Laplace

    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik")
    prior = float(la.prior_precision.mean())

    @torch.no_grad()
    def predict(x: Tensor) -> Tensor:
        return la(x, pred_type="glm", link_approx="probit")

    return predict, prior
