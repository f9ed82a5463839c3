r"""Diagonal curvature passes of the knowledge-adaptation workflows (docs/algorithms.md §8): the
anchored posterior of a pretrained network (eq. 30) and the replay-memory iterator.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._enums import parse_enum
from ..posterior import DiagonalGaussian, Entry
from .poco import Anchor, batch_size_of

__all__ = ["pretrained_posterior", "cycle", "Curvature", "PreMean", "CURVATURES", "PRE_MEANS"]


class Curvature(str, enum.Enum):
    """The curvature pass of eq. (30)."""

    PRICE = "price"
    GRADSQ = "gradsq"
    FISHER = "fisher"


class PreMean(str, enum.Enum):
    """The anchored mean of eq. (30): the pretrained weights or one Newton step (the exact (13))."""

    PRETRAINED = "pretrained"
    NEWTON = "newton"


CURVATURES = tuple(c.value for c in Curvature)
PRE_MEANS = tuple(c.value for c in PreMean)


# ============================================================================ eq. (30)
@torch.no_grad()
def pretrained_posterior(
    model: nn.Module,
    loss_fn: Callable[[Any], Tensor],
    data: Iterable[Any],
    *,
    ess: float,
    hess_init: float = 1.0,
    weight_decay: float = 1e-4,
    curvature: str = "price",
    mean: str = "pretrained",
    antithetic: bool = True,
    mc_samples: int = 1,
    max_examples: Optional[int] = None,
    logits_fn: Optional[Callable[[Any], Tensor]] = None,
    seed: int = 0,
    progress: bool = True,
) -> DiagonalGaussian:
    r"""The anchored posterior of a pretrained network, eq. (30):

    .. math::
        \bar h_{pre}=\max(0,\mathrm{mean}_C\hat h_C),\quad p_{pre}=\lambda_{pre}(\bar h_{pre}+\delta),\quad
        \hat m_{pre}=\theta_{pre}\ \ \big(\texttt{"newton"}:\ \theta_{pre}-\tfrac{\bar g_{pre}+\delta\theta_{pre}}
        {\bar h_{pre}+\delta}\big)

    ``curvature``: ``"price"`` (eq. 5 at :math:`\sigma_c=1/\sqrt{\lambda_{pre}(h_0+\delta)}`, antithetic
    :math:`\pm z` pairs by default), ``"gradsq"`` (:math:`|C|\,\hat g_C^2`, the batch estimate of the
    empirical Fisher per example) or ``"fisher"`` (per-example MC Fisher with labels drawn from the
    model's softmax; needs ``logits_fn(batch) -> logits``; one backward per example: small models).
    Chunks are weighted by size (exact example means).  Returns a posterior with
    ``ess=λ_pre``, ``weight_decay=δ``, bound to ``model``; the model is left unchanged and the
    global RNG untouched."""
    curv = parse_enum(Curvature, curvature, "curvature")
    mean_at = parse_enum(PreMean, mean, "mean")
    if not (0 < ess < math.inf and 0 < hess_init < math.inf and 0 <= weight_decay < math.inf):
        raise ValueError(f"need finite ess > 0, hess_init > 0, weight_decay >= 0 (got {ess}, {hess_init}, "
                         f"{weight_decay})")
    if not (isinstance(mc_samples, int) and not isinstance(mc_samples, bool) and mc_samples >= 1):
        raise ValueError(f"pretrained_posterior needs mc_samples >= 1 draws, got {mc_samples!r} (with none the "
                         "curvature would come out all zeros)")
    if curv is Curvature.FISHER and logits_fn is None:
        raise ValueError("curvature='fisher' needs logits_fn(batch) -> logits (classification)")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params: list[Tensor] = [p for _, p in named]
    names = [n for n, _ in named]
    anchor = Anchor(params, seed=seed)
    if curv is Curvature.PRICE:
        sigma_c = 1.0 / math.sqrt(ess * (hess_init + weight_decay))
        anchor.refresh(loss_fn, data, scale=[torch.full_like(p, sigma_c) for p in params], hessian=True,
                       refresh_mc=mc_samples, antithetic=antithetic, names=names, model=model,
                       max_examples=max_examples, progress=progress)
        g_bar, h_bar = anchor.grad, anchor.hess
    else:
        gen = anchor.generator

        def evaluate(batch: Any) -> tuple[list[Tensor], list[Tensor], int]:
            with torch.enable_grad():
                loss = loss_fn(batch)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            g = [torch.zeros_like(p) if x is None else x.detach() for p, x in zip(params, grads)]
            if curv is Curvature.GRADSQ:
                b = batch_size_of(batch)
                return g, [x.square() * b for x in g], 1
            h = [torch.zeros_like(p) for p in params]
            with torch.enable_grad():
                logits = logits_fn(batch)  # type: ignore[misc]
                probs = F.softmax(logits.detach().float(), -1)
                y = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)
                per = F.cross_entropy(logits, y, reduction="none")
                for i in range(per.shape[0]):
                    gi = torch.autograd.grad(per[i], params, retain_graph=i + 1 < per.shape[0], allow_unused=True)
                    for acc, x in zip(h, gi):
                        if x is not None:
                            acc.add_(x.square(), alpha=1.0 / per.shape[0])
            return g, h, 1 + per.shape[0]

        g_bar, h_bar, _, _ = anchor.accumulate(evaluate, data, names=names, model=model,
                                               max_examples=max_examples, progress=progress)
    assert g_bar is not None and h_bar is not None
    entries = []
    for n, p, g, h in zip(names, params, g_bar, h_bar):
        hb = h.clamp(min=0.0).to(torch.promote_types(p.dtype, torch.float32))
        m = p.detach().to(hb.dtype, copy=True)
        if mean_at is PreMean.NEWTON:
            m = m - (g.to(hb) + weight_decay * m) / (hb + weight_decay)
        entries.append(Entry(n, m, hb, float(ess), float(weight_decay)))
    post = DiagonalGaussian(entries)
    return post.bind(model)


def cycle(batches: Iterable[Any]) -> Iterable[Any]:
    """Cycle an iterable of replay-memory batches forever, pairing one with every new batch;
    raises on an empty memory (the correction cannot be estimated from nothing)."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("the replay memory is empty: the posterior correction needs at least one example")
