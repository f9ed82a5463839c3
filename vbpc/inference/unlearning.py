r"""Unlearning by posterior correction (docs/algorithms.md §8, eq. 32).

A posterior :math:`q_{old}` trained on :math:`\mathcal D` holds one site per example.  Forgetting
:math:`\mathcal D_{rm}\subset\mathcal D` divides those sites out again,
:math:`q_{rm}\propto q_{old}/\prod_{j\in\mathcal D_{rm}}e^{-\hat\ell_{j|old}}`, where
:math:`\hat\ell_{j|old}` is example :math:`j`'s loss expanded to second order around :math:`q_{old}`
(expectations under :math:`q_{old}`, sum scale).  That is one Newton (influence-function) step:

.. math::
    S_{rm}=S_{old}-\sum_{j\in\mathcal D_{rm}}H_j,\qquad
    m_{rm}=m_{old}+S_{rm}^{-1}\sum_{j\in\mathcal D_{rm}}G_j,\qquad
    G_j=\mathbb E_{q_{old}}[\nabla\ell_j],\ H_j=\mathbb E_{q_{old}}[\nabla^2\ell_j]  \hfill (32)

For linear regression with exact Hessians this *is* the posterior of the retained data.  In the
diagonal family the precision is clamped at the prior's, :math:`S_{rm}\ge\lambda\delta` (a
forgotten example's curvature estimate can exceed what the posterior holds), and the clamped
entries are counted.  Optionally, corrected steps on a retained memory follow
(:func:`unlearn`'s ``retain_data``): they add the correction term of eq. (29) for the retained
sites, whose surrogates were formed at :math:`q_{old}` (docs/adaptation.md, "Unlearning").
"""

from __future__ import annotations

import enum
import hashlib
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._enums import parse_enum
from ..posterior import DiagonalGaussian, Entry, FullGaussian, GaussianPosterior, MeanEntry
from .poco import Anchor, batch_size_of

__all__ = ["unlearn", "Unlearned", "UnlearnCurvature", "forget_statistics", "newton_removal"]


class UnlearnCurvature(str, enum.Enum):
    """How :math:`\\sum_j H_j` of eq. (32) is estimated."""

    PRICE = "price"  #: diagonal: Price's estimator (eq. 5) under q_old, antithetic pairs; any loss
    GGN = "ggn"  #: diagonal: the exact per-example Gauss-Newton diagonal of softmax cross-entropy
    FISHER = "fisher"  #: diagonal: per-example Fisher with labels drawn from the model's softmax
    EXACT = "exact"  #: diagonal or full: the exact Hessian (d <= max_dim parameters)


@dataclass
class Unlearned:
    """What :func:`unlearn` returns."""

    posterior: GaussianPosterior  #: :math:`q_{rm}` (after the optional corrected steps)
    n_forget: int  #: examples divided out
    clamped: int  #: precision entries (diagonal) or eigenvalues (full) raised to the floor
    numel: int  #: parameters of the posterior
    grad_evals: int  #: per-example gradient evaluations spent (statistics pass + corrected steps)
    record: dict[str, Any] = field(default_factory=dict)  #: JSON summary, stored in checkpoints


# ----------------------------------------------------------------------------------- statistics
def _dense_hessian(loss: Tensor, params: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """The gradients and the (d, d) Hessian of a scalar ``loss`` over the row-major concatenation of
    ``params``."""
    grads = [torch.zeros_like(p) if g is None else g
             for p, g in zip(params, torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))]
    flat = torch.cat([g.reshape(-1) for g in grads])
    d = flat.numel()
    first = [g.detach() for g in grads]
    if not flat.requires_grad:  # a loss linear in every parameter
        return first, torch.zeros(d, d, dtype=torch.float64)
    eye = torch.eye(d, dtype=flat.dtype, device=flat.device)
    rows = torch.autograd.grad(flat, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
    return first, torch.cat([(torch.zeros(d, p.numel(), dtype=flat.dtype, device=flat.device) if r is None
                              else r.reshape(d, -1)) for p, r in zip(params, rows)], 1).double()


def _per_example_curvature(model: nn.Module, names: list[str], theta: dict[str, Tensor], x: Tensor,
                           kind: UnlearnCurvature, generator: torch.Generator) -> tuple[list[Tensor], int]:
    r"""Mean over the chunk of the per-example diagonal curvature of softmax cross-entropy at θ (already
    loaded into ``model``).

    ``ggn``: :math:`\mathrm{diag}(J^\top(\mathrm{diag}\,p-pp^\top)J)=\sum_c p_c\,(J^\top(e_c-p))^{\odot2}`
    (exact, C per-example backward passes); ``fisher``: :math:`(J^\top(p-e_y))^{\odot2}`, :math:`y\sim p`
    (one pass).  Returns the means and the number of per-example passes."""
    with torch.no_grad():
        probs = F.softmax(model(x).double(), -1)
    vs: list[tuple[Tensor, Optional[Tensor]]]
    if kind is UnlearnCurvature.FISHER:
        y = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
        vs = [(probs - F.one_hot(y, probs.shape[-1]).to(probs), None)]
    else:
        eye = torch.eye(probs.shape[-1], dtype=probs.dtype, device=probs.device)
        vs = [(eye[c] - probs, probs[:, c]) for c in range(probs.shape[-1])]
    out = _linear_squares(model, names, x, vs)
    if out is None:
        out = _vmap_squares(model, names, theta, x, vs)
    return out, len(vs)


def _linear_squares(model: nn.Module, names: list[str], x: Tensor,
                    vs: list[tuple[Tensor, Optional[Tensor]]]) -> Optional[list[Tensor]]:
    r"""The weighted mean squared per-example gradients :math:`\frac1B\sum_i w_i(J_i^\top v_i)^{\odot2}` when
    every tensor is the weight or bias of an ``nn.Linear`` called once on (B, in) inputs: per example the
    weight gradient is the outer product :math:`\gamma_i a_i^\top` of the output's gradient and the
    input, so its square is :math:`\gamma_i^{\odot2}(a_i^{\odot2})^\top` and the batch sum one matmul
    (no per-example gradient is formed).  ``None`` when the model does not have that form."""
    layers: dict[str, nn.Linear] = {}
    for n in names:
        path, _, leaf = n.rpartition(".")
        mod = model.get_submodule(path) if path else model
        if not isinstance(mod, nn.Linear) or leaf not in ("weight", "bias"):
            return None
        layers[path] = mod
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {p: [] for p in layers}

    def hook(path: str) -> Callable[..., None]:
        def record(mod: nn.Module, args: tuple, out: Tensor) -> None:
            seen[path].append((args[0].detach(), out))
        return record

    handles = [mod.register_forward_hook(hook(p)) for p, mod in layers.items()]
    try:
        with torch.enable_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    if any(len(v) != 1 or v[0][0].dim() != 2 for v in seen.values()):
        return None  # shared layers or sequence inputs: per-example squares do not factorise
    outs = [seen[p][0][1] for p in layers]
    if not all(o.requires_grad for o in outs):
        return None
    acc = {n: torch.zeros(model.get_parameter(n).shape, dtype=torch.float64, device=x.device) for n in names}
    b = x.shape[0]
    for v, weight in vs:
        gammas = torch.autograd.grad(logits, outs, grad_outputs=v.to(logits.dtype), retain_graph=True)
        for path, gam in zip(layers, gammas):
            g2 = gam.double().square()
            if weight is not None:
                g2 = g2 * weight.unsqueeze(1)
            if f"{path}.weight" in acc or (not path and "weight" in acc):
                a2 = seen[path][0][0].double().square()
                acc[f"{path}.weight" if path else "weight"].add_(g2.T @ a2, alpha=1.0 / b)
            key = f"{path}.bias" if path else "bias"
            if key in acc:
                acc[key].add_(g2.sum(0), alpha=1.0 / b)
    return [acc[n] for n in names]


def _vmap_squares(model: nn.Module, names: list[str], theta: dict[str, Tensor], x: Tensor,
                  vs: list[tuple[Tensor, Optional[Tensor]]]) -> list[Tensor]:
    """The same as :func:`_linear_squares` for any model, from per-example gradients (``torch.func``)."""
    from torch.func import functional_call, grad, vmap

    params = {n: theta[n].detach() for n in names}

    def contracted(ps: dict[str, Tensor], xi: Tensor, v: Tensor) -> Tensor:
        return (functional_call(model, ps, (xi.unsqueeze(0),)).squeeze(0) * v).sum()

    per_example = vmap(grad(contracted), in_dims=(None, 0, 0))
    out = [torch.zeros_like(params[n], dtype=torch.float64) for n in names]
    for v, weight in vs:
        g = per_example(params, x, v.to(x.dtype if x.is_floating_point() else torch.float32))
        for acc, n in zip(out, names):
            sq = g[n].double().square()
            if weight is not None:
                sq = sq * weight.reshape(-1, *([1] * (sq.dim() - 1)))
            acc.add_(sq.mean(0))
    return out


def forget_statistics(
    posterior: GaussianPosterior,
    model: nn.Module,
    loss_fn: Callable[[Any], Tensor],
    data: Iterable[Any],
    *,
    curvature: Union[str, UnlearnCurvature] = "price",
    mc_samples: int = 1,
    antithetic: bool = True,
    inputs: Callable[[Any], Tensor] = lambda batch: batch[0],
    seed: int = 0,
    progress: bool = False,
) -> tuple[list[Tensor], list[Tensor], int, int]:
    r"""Example means of :math:`\mathbb E_{q}[\nabla\ell_j]` and of the curvature over ``data``:
    ``(ḡ per tensor, h̄ per tensor (diagonal) or [H] (full, (d, d)), examples, gradient evaluations)``.

    ``loss_fn(batch)`` is the batch's *mean* loss.  θ is drawn from ``posterior`` ``mc_samples``
    times per chunk (as :math:`\pm` pairs with ``antithetic``; 0 = at the mean, the delta method,
    not for ``price``).  ``ggn``/``fisher`` need softmax cross-entropy logits from
    ``model(inputs(batch))`` (vectorised per-example gradients with :mod:`torch.func`, in eval mode).
    RNG-neutral; BatchNorm running statistics are restored."""
    curv = parse_enum(UnlearnCurvature, curvature, "curvature")
    full = isinstance(posterior, FullGaussian)
    if not isinstance(posterior, (DiagonalGaussian, FullGaussian)):
        raise TypeError(f"unlearning supports the diagonal and full families, got {type(posterior).__name__}")
    if full and curv is not UnlearnCurvature.EXACT:
        raise ValueError(f"curvature={curv.value!r} is diagonal; a FullGaussian needs curvature='exact'")
    if not (isinstance(mc_samples, int) and not isinstance(mc_samples, bool) and mc_samples >= 0):
        raise ValueError(f"mc_samples must be an int >= 0, got {mc_samples!r}")
    if curv is UnlearnCurvature.PRICE and mc_samples < 1:
        raise ValueError("curvature='price' estimates the Hessian from weight samples: mc_samples >= 1")
    if curv is UnlearnCurvature.EXACT and posterior.numel() > 5000:
        raise ValueError(f"curvature='exact' forms a dense ({posterior.numel()}, {posterior.numel()}) Hessian; "
                         "use 'ggn', 'fisher' or 'price' (diagonal) or a smaller scope")
    posterior.bind(model)
    entries = posterior._entries
    names = [e.name for e in entries]
    targets: list[Tensor] = [e.target for e in entries]  # type: ignore[misc]
    anchor = Anchor(targets, seed=seed)
    if curv is UnlearnCurvature.PRICE:
        assert isinstance(posterior, DiagonalGaussian)
        sigma = [e.precision().rsqrt() for e in posterior._entries]
        anchor.refresh(loss_fn, data, scale=sigma, hessian=True, refresh_mc=mc_samples,
                       antithetic=antithetic, means=[e.mean for e in entries], names=names, model=model,
                       progress=progress)
        assert anchor.grad is not None and anchor.hess is not None
        draws = mc_samples * (2 if antithetic else 1)
        return anchor.grad, anchor.hess, anchor.examples, draws * anchor.examples

    gen = anchor.generator
    mean = {e.name: e.mean.detach() for e in entries}

    def points() -> list[dict[str, Tensor]]:
        if mc_samples == 0:
            return [mean]
        out = []
        for _ in range(mc_samples):
            th = posterior.sample(gen)
            out.append(th)
            if antithetic:
                out.append({n: 2 * mean[n].to(th[n]) - th[n] for n in names})
        return out

    def evaluate(batch: Any) -> tuple[list[Tensor], list[Tensor], int]:
        pts = points()
        g_c = [torch.zeros_like(e.mean, dtype=torch.float64) for e in entries]
        h_c: list[Tensor] = ([torch.zeros(posterior.numel(), posterior.numel(), dtype=torch.float64)]
                             if full else [torch.zeros_like(e.mean, dtype=torch.float64) for e in entries])
        n = batch_size_of(batch)
        cost = len(pts) * n  # the gradient
        for th in pts:
            with posterior.sampled(model, theta=th):
                with torch.enable_grad():
                    loss = loss_fn(batch)
                    if curv is UnlearnCurvature.EXACT:
                        grads, hess = _dense_hessian(loss, targets)
                        cost += n * hess.shape[0]  # one Hessian-vector product per row
                    else:
                        grads = list(torch.autograd.grad(loss, targets, allow_unused=True))
                if curv is UnlearnCurvature.EXACT:
                    if full:
                        h_c[0].add_(hess, alpha=1.0 / len(pts))
                    else:
                        diag, o = hess.diagonal(), 0
                        for acc, t in zip(h_c, targets):
                            acc.add_(diag[o:o + t.numel()].reshape(t.shape), alpha=1.0 / len(pts))
                            o += t.numel()
                else:
                    was = model.training
                    model.eval()
                    try:
                        per, extra = _per_example_curvature(model, names, th, inputs(batch), curv, gen)
                    finally:
                        model.train(was)
                    for acc, h in zip(h_c, per):
                        acc.add_(h, alpha=1.0 / len(pts))
                    cost += extra * n
            for acc, g, t in zip(g_c, grads, targets):
                if g is not None:
                    acc.add_(g.double().reshape(t.shape), alpha=1.0 / len(pts))
        return g_c, h_c, cost

    g_bar, h_bar, evals, seen = anchor.accumulate(evaluate, data, names=names, model=model, progress=progress)
    assert h_bar is not None
    return g_bar, h_bar, seen, evals


# --------------------------------------------------------------------------------- eq. (32)
@torch.no_grad()
def newton_removal(
    posterior: GaussianPosterior,
    grad_sum: list[Tensor],
    hess_sum: list[Tensor],
    *,
    floor: Optional[float] = None,
    clamped_mean: str = "keep",
) -> tuple[GaussianPosterior, int]:
    r"""Eq. (32) from the sums :math:`\sum_jG_j` and :math:`\sum_jH_j`: a new posterior (copies) and the
    number of clamped entries.

    Diagonal: :math:`S_{rm}=\max(S_{old}-\sum H_j,\ \lambda\delta)` per entry (the prior precision;
    ``floor`` overrides it), kept in the ``(ess, hess, weight_decay)`` form with the same λ and δ.  Where
    the clamp acts, the forget set's curvature exceeds what the posterior holds and the quadratic model
    is not trusted: ``clamped_mean="keep"`` (default) leaves the mean there, ``"newton"`` takes the
    step :math:`\sum_jG_j/(\lambda\delta)` anyway (measured to wreck a network when a few entries clamp).
    Full: eigenvalues of :math:`S_{old}-\sum H_j` below ``floor`` are raised to it (without
    ``floor`` a non-positive-definite result is refused)."""
    if clamped_mean not in ("keep", "newton"):
        raise ValueError(f"invalid clamped_mean={clamped_mean!r}; expected 'keep' or 'newton'")
    if isinstance(posterior, DiagonalGaussian):
        entries, clamped = [], 0
        for e, g, h in zip(posterior._entries, grad_sum, hess_sum):
            s_old = e.precision().double()
            low = e.ess * e.weight_decay if floor is None else float(floor)
            s_rm = s_old - h.double()
            under = s_rm < low
            if not low > 0 and bool((s_rm <= 0).any()):
                raise ValueError(f"{e.name}: eq. (32) left a precision <= 0 and the floor ess*weight_decay is {low} "
                                 "(a posterior without a prior part); pass floor= (a positive prior precision)")
            clamped += int(under.sum())
            s_rm = torch.where(under, torch.full_like(s_rm, low), s_rm)
            step = g.double() / s_rm
            if clamped_mean == "keep":
                step = torch.where(under, torch.zeros_like(step), step)
            m_rm = e.mean.double() + step
            dtype = e.hess.dtype
            entries.append(Entry(e.name, m_rm.to(e.mean.dtype), (s_rm / e.ess - e.weight_decay).to(dtype),
                                 float(e.ess), float(e.weight_decay)))
        return DiagonalGaussian(entries), clamped
    if isinstance(posterior, FullGaussian):
        (h,) = hess_sum
        s_rm = posterior.precision - h.double()
        s_rm = 0.5 * (s_rm + s_rm.T)
        clamped = 0
        evals, vecs = torch.linalg.eigh(s_rm)
        low = 0.0 if floor is None else float(floor)
        if floor is None and not bool((evals > 0).all()):
            raise ValueError(f"eq. (32) left the full precision indefinite (smallest eigenvalue {float(evals[0]):.3g}):"
                             " the forgotten examples' curvature exceeds the posterior's; pass floor= (e.g. the "
                             "prior precision) to clamp the eigenvalues")
        if floor is not None:
            under = evals < low
            clamped = int(under.sum())
            if clamped:
                s_rm = (vecs * evals.clamp(min=low)) @ vecs.T
                s_rm = 0.5 * (s_rm + s_rm.T)
        g = torch.cat([t.double().reshape(-1) for t in grad_sum])
        step = torch.cholesky_solve(g.unsqueeze(1), torch.linalg.cholesky(s_rm)).squeeze(1)
        flat = posterior._flat_mean() + step
        means = posterior._unflatten(flat)
        out = FullGaussian([MeanEntry(e.name, means[e.name].to(e.mean.dtype)) for e in posterior._entries], s_rm,
                           max_dim=posterior.max_dim)
        return out, clamped
    raise TypeError(f"unlearning supports the diagonal and full families, got {type(posterior).__name__}")


# ------------------------------------------------------------------------------------- unlearn
def _index_list(index: Any, what: str) -> list[int]:
    t = torch.as_tensor(index)
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{what} must be a 1-D sequence of integer example indices")
    return [int(i) for i in t.tolist()]


def check_forget_index(forget_index: Any, train_index: Any = None) -> list[int]:
    """Check a forget set's example indices against the training data's: returns them, de-duplicated
    (warns about repeats, which would divide a site out twice), and warns about indices that are not in
    ``train_index`` (an int ``n`` means ``range(n)``): their sites were never multiplied in."""
    idx = _index_list(forget_index, "forget_index")
    unique = list(dict.fromkeys(idx))
    if len(unique) < len(idx):
        warnings.warn(f"forget_index repeats {len(idx) - len(unique)} example(s): each example is divided out "
                      "once; remove the repeats from forget_data too", stacklevel=3)
    if train_index is not None:
        if isinstance(train_index, int):
            outside = [i for i in unique if not 0 <= i < train_index]
        else:
            known = set(_index_list(train_index, "train_index"))
            outside = [i for i in unique if i not in known]
        if outside:
            warnings.warn(f"{len(outside)} of {len(unique)} forget examples are not in the training data (e.g. index "
                          f"{outside[0]}): the posterior never held their sites, and dividing them out would "
                          "remove information it does not have; drop them from the forget set", stacklevel=3)
    return unique


def unlearn(
    posterior: Optional[GaussianPosterior],
    model: nn.Module,
    loss_fn: Callable[[Any], Tensor],
    forget_data: Iterable[Any],
    *,
    curvature: Union[str, UnlearnCurvature] = "price",
    mc_samples: int = 1,
    antithetic: bool = True,
    inputs: Callable[[Any], Tensor] = lambda batch: batch[0],
    floor: Optional[float] = None,
    clamped_mean: str = "keep",
    data_size: Optional[float] = None,
    forget_index: Any = None,
    train_index: Any = None,
    retain_data: Optional[Iterable[Any]] = None,
    retain_size: Optional[int] = None,
    steps: int = 0,
    lr: float = 0.05,
    start: str = "eq32",
    learner_kw: Optional[dict[str, Any]] = None,
    seed: int = 0,
    progress: bool = False,
) -> Unlearned:
    r"""Forget ``forget_data`` from ``posterior`` (docs/algorithms.md §8, eq. 32; docs/adaptation.md).

    .. math::
        S_{rm}=S_{old}-\sum_{j\in\mathcal D_{rm}}H_j,\qquad m_{rm}=m_{old}+S_{rm}^{-1}\sum_{j\in\mathcal D_{rm}}G_j

    Args:
        posterior: :math:`q_{old}`, a :class:`~vbpc.DiagonalGaussian` (``IVON.posterior()``, a checkpoint's)
            or a :class:`~vbpc.FullGaussian`; it is not modified.
        model: the network the posterior covers (bound by name; its weights are restored afterwards).
        loss_fn: ``loss_fn(batch)`` -> the batch's *mean* loss (the same per-example loss as in training).
        forget_data: batches of :math:`\mathcal D_{rm}` (e.g. ``[(x, y)]`` or a ``DataLoader``); empty raises.
        curvature: ``"price"`` (default, diagonal, any loss), ``"ggn"`` / ``"fisher"`` (diagonal, softmax
            cross-entropy on ``model(inputs(batch))``), ``"exact"`` (diagonal or full, dense Hessian, d ≤ 5000).
        mc_samples: draws from :math:`q_{old}` per chunk for the expectations (0: at the mean; not ``price``).
        antithetic: evaluate each draw as a :math:`\pm z` pair (exact means for quadratic losses).
        data_size: :math:`N`, the number of examples the posterior was fitted on.  A diagonal posterior
            with ``ess`` :math:`\lambda\ne N` (tempered) holds each example's site with weight :math:`\lambda/N`,
            and that is the weight divided out; ``None`` means :math:`\lambda=N` (weight 1, IVON's default).
        floor: the diagonal precision floor (default :math:`\lambda\delta`, the prior's); for the full family
            the eigenvalue floor (default: refuse an indefinite result).
        clamped_mean: diagonal entries whose precision was clamped keep their mean (``"keep"``, default) or
            take the Newton step at the floor (``"newton"``); see :func:`newton_removal`.
        forget_index, train_index: optional example indices of the forget set and of the training data
            (an int ``n`` = ``range(n)``): repeats and examples outside the training data are warned about.
            Without them membership cannot be checked.
        retain_data, retain_size, steps, lr: optional corrected steps after eq. (32): ``steps``
            :class:`~vbpc.ContinualIVON` steps with prior :math:`q_{rm}`, the replay correction of eq. (29) on
            batches of ``retain_data`` (a memory of retained examples, cycled) anchored at :math:`q_{old}`,
            weighted by ``retain_size`` (:math:`N_{ret}`, the number of retained examples), at learning rate ``lr``;
            ``start``: where the steps start, ``"eq32"`` (:math:`m_{rm}`) or ``"old"`` (:math:`m_{old}`; the
            prior is :math:`q_{rm}` either way, so the fixed point is the same); ``learner_kw`` are further
            :class:`~vbpc.ContinualIVON` arguments (defaults ``hess_init=1e-6``,
            ``beta2=0.999``: the posterior starts at :math:`q_{rm}`).
        seed: the draws' generator (the global RNG is untouched).

    Returns an :class:`Unlearned` with the new posterior (bound to ``model``), the clamp count and the cost.
    """
    if posterior is None:
        raise ValueError("unlearning needs the posterior's precision S_old: got posterior=None (a checkpoint "
                         "saved by a learner without a posterior, e.g. AdamW, cannot be unlearned by eq. (32))")
    if not isinstance(posterior, (DiagonalGaussian, FullGaussian)):
        raise TypeError(f"unlearning supports the diagonal and full families, got {type(posterior).__name__}")
    if isinstance(forget_data, Sequence) and len(forget_data) == 0:
        raise ValueError("the forget set is empty: nothing to unlearn")
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if start not in ("eq32", "old"):
        raise ValueError(f"invalid start={start!r}; expected 'eq32' (the mean of eq. 32) or 'old' (the old mean)")
    if steps and (retain_data is None or retain_size is None or not retain_size > 0):
        raise ValueError("corrected steps after eq. (32) need retain_data (a memory of retained examples) and "
                         "retain_size > 0 (how many retained examples it stands for)")
    idx = None if forget_index is None else check_forget_index(forget_index, train_index)
    try:
        g_bar, h_bar, n, evals = forget_statistics(posterior, model, loss_fn, forget_data, curvature=curvature,
                                                   mc_samples=mc_samples, antithetic=antithetic, inputs=inputs,
                                                   seed=seed, progress=progress)
    except ValueError as exc:
        if "empty iterable" in str(exc):
            raise ValueError("the forget set is empty: nothing to unlearn") from None
        raise
    if idx is not None and len(idx) != n:
        raise ValueError(f"forget_index names {len(idx)} examples but forget_data holds {n}: they must describe "
                         "the same forget set")
    if data_size is not None and not (0 < data_size < math.inf and data_size >= n):
        raise ValueError(f"data_size={data_size!r}: the number of training examples, finite and >= the {n} "
                         "examples to forget")
    if isinstance(posterior, FullGaussian):  # sum-scale precision: every site weighs 1
        g_w, h_w = [float(n)] * len(g_bar), [float(n)]
    else:  # the sites weigh λ/N in a posterior fitted with ess λ on N examples
        g_w = h_w = [n * (1.0 if data_size is None else float(e.ess) / data_size) for e in posterior._entries]
    q_rm, clamped = newton_removal(posterior, [g * w for g, w in zip(g_bar, g_w)], [h * w for h, w in zip(h_bar, h_w)],
                                   floor=floor, clamped_mean=clamped_mean)
    q_rm.bind(model)
    record: dict[str, Any] = {
        "method": "eq32", "n_forget": n, "curvature": parse_enum(UnlearnCurvature, curvature, "curvature").value,
        "mc_samples": mc_samples, "antithetic": antithetic, "clamped": clamped, "clamped_mean": clamped_mean,
        "numel": posterior.numel(),
        "grad_evals": evals, "seed": seed,
    }
    if idx is not None:
        record["forget_index_sha256"] = hashlib.sha256(",".join(map(str, sorted(idx))).encode()).hexdigest()
    if steps:
        assert retain_data is not None and retain_size is not None
        n_ret = float(retain_size) * (1.0 if data_size is None else float(posterior._entries[0].ess) / data_size)
        q_rm, step_evals, step_clamped = _corrected_steps(q_rm, posterior, model, loss_fn, retain_data, n_ret,
                                            steps, lr, seed, start, dict(learner_kw or {}))
        evals += step_evals
        record.update(method="eq32+poco", steps=steps, lr=lr, start=start, retain_size=retain_size,
                      clamped_after_steps=step_clamped)
    record["grad_evals"] = evals
    return Unlearned(q_rm, n, clamped, posterior.numel(), evals, record)


def _corrected_steps(q_rm: GaussianPosterior, q_old: GaussianPosterior, model: nn.Module,
                     loss_fn: Callable[[Any], Tensor], retain_data: Iterable[Any], retain_size: float, steps: int,
                     lr: float, seed: int, start: str, learner_kw: dict[str, Any],
                     ) -> tuple[GaussianPosterior, int, int]:
    r"""``steps`` corrected steps from :math:`q_{rm}`: :class:`~vbpc.ContinualIVON` with prior :math:`q_{rm}`,
    anchor :math:`q_{old}`, no new data and the retained memory weighted by :math:`N_{ret}` (eq. 29 with
    :math:`N_{new}=0`).  The model's weights are restored; returns a frozen copy of the posterior (precisions
    below the prior's clamped at :math:`\lambda\delta`), the per-example gradient evaluations (two passes per
    memory example: at :math:`q` and at :math:`q_{old}`) and the number of clamped entries."""
    from .continual import ContinualIVON, cycle

    if not (isinstance(q_rm, DiagonalGaussian) and isinstance(q_old, DiagonalGaussian)):
        raise ValueError("corrected steps after eq. (32) are implemented for the diagonal family (IVON's); "
                         "use steps=0 for a FullGaussian")
    ess = {float(e.ess) for e in q_old._entries}
    wd = {float(e.weight_decay) for e in q_old._entries}
    if len(ess) != 1 or len(wd) != 1:
        raise ValueError("corrected steps need one ess and one weight_decay across the posterior's tensors")
    targets = [e.target for e in q_rm._entries]
    saved = [t.detach().clone() for t in targets]  # type: ignore[union-attr]
    kw = {"hess_init": 1e-6, "beta2": 0.999, **learner_kw}
    try:
        if start == "old":
            with torch.no_grad():
                for t, e in zip(targets, q_old._entries):
                    t.copy_(e.mean)  # type: ignore[union-attr]
        opt = ContinualIVON(targets, lr=lr, ess=ess.pop(), prior=q_rm, anchor=q_old, model=model, correction=True,
                            memory_weight=retain_size, data_size=0.0, start="prior" if start == "eq32" else "keep",
                            weight_decay=wd.pop(), **kw)
        # the memory's curvature under q_old: the retained data's part of the old precision, S_rm − λδ, per
        # retained example (the K-prior identity: the correction then removes exactly what q_rm holds)
        lam_, wd_ = float(q_old._entries[0].ess), float(q_old._entries[0].weight_decay)
        base = DiagonalGaussian([Entry(eo.name, eo.mean, (eo.precision() - er.precision()).div_(lam_).clamp_(min=0.0),
                                       lam_, wd_) for eo, er in zip(q_old._entries, q_rm._entries)])
        opt.set_memory_curvature_from(base, model=model)
        evals = 0
        batches = iter(cycle(retain_data))
        with torch.random.fork_rng(devices=[]):  # reproducible from ``seed``; the caller's RNG is untouched
            torch.manual_seed(seed)
            for _ in range(steps):
                batch = next(batches)

                def memory(batch: Any = batch) -> Tensor:
                    opt.zero_grad()
                    loss = loss_fn(batch)
                    loss.backward()
                    return loss
                opt.step(None, memory=memory)
                evals += 2 * opt.mc_samples * batch_size_of(batch)
        live = opt.posterior(model)
        # the corrected curvature can pull a precision below the prior's: clamp at λδ as eq. (32) does
        entries = [Entry(e.name, e.mean.detach().clone(), e.hess.detach().clamp(min=0.0), e.ess, e.weight_decay)
                   for e in live._entries]
        clamped = sum(int((e.hess < 0).sum()) for e in live._entries)
        post = DiagonalGaussian(entries)
    finally:
        with torch.no_grad():
            for t, v in zip(targets, saved):
                t.copy_(v)  # type: ignore[union-attr]
    return post.bind(model), evals, clamped
