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

__all__ = ["pretrained_posterior", "cycle", "Curvature", "PreMean", "CURVATURES", "PRE_MEANS", "price_curvature",
           "mean_gradient", "laplace_posterior", "newton_mean", "converge_hessian"]


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


# ============================================================================ old posteriors (§8)
@torch.no_grad()
def price_curvature(params: list[Tensor], loss_fn: Callable[[Any], Tensor], data: Iterable[Any], *,
                    means: list[Tensor], sigma: list[Tensor], mc_samples: int = 1, seed: int = 0,
                    names: Optional[list[str]] = None, model: Optional[nn.Module] = None,
                    progress: bool = False) -> tuple[list[Tensor], int, int]:
    r"""The mean diagonal Hessian of ``data`` under :math:`q=\mathcal N(m,\mathrm{diag}(\sigma^2))` by
    antithetic Price pairs (eq. 5 at :math:`m\pm\sigma\odot z`, chunks weighted by size, as eq. 30):

    .. math:: \bar h(q)=\mathrm{mean}_C\,\tfrac1{2S}\textstyle\sum_{s\le S}\big(z_s\odot\nabla\bar\ell_C(m+\sigma
        z_s)-z_s\odot\nabla\bar\ell_C(m-\sigma z_s)\big)/\sigma

    The one estimator of both :meth:`vbpc.ContinualIVON.set_memory_curvature` (the memory under
    :math:`q_{old}`) and :func:`laplace_posterior` (the data part of :math:`p_{old}`), so the two
    agree (docs/algorithms.md §8).  ``z`` comes from a generator seeded with ``seed``; the global RNG
    and ``params`` are left unchanged.  Returns ``(h̄, passes, gradient evaluations)``."""
    if not (isinstance(mc_samples, int) and not isinstance(mc_samples, bool) and mc_samples >= 1):
        raise ValueError(f"mc_samples must be an int >= 1, got {mc_samples!r}")
    probe = Anchor(params, seed=seed)
    passes = probe.refresh(loss_fn, data, scale=sigma, hessian=True, refresh_mc=mc_samples, antithetic=True,
                           means=means, names=names or [f"params[{i}]" for i in range(len(params))], model=model,
                           progress=progress)
    assert probe.hess is not None
    hs = [h.to(m.device, m.dtype) for h, m in zip(probe.hess, means)]
    return hs, passes, probe.examples * 2 * mc_samples


@torch.no_grad()
def mean_gradient(params: list[Tensor], loss_fn: Callable[[Any], Tensor], data: Iterable[Any], *,
                  means: list[Tensor], sigma: list[Tensor], mc_samples: int = 1, seed: int = 0,
                  names: Optional[list[str]] = None, model: Optional[nn.Module] = None,
                  progress: bool = False) -> list[Tensor]:
    r"""The mean gradient :math:`\bar g(q)=\mathbb E_q[\nabla\bar\ell_{\mathcal D}]` of ``data`` under
    :math:`q=\mathcal N(m,\mathrm{diag}(\sigma^2))`, by antithetic pairs :math:`m\pm\sigma\odot z` (chunks
    weighted by size; the draws of :func:`price_curvature` with the same ``seed``).  The global RNG and
    ``params`` are left unchanged."""
    if not (isinstance(mc_samples, int) and not isinstance(mc_samples, bool) and mc_samples >= 1):
        raise ValueError(f"mc_samples must be an int >= 1, got {mc_samples!r}")
    probe = Anchor(params, seed=seed)
    probe.refresh(loss_fn, data, scale=sigma, refresh_mc=mc_samples, antithetic=True, means=means,
                  names=names or [f"params[{i}]" for i in range(len(params))], model=model, progress=progress)
    assert probe.grad is not None
    return [g.to(m.device, m.dtype) for g, m in zip(probe.grad, means)]


@torch.no_grad()
def laplace_posterior(posterior: DiagonalGaussian, prior: DiagonalGaussian, model: nn.Module,
                      loss_fn: Callable[[Any], Tensor], data: Iterable[Any], *, data_size: float,
                      terms: Iterable[tuple[float, list[Tensor]]] = (), floor: bool = False, mc_samples: int = 4,
                      seed: int = 0, progress: bool = False) -> tuple[DiagonalGaussian, int]:
    r"""An old posterior that is a posterior: a curvature pass at the final mean (docs/algorithms.md §8)

    .. math:: m_{old}=m,\qquad p_{old}=\max\big(\lambda\delta,\ p_{prior}+N\max(0,\bar h_{\mathcal D}(q))
        +\textstyle\sum_k w_k d_k\big)

    with :math:`\bar h_{\mathcal D}(q)` from :func:`price_curvature` over ``data`` (``N=data_size``
    examples) at the learner's final :math:`q=(m,\sigma)` (``posterior``), :math:`p_{prior}` the
    precision of the task's prior and ``terms`` extra weighted curvatures (the replay correction's
    :math:`N_{old}[\bar h_{\mathcal M}(q)-\bar h_{\mathcal M}(q_{old})]`,
    :meth:`vbpc.ContinualIVON.laplace_posterior`).  IVON's own precision :math:`\lambda(h+\delta)` is
    an EMA that after one epoch at β2 = 0.999 has barely left :math:`h_0`; this pass gives the
    precision the next task's correction (29) assumes (:math:`q_{old}` a fixed point).  With
    ``terms=()`` and :math:`p_{prior}` the previous task's :math:`p_{old}` it is online Laplace (EWC).
    ``floor`` keeps at least the learner's own precision :math:`p_q` (off by default): IVON's EMA lags
    behind the data curvature in both directions, below it where the curvature is large (what destabilises
    (29)) and above it where the data are flat (:math:`h_0`).  A weak prior alone leaves
    :math:`\sigma\approx1/\sqrt{\lambda\delta}` in flat directions (≈3 for an MLP with δ=1e-4, which ruins the
    BMA and the next task's samples) [vbpc, measured]; the continual workflow therefore starts from IVON's
    initial posterior :math:`\lambda(h_0+\delta)` as :math:`p_{prior}` of the first task (the online-Laplace prior).
    Returns the posterior (``ess``/``weight_decay`` of ``posterior``; bound to ``model``) and the
    number of entries clamped at :math:`\lambda\delta`."""
    if not (data_size >= 0 and math.isfinite(data_size)):
        raise ValueError(f"invalid data_size={data_size!r}: must be finite and >= 0")
    names = [e.name for e in posterior._entries]
    by_name = {e.name: e for e in prior._entries}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"the prior has no entry for {missing[0]!r}")
    named = dict(model.named_parameters())
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"{missing[0]!r} is not a parameter of model")
    params: list[Tensor] = [named[n] for n in names]
    means = [e.mean.detach() for e in posterior._entries]
    sigma = [e.precision().rsqrt_() for e in posterior._entries]
    h_bar, _, _ = price_curvature(params, loss_fn, data, means=means, sigma=sigma, mc_samples=mc_samples, seed=seed,
                                  names=names, model=model, progress=progress)
    extra = list(terms)
    entries, clamped = [], 0
    for i, e in enumerate(posterior._entries):
        p = by_name[e.name].precision().to(h_bar[i]) + data_size * h_bar[i].clamp(min=0.0)
        for w, d in extra:
            p = p + w * d[i].to(p)
        if floor:
            p = torch.maximum(p, e.precision().to(p))
        hess = p.div_(e.ess).sub_(e.weight_decay)
        clamped += int((hess < 0).sum())
        entries.append(Entry(e.name, e.mean.detach().clone(), hess.clamp_(min=0.0), e.ess, e.weight_decay))
    return DiagonalGaussian(entries).bind(model), clamped


@torch.no_grad()
def newton_mean(posterior: DiagonalGaussian, residual: list[Tensor]) -> DiagonalGaussian:
    r"""The old posterior as the fixed point that (29) assumes: one Newton step on the mean,

    .. math:: \hat m_{old}=m_{old}-r/p_{old}

    with :math:`r` the gradient of the learner's objective at :math:`m_{old}` (sum scale,
    :meth:`vbpc.ContinualIVON.residual`) and :math:`p_{old}` the posterior's precision (the diagonal curvature
    of that objective).  As the next task's prior, with the anchor of the replay correction kept at
    :math:`q_{old}` (``ContinualIVON(prior=newton_mean(q_old, r), anchor=q_old)``), the prior term
    :math:`\delta_v\odot(m-\hat m_{old})=\delta_v\odot(m-m_{old})+r/\lambda` restores the old objective's
    gradient :math:`r` at :math:`m_{old}`, which the correction, subtracting :math:`\bar g_{\mathcal M}(q_{old})`
    as if :math:`q_{old}` were a fixed point, drops otherwise; the dropped gradients accumulate over the tasks
    (docs/algorithms.md §8).  Same names, precisions and scales as ``posterior`` (unbound)."""
    if len(residual) != len(posterior._entries):
        raise ValueError(f"residual has {len(residual)} tensors, the posterior {len(posterior._entries)}")
    entries = []
    for e, r in zip(posterior._entries, residual):
        if tuple(r.shape) != tuple(e.mean.shape):
            raise ValueError(f"residual for {e.name!r} has shape {tuple(r.shape)}, the mean {tuple(e.mean.shape)}")
        mean = e.mean.detach() - r.to(e.mean) / e.precision().to(e.mean)
        entries.append(Entry(e.name, mean, e.hess.detach().clone(), e.ess, e.weight_decay))
    return DiagonalGaussian(entries)


def converge_hessian(opt: Any, run_epoch: Callable[[], Any], *, tol: float = 0.01, max_epochs: int = 20) -> int:
    r"""Continue IVON epochs until :math:`h` has converged: stop after the first epoch with
    :math:`\lVert h_{after}-h_{before}\rVert_2/\lVert h_{before}\rVert_2<` ``tol`` (all tensors
    together; for :class:`vbpc.ContinualIVON` the data part :math:`h`, without the prior's
    :math:`\delta_v`), or after ``max_epochs``; returns the epochs run.  ``run_epoch()`` runs one epoch of
    ``opt.step`` calls.  At β2 = 0.999 an epoch of ~80 steps moves :math:`h` only ~8% toward its
    target, so the criterion is met late (or not at all within ``max_epochs``): the curvature pass
    (:func:`laplace_posterior`) is the cheaper way to a consistent old posterior (docs/algorithms.md §8)."""
    if not (tol > 0 and isinstance(max_epochs, int) and max_epochs >= 1):
        raise ValueError(f"converge_hessian needs tol > 0 and max_epochs >= 1 (got {tol!r}, {max_epochs!r})")
    groups = [(p, float(g["weight_decay"])) for g in opt.param_groups for p in g["params"]
              if p in opt.state and "hess" in opt.state[p]]
    if not groups:
        raise ValueError("converge_hessian: the learner has no IVON state yet; run at least one step first")

    def data_h(p: Tensor, wd: float) -> Tensor:
        """h itself: ContinualIVON's state is h + δ_v − δ (the prior part would dilute the criterion)."""
        st = opt.state[p]
        h = st["hess"].detach().to(torch.float64, copy=True)
        return h - st["prior_delta"].double() + wd if "prior_delta" in st else h

    for epoch in range(1, max_epochs + 1):
        before = [data_h(p, wd) for p, wd in groups]
        run_epoch()
        num = sum(float((data_h(p, wd) - b).square().sum()) for (p, wd), b in zip(groups, before))
        den = sum(float(b.square().sum()) for b in before)
        if math.sqrt(num) < tol * math.sqrt(den):
            return epoch
    return max_epochs
