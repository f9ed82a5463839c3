r"""Functional core of vbpc's diagonal-Gaussian learners (docs/algorithms.md §2).

Each function mirrors one equation and comes in a single-tensor and a multi-tensor
(``torch._foreach_*``) kernel, dispatched as in ``torch/optim/adam.py``.  Both kernels
perform *the same IEEE operations in the same association* (docs/algorithms.md §2.1 item 5),
so they agree bit for bit with each other and with the reference IVON.  Callers may pass
preallocated ``scratch`` tensors: the hot loop then allocates nothing (large CPU
allocations cost page faults, often more than the arithmetic).

Per parameter tensor, with ``ess`` :math:`\lambda` and ``weight_decay`` :math:`\delta`:

.. math::

    n &= z / \sqrt{\lambda (h+\delta)}                                    && (5),(10)\\
    \bar x_k &= \bar x_{k-1} + (x_k-\bar x_{k-1})/k                       && (6)\\
    \hat h &= (\overline{n\odot g}\odot(h+\delta))\cdot\lambda            && (6)\\
    g &\leftarrow \beta_1 g + (1-\beta_1)\hat g                           && (7)\\
    h &\leftarrow \beta_2 h + (1-\beta_2)\hat h
        + \tfrac12(1-\beta_2)^2 (h-\hat h)^2/(h+\delta)                   && (8)\\
    m &\leftarrow m - \eta_t\,\mathrm{clip}_\xi\big((g/c_t+\delta m)/(h+\delta)\big) && (9)
"""

from __future__ import annotations

import math
from typing import Optional, cast

import torch
from torch import Tensor

__all__ = [
    "check_clip_grad_norm",
    "clip_coef",
    "poco_correct_",
    "product_",
    "gaussian_noise_",
    "perturb_",
    "ivon_rsqrt_",
    "ivon_update_fast_",
    "welford_",
    "price_hessian_",
    "gradsq_hessian_",
    "ivon_update_",
    "default_foreach",
]

Scratch = Optional[list[Tensor]]


def default_foreach(tensors: list[Tensor]) -> bool:
    """Multi-tensor kernels for dense CUDA tensors (as ``torch.optim``).  On the CPU the
    single-tensor kernels win: they write through ``out=`` and skip the extra copies that
    in-place-only ``_foreach`` ops need, and CPU passes are memory-bound."""
    return bool(tensors) and all(type(t) is Tensor and t.device.type == "cuda" for t in tensors)


def _shift(src: list[Tensor], scalar: float, out: Scratch, foreach: bool) -> list[Tensor]:
    """``out = src + scalar`` (one add per element; ``out`` reused when given)."""
    if out is None:
        return cast(list[Tensor], torch._foreach_add(src, scalar)) if foreach else [s.add(scalar) for s in src]
    if foreach:
        torch._foreach_copy_(out, src)
        torch._foreach_add_(out, scalar)
    else:
        for o, s in zip(out, src):
            torch.add(s, scalar, out=o)
    return out


def _binary(op: str, a: list[Tensor], b: list[Tensor], out: Scratch, foreach: bool) -> list[Tensor]:
    """``out = a (op) b`` for ``op`` in ``sub``/``mul`` (``out`` reused when given)."""
    if out is None:
        if foreach:
            return getattr(torch, f"_foreach_{op}")(a, b)
        return [getattr(torch, op)(x, y) for x, y in zip(a, b)]
    if foreach:
        torch._foreach_copy_(out, a)
        getattr(torch, f"_foreach_{op}_")(out, b)
    else:
        fn = getattr(torch, op)
        for o, x, y in zip(out, a, b):
            fn(x, y, out=o)
    return out


def _diff(a: list[Tensor], b: list[Tensor], out: Scratch, foreach: bool) -> list[Tensor]:
    """``out = a - b``."""
    return _binary("sub", a, b, out, foreach)


def product_(out: list[Tensor], a: list[Tensor], b: list[Tensor], *, foreach: Optional[bool] = None) -> list[Tensor]:
    r"""``out = a ⊙ b`` without allocating: the per-sample statistic :math:`n\odot g` or :math:`g^2` (eq. 6)."""
    if foreach is None:
        foreach = default_foreach(out)
    return _binary("mul", a, b, out, foreach)


# ----------------------------------------------------------------------------- (5), (10)
def gaussian_noise_(
    z: list[Tensor], hess: list[Tensor], ess: float, weight_decay: float, *,
    scratch: Scratch = None, foreach: Optional[bool] = None,
) -> list[Tensor]:
    r"""Scale standard normals in place into posterior noise, eq. (5)/(10).

    :math:`n = z / \mathrm{sqrt}(\lambda\cdot(h+\delta))` with add, multiply, ``sqrt`` and true
    division (no ``rsqrt``), docs/algorithms.md §2.1 item 3.  Returns ``z`` (now holding ``n``).
    """
    if foreach is None:
        foreach = default_foreach(z)
    denom = _shift(hess, weight_decay, scratch, foreach)
    if foreach:
        torch._foreach_mul_(denom, ess)
        torch._foreach_sqrt_(denom)
        torch._foreach_div_(z, denom)
    else:
        for zi, d in zip(z, denom):
            zi.div_(d.mul_(ess).sqrt_())
    return z


# ----------------------------------------------------------------------------- (6)
def welford_(
    avg: list[Tensor], x: list[Tensor], count: int, *, scratch: Scratch = None, foreach: Optional[bool] = None,
) -> None:
    r"""Fold sample ``count`` (1-based) into running means: :math:`\bar x_k=\bar x_{k-1}+(x_k-\bar x_{k-1})/k`.

    For ``count == 1`` the sample is copied verbatim (eq. 6).  ``x`` is left unchanged.
    """
    if count < 1:
        raise ValueError(f"welford_ count must be >= 1, got {count}")
    if foreach is None:
        foreach = default_foreach(avg)
    if count == 1:
        if foreach:
            torch._foreach_copy_(avg, x)
        else:
            for a, xi in zip(avg, x):
                a.copy_(xi)
        return
    d = _diff(x, avg, scratch, foreach)
    if foreach:
        torch._foreach_div_(d, float(count))
        torch._foreach_add_(avg, d)
    else:
        for a, di in zip(avg, d):
            a.add_(di.div_(float(count)))


def price_hessian_(
    nxg: list[Tensor], hess: list[Tensor], ess: float, weight_decay: float, *,
    scratch: Scratch = None, foreach: Optional[bool] = None,
) -> list[Tensor]:
    r"""Price (reparameterisation) Hessian estimate in place, eq. (5)-(6).

    :math:`\hat h = (\overline{n\odot g}\odot(h+\delta))\cdot\lambda` with the **current**
    (pre-update) :math:`h`; ``nxg`` is overwritten with :math:`\hat h` and returned.
    """
    if foreach is None:
        foreach = default_foreach(nxg)
    hw = _shift(hess, weight_decay, scratch, foreach)
    if foreach:
        torch._foreach_mul_(nxg, hw)
        torch._foreach_mul_(nxg, ess)
    else:
        for a, w in zip(nxg, hw):
            a.mul_(w).mul_(ess)
    return nxg


def gradsq_hessian_(gsq: list[Tensor], scale: float, *, foreach: Optional[bool] = None) -> list[Tensor]:
    r"""Squared-gradient Hessian estimate in place: :math:`\hat h=\overline{g^2}\cdot s`, ``s`` = λ or 1 (§2)."""
    if scale == 1.0:
        return gsq
    if foreach is None:
        foreach = default_foreach(gsq)
    if foreach:
        torch._foreach_mul_(gsq, scale)
    else:
        for a in gsq:
            a.mul_(scale)
    return gsq


# ----------------------------------------------------------------------------- (7)-(9)
def ivon_update_(
    means: list[Tensor],
    momenta: list[Tensor],
    hess: list[Tensor],
    g_hat: list[Tensor],
    h_hat: list[Tensor],
    *,
    eta: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    clip_radius: float,
    bias_correction: float,
    scratch: Optional[tuple[list[Tensor], list[Tensor]]] = None,
    foreach: Optional[bool] = None,
) -> None:
    r"""One IVON update of :math:`(g, h, m)` in place, eqs. (7)-(9), docs/algorithms.md §2.

    .. math::
        g &\leftarrow (\beta_1 g) + ((1-\beta_1)\hat g)\\
        h &\leftarrow ((\beta_2 h) + ((1-\beta_2)\hat h)) + ((c\,(h-\hat h)^2)/(h+\delta)),
            \quad c=\tfrac12(1-\beta_2)^2\\
        m &\leftarrow m - (\eta_t\cdot\mathrm{clamp}(((g/c_t)+(\delta m))/(h+\delta),-\xi,\xi))

    The mean step uses the **new** :math:`g` and :math:`h`.  ``eta`` is :math:`\eta_t`
    (already rescaled by :math:`h_0+\delta` if requested) and ``bias_correction`` is
    :math:`c_t = 1-\beta_1^t` (1 without debiasing).  ``g_hat`` and ``h_hat`` are consumed
    as scratch, as are the two optional ``scratch`` lists.  Association follows
    docs/algorithms.md §2.1 item 5 exactly.
    """
    if foreach is None:
        foreach = default_foreach(means)
    one_m_b1 = 1.0 - beta1
    one_m_b2 = 1.0 - beta2
    c = 0.5 * one_m_b2**2
    clip = math.isfinite(clip_radius)
    s1, s2 = scratch if scratch is not None else (None, None)
    if foreach:
        # (7)
        torch._foreach_mul_(momenta, beta1)
        torch._foreach_mul_(g_hat, one_m_b1)
        torch._foreach_add_(momenta, g_hat)
        # (8): diff = (c * (h - h_hat)^2) / (h + delta), old h
        hw = _shift(hess, weight_decay, s1, True)
        diff = _diff(hess, h_hat, s2, True)
        torch._foreach_mul_(diff, diff)
        torch._foreach_mul_(diff, c)
        torch._foreach_div_(diff, hw)
        torch._foreach_mul_(hess, beta2)
        torch._foreach_mul_(h_hat, one_m_b2)
        torch._foreach_add_(hess, h_hat)
        torch._foreach_add_(hess, diff)
        # (9), new g and h; g_hat/diff reused as scratch
        _shift(hess, weight_decay, hw, True)
        num = g_hat
        torch._foreach_copy_(num, momenta)
        if bias_correction != 1.0:
            torch._foreach_div_(num, bias_correction)
        torch._foreach_copy_(diff, means)
        torch._foreach_mul_(diff, weight_decay)
        torch._foreach_add_(num, diff)
        torch._foreach_div_(num, hw)
        if clip:
            torch._foreach_clamp_min_(num, -clip_radius)
            torch._foreach_clamp_max_(num, clip_radius)
        torch._foreach_mul_(num, eta)
        torch._foreach_sub_(means, num)
    else:
        for i, (m, g, h, gh, hh) in enumerate(zip(means, momenta, hess, g_hat, h_hat)):
            g.mul_(beta1).add_(gh.mul_(one_m_b1))
            hw_i = h.add(weight_decay) if s1 is None else torch.add(h, weight_decay, out=s1[i])
            diff_i = h.sub(hh) if s2 is None else torch.sub(h, hh, out=s2[i])
            diff_i.mul_(diff_i).mul_(c).div_(hw_i)
            h.mul_(beta2).add_(hh.mul_(one_m_b2)).add_(diff_i)
            torch.add(h, weight_decay, out=hw_i)
            num_i = torch.div(g, bias_correction, out=gh) if bias_correction != 1.0 else gh.copy_(g)
            num_i.add_(torch.mul(m, weight_decay, out=diff_i)).div_(hw_i)
            if clip:
                num_i.clamp_(-clip_radius, clip_radius)
            m.sub_(num_i.mul_(eta))


# ----------------------------------------------------------------------------- fast path
# The default (non-parity) path caches r = (h+δ)^{-1/2} and h+δ between steps and keeps the
# *standard* normals z of each sample, so that with σ = r/√λ (eq. 10):
#     θ = m + (r ⊙ z)/√λ                         one addcmul            (5)
#     ĥ = mean(z ⊙ g) ⊙ √(λ(h+δ)) = √λ·mean(z⊙g)/r                     (5), (6)
# Every λ is folded into host scalars.


def ivon_rsqrt_(
    hess: list[Tensor], weight_decay: float, hw: list[Tensor], rsqrt_hw: list[Tensor], *,
    foreach: Optional[bool] = None,
) -> None:
    r"""Cache :math:`h+\delta` in ``hw`` and :math:`r=(h+\delta)^{-1/2}` in ``rsqrt_hw``, so that
    :math:`\sigma=r/\sqrt\lambda` (eq. 10)."""
    if foreach is None:
        foreach = default_foreach(hess)
    _shift(hess, weight_decay, hw, foreach)
    if foreach:
        torch._foreach_copy_(rsqrt_hw, hw)
        for r in rsqrt_hw:
            r.rsqrt_()
    else:
        for w, r in zip(hw, rsqrt_hw):
            torch.rsqrt(w, out=r)


def perturb_(
    params: list[Tensor], z: list[Tensor], rsqrt_hw: list[Tensor], ess: float, *, foreach: Optional[bool] = None,
) -> None:
    r""":math:`\theta = m + \sigma\odot z` in place, :math:`\sigma=r/\sqrt\lambda` (eq. 5), one pass."""
    if foreach is None:
        foreach = default_foreach(params)
    value = 1.0 / math.sqrt(ess)
    if foreach:
        torch._foreach_addcmul_(params, z, rsqrt_hw, value=value)
    else:
        for p, zi, r in zip(params, z, rsqrt_hw):
            p.addcmul_(zi, r, value=value)


def ivon_update_fast_(
    means: list[Tensor],
    momenta: list[Tensor],
    hess: list[Tensor],
    g_hat: list[Tensor],
    stat: list[Tensor],
    hw: list[Tensor],
    rsqrt_hw: list[Tensor],
    *,
    ess: float,
    eta: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    clip_radius: float,
    bias_correction: float,
    price: bool = True,
    prior_shift: Optional[list[Tensor]] = None,
    foreach: Optional[bool] = None,
) -> None:
    r"""Eqs. (6)-(10) in 10 fused memory passes instead of about 25 (the default, non-parity path).

    Same mathematics as :func:`price_hessian_` + :func:`ivon_update_`, rearranged with
    :math:`u=(\hat h-h)/\sqrt\lambda`, :math:`r=(h+\delta)^{-1/2}` and :math:`c_t` folded into
    host scalars:

    .. math::
        u &= \overline{z\odot g}/r - h/\sqrt\lambda
            \quad(\text{Price; gradsq: ``stat`` holds }\hat h/\sqrt\lambda)\\
        g &\leftarrow \mathrm{lerp}(g,\hat g,1-\beta_1)\\
        h &\leftarrow h+(1-\beta_2)\sqrt\lambda\,u+\tfrac12(1-\beta_2)^2\lambda\,u^2/(h+\delta)\\
        m &\leftarrow m-\tfrac{\eta_t}{c_t}\,\mathrm{clip}_{\xi c_t}\big((g+c_t\delta m)/(h'+\delta)\big)

    ``hw``/``rsqrt_hw`` must hold :math:`h+\delta` and :math:`r` of the pre-update :math:`h` on
    entry; on exit they hold those of the updated :math:`h` (ready for the next sample).
    ``stat`` is consumed; ``g_hat`` is only read.  Agrees with the exact path to rounding (tested).

    ``prior_shift`` (optional) :math:`e` is added to the numerator, :math:`g/c_t+\delta m+e`, outside
    the momentum: the vector prior of docs/algorithms.md §8 passes
    :math:`e=\delta_v\odot(m-m_0)-\delta m` (see :class:`vbpc.inference.continual.ContinualIVON`).
    """
    if foreach is None:
        foreach = default_foreach(means)
    one_m_b1, one_m_b2 = 1.0 - beta1, 1.0 - beta2
    root = math.sqrt(ess)
    c = 0.5 * one_m_b2**2 * ess
    clip = math.isfinite(clip_radius)
    a = weight_decay * bias_correction
    step = -eta / bias_correction
    if foreach:
        u = stat
        if price:
            torch._foreach_div_(u, rsqrt_hw)
        torch._foreach_lerp_(momenta, g_hat, one_m_b1)
        torch._foreach_sub_(u, hess, alpha=1.0 / root)
        torch._foreach_add_(hess, u, alpha=one_m_b2 * root)
        torch._foreach_mul_(u, u)
        torch._foreach_addcdiv_(hess, u, hw, value=c)
        _shift(hess, weight_decay, hw, True)
        num = u  # u is consumed: reuse it for (g + c_t δ m)
        torch._foreach_copy_(num, momenta)
        torch._foreach_add_(num, means, alpha=a)
        if prior_shift is not None:
            torch._foreach_add_(num, prior_shift, alpha=bias_correction)
        if clip:
            torch._foreach_div_(num, hw)
            torch._foreach_clamp_min_(num, -clip_radius * bias_correction)
            torch._foreach_clamp_max_(num, clip_radius * bias_correction)
            torch._foreach_add_(means, num, alpha=step)
        else:
            torch._foreach_addcdiv_(means, num, hw, value=step)
        torch._foreach_copy_(rsqrt_hw, hw)
        for r in rsqrt_hw:
            r.rsqrt_()
        return
    shifts = prior_shift if prior_shift is not None else [None] * len(means)
    for m, g, h, gh, u, w, r, e in zip(means, momenta, hess, g_hat, stat, hw, rsqrt_hw, shifts):
        if price:
            u.div_(r)
        g.lerp_(gh, one_m_b1)
        u.sub_(h, alpha=1.0 / root)
        h.add_(u, alpha=one_m_b2 * root)
        h.addcdiv_(u.mul_(u), w, value=c)
        torch.add(h, weight_decay, out=w)
        num_i = torch.add(g, m, alpha=a, out=u)
        if e is not None:
            num_i.add_(e, alpha=bias_correction)
        if clip:
            num_i.div_(w).clamp_(-clip_radius * bias_correction, clip_radius * bias_correction)
            m.add_(num_i, alpha=step)
        else:
            m.addcdiv_(num_i, w, value=step)
        torch.rsqrt(w, out=r)


# ----------------------------------------------------------------------------- (22)
def poco_correct_(x_in: list[Tensor], x_out: list[Tensor], x_bar: list[Tensor], alpha: float) -> list[Tensor]:
    r"""Posterior correction of a statistic in place on ``x_in``, eq. (22), exactly this association:

    .. math:: \tilde x = (\hat x_{in}-\alpha\hat x_{out})+\alpha\bar x_{out}

    (:math:`x` is the expected gradient or the diagonal Hessian).  At α=1 with
    :math:`\hat x_{in}=\hat x_{out}` bitwise, :math:`\tilde x=\bar x_{out}` exactly (P4).
    ``x_bar`` may live on another device (CPU offload: one copy per tensor and step).
    """
    for xi, xo, xb in zip(x_in, x_out, x_bar):
        xb = xb.to(xi.device, xi.dtype, non_blocking=True)
        if alpha == 1.0:
            xi.sub_(xo).add_(xb)
        else:
            xi.sub_(xo.mul(alpha)).add_(xb.mul(alpha))
    return x_in


def clip_coef(tensors: list[Tensor], max_norm: float) -> Tensor:
    r"""The global-norm clip factor :math:`c=\min\big(1,\ r/(\lVert x\rVert_2+10^{-6})\big)` of
    ``tensors`` (one L2 norm over all of them), as a 0-dim tensor on the first tensor's device.

    The same arithmetic as ``torch.nn.utils.clip_grad_norm_`` (per-tensor norms per device and
    dtype, their norm, ``max_norm / (norm + 1e-6)`` clamped at 1), so ``x * c`` equals what that
    utility leaves in ``p.grad``.  The caller decides what to scale (a sample's gradient in IVON,
    the corrected :math:`\tilde g` of eq. (22) in the corrected learners)."""
    if not tensors:
        raise ValueError("clip_coef of no tensors")
    dev = tensors[0].device
    buckets: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    norms = [n for ts in buckets.values() for n in torch._foreach_norm(ts, 2.0)]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(n, 2.0).to(dev) for n in norms]), 2.0)
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def check_clip_grad_norm(value: Optional[float]) -> Optional[float]:
    """``clip_grad_norm`` is ``None`` (off) or a finite number > 0; raise ``ValueError`` naming it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"invalid clip_grad_norm={value!r}: must be None (no clipping) or a finite number > 0")
    return float(value)
