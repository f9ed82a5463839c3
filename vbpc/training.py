"""Small, reusable training and evaluation loops (shared by the examples and the tests).

:func:`train_epoch` works with any ``torch.optim.Optimizer`` whose ``step`` accepts a
closure; with :class:`vbpc.IVON` the closure is evaluated once per Monte-Carlo weight
sample.  :func:`evaluate` scores a classifier either at its current (mean) weights or by
Bayesian model averaging over samples of a :class:`vbpc.GaussianPosterior`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from tqdm.auto import tqdm

from .data.loading import make_loader  # re-exported: the one loader factory lives in vbpc.data
from .posterior import GaussianPosterior
from .predictive import predict

__all__ = ["evaluate", "make_loader", "train_epoch", "warmup_cosine", "warmup_cosine_scheduler"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train_epoch(
    model: nn.Module,
    optimizer: Optimizer,
    loader: Iterable[tuple[Tensor, Tensor]],
    loss_fn: LossFn,
    progress: bool = True,
    *,
    desc: str = "train",
    scheduler: Optional[Any] = None,
) -> float:
    """Train ``model`` for one pass over ``loader`` and return the mean training loss.

    Each batch ``(x, y)`` is moved to the model's device and passed to
    ``optimizer.step(closure)``, where ``closure`` zeroes the gradients, computes
    ``loss_fn(model(x), y)`` (a mean loss), calls ``backward`` and returns the loss.  For
    :class:`vbpc.IVON` the returned loss is the average over its MC samples, i.e. at
    *sampled* weights.  The mean is weighted by batch size.  ``progress`` shows a tqdm bar;
    ``scheduler`` (a ``torch.optim.lr_scheduler``) is stepped after every batch.
    """
    model.train()
    device = _device(model)
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True, mininterval=0.5)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last: list[Tensor] = []

        def closure() -> Tensor:  # called within this iteration: x, y and last are this batch's
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            last.append(loss.detach())
            return loss

        # torch types a closure as returning a float; every optimizer takes the loss tensor
        out = optimizer.step(closure)  # type: ignore[arg-type]
        if scheduler is not None:
            scheduler.step()
        loss_val = float(torch.as_tensor(out).detach() if out is not None else last[-1])
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"non-finite training loss {loss_val} after {count} examples")
        total += loss_val * len(y)
        count += len(y)
        if progress:
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    bar.close()
    if count == 0:
        raise ValueError("train_epoch: the loader yielded no batch")
    return total / count


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    posterior: Optional[GaussianPosterior] = None,
    n_samples: int = 0,
    *,
    generator: Optional[torch.Generator] = None,
) -> dict[str, float]:
    r"""Accuracy and negative log-likelihood of a classifier on ``loader``.

    Without ``posterior`` (or with ``n_samples == 0``) the model is scored at its current
    weights (for a :class:`vbpc.IVON`-trained model: the posterior mean).  Otherwise each
    batch is scored by Bayesian model averaging over ``n_samples`` weight samples
    :math:`\theta_s\sim q` loaded in place with ``posterior.sampled(model)`` (bound by name,
    or by identity for a posterior that already points at ``model``'s parameters).
    ``generator`` must live on the parameters' device.

    .. math::
        \bar p(y\mid x) = \frac1S\sum_s \mathrm{softmax}(f_{\theta_s}(x))_y,\qquad
        \mathrm{NLL} = -\frac1N\sum_i \log\bar p(y_i\mid x_i),

    computed stably as a log-sum-exp of log-softmax values by :func:`vbpc.predictive.predict`.  Accuracy uses
    :math:`\arg\max_y\bar p(y\mid x)`.  The model runs in eval mode (restored afterwards)
    and its parameters are restored bit for bit after every sample.

    Returns:
        ``{"accuracy": float, "nll": float}``.
    """
    if posterior is not None and n_samples == 0:
        raise ValueError("evaluate: a posterior was given but n_samples == 0; pass n_samples >= 1 for BMA")
    try:
        pred = predict(model, loader, posterior, n_samples, generator=generator)
    except ValueError as exc:
        raise ValueError(f"evaluate: {exc}") from None
    if pred.labels is None:
        raise ValueError("evaluate: the loader yielded no labels")
    logp, y = pred.log_probs, pred.labels
    nll = float(F.nll_loss(logp.double(), y, reduction="mean"))
    return {"accuracy": float((logp.argmax(dim=-1) == y).double().mean()), "nll": nll}


def warmup_cosine(step: int, warmup: int, total: int, cosine: bool = True) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``
    (``cosine=False``: constant 1 after the warm-up)."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def warmup_cosine_scheduler(optimizer: Optimizer, warmup: int, total: int,
                            cosine: bool = True) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping :func:`warmup_cosine` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total, cosine))
