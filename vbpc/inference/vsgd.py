r"""Variational SGD over an isotropic Gaussian with fixed σ, with posterior correction (docs/algorithms.md §5,
eq. 20), and its named constructors :class:`VSGD` (no correction), :class:`SVRG` (σ=0, α=1) and
:class:`AlphaSVRG` (σ=0, α schedule).  With σ=0, α=1 and a full-data anchor its iterates are exactly
SVRG's (§4 P1, eq. 19) under the step mapping ρ = ηN of eq. (4).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .. import _runtime as ranks
from ..errors import NonFiniteError, SamplingError, StateDictMismatchError
from ..functional import check_clip_grad_norm, clip_coef
from ..nn.norm import RunningStatsGuard
from ..posterior import perturbation
from .closures import closure_loss, require_grads
from .correction import CorrectedLearner, PoCo, ReplayCorrection, add_full_precision_group

__all__ = ["VSGDPoCo", "VSGD", "SVRG", "AlphaSVRG"]

#: correction options the isotropic learner does not implement (refused when set)
_UNSUPPORTED = ("refresh_mc", "refresh_antithetic", "proximal", "correct_hessian", "alpha_mode", "alpha_smoothing",
                "anchor_update")


class VSGDPoCo(CorrectedLearner, Optimizer):
    r"""Variational SGD over an isotropic Gaussian with fixed σ, with posterior correction (§5, eq. 20).

    .. math::
        z&\sim\mathcal N(0,I)\ (\text{none if }\sigma=0),\quad \hat g_{in}=\nabla\bar\ell_B(m+\sigma z),\quad
        \hat g_{out}=\nabla\bar\ell_B(m_{out}+\sigma z_{out})\\
        \tilde g&=(\hat g_{in}-\alpha_t\hat g_{out})+\alpha_t\bar g_{out},\qquad
        v\leftarrow\beta v+(\tilde g+\delta m),\qquad m\leftarrow m-\rho v

    Args:
        lr: ρ.  sigma: σ ≥ 0 (0 = delta method).  weight_decay: δ (the prior, never corrected).
        momentum: heavy-ball β.
        correction: a :class:`vbpc.ReplayCorrection` (continual learning, below) or a :class:`vbpc.PoCo`
            (α, schedule, anchor period, warm-up, anchor noise and seed,
            mega-batch size, ``force_anchor_pass``, ``anchor_device``, ``track_stats``: keep the last
            ĝ_in, ĝ_out, g̃); its fields are also accepted as keyword arguments (``alpha=``,
            ``anchor_period=``, …).  The diagonal-family options (``proximal``, ``alpha_mode``, …) are refused.
        sync: under ``torch.distributed``, average ĝ_in, ĝ_out and the refresh's mega-batch means
        over ranks (per-rank noise acts as extra samples; every rank applies the same update).
        clip_grad_norm: :math:`r`: clip the corrected gradient after the correction (and after the
        all-reduce under ``sync``), :math:`\tilde g\leftarrow\min(1,r/(\lVert\tilde g\rVert_2+10^{-6}))\tilde g`,
        one L2 norm over all trainable parameters; the anchor pass and the refresh are not clipped
        (clipping inside the closure would give the two passes different factors and break the
        correction).  ``counters["clipped_steps"]`` counts the steps where it was active.
        prior_mean: :math:`m_0` (one tensor per trainable parameter): the prior term becomes
            :math:`\delta(m-m_0)` (the old weights :math:`\theta_{old}` in continual learning).

    **Replay correction** (docs/algorithms.md §8, the isotropic analogue of eq. 29):
    ``correction=vbpc.ReplayCorrection(N_old, data_size=N_new)`` with ``prior_mean=θ_old`` and
    ``step(closure, memory=...)`` (a closure on a memory batch of old data) uses, with :math:`\lambda=N_{new}+N_{old}`,

    .. math::
        \tilde g&=\tfrac{N_{new}}\lambda\nabla\bar\ell_{new}(\theta)+\tfrac{N_{old}}\lambda\big[
            \nabla\bar\ell_{\mathcal M}(\theta)-\nabla\bar\ell_{\mathcal M}(\theta_{old}+\sigma z)\big]\\
        v&\leftarrow\beta v+\tilde g+\delta(m-\theta_{old})

    (:math:`\theta=m+\sigma z`; the memory's second pass at the old weights through
    :meth:`Correction.two_pass`, shared noise).  Times λ with σ=0 and ``weight_decay`` :math:`=s_0/\lambda`
    this is the K-prior gradient
    :math:`\sum_{\mathcal M}[\nabla\ell_i(\theta)-\nabla\ell_i(\theta_{old})]+s_0(\theta-\theta_{old})`
    plus the new data's: with all old data as the memory and :math:`\theta_{old}` the old MAP its minimiser
    is the joint MAP exactly (a test oracle, to 1e-8).  Without the memory (``correction=None``,
    ``prior_mean``) it is L2 toward the old weights (prior-focused).

    ``step(closure)``: ``closure`` zeroes gradients, computes the mean loss on one fixed batch,
    calls ``backward`` and returns the loss.  ``refresh(loss_fn, data)`` computes the anchor.
    ``counters`` counts forward/backward passes and examples (inner and refresh).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        sigma: float,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        *,
        correction: Union[PoCo, ReplayCorrection, None] = None,
        model: Optional[nn.Module] = None,
        norm_update: str = "first",
        sync: bool = False,
        clip_grad_norm: Optional[float] = None,
        prior_mean: Optional[Iterable[Tensor]] = None,
        **correction_kw: Any,
    ):
        self.replay: Optional[ReplayCorrection] = None
        if isinstance(correction, ReplayCorrection):
            if correction_kw:
                raise TypeError(f"{sorted(correction_kw)[0]!r} is a PoCo option; correction=ReplayCorrection takes "
                                "none")
            if correction.data_size is None:
                raise ValueError("VSGD has no ess: give ReplayCorrection(N_old, data_size=N_new) (λ = N_new + N_old)")
            if prior_mean is None:
                raise ValueError("the replay correction needs prior_mean=θ_old, the old weights its memory's "
                                 "second pass is evaluated at")
            self.replay, correction = correction, PoCo(alpha=0.0)
        options = PoCo.take(type(self).__name__, correction_kw, correction)
        checks = [
            ("lr", lr, lr >= 0 and math.isfinite(lr)), ("sigma", sigma, sigma >= 0 and math.isfinite(sigma)),
            ("weight_decay", weight_decay, weight_decay >= 0 and math.isfinite(weight_decay)),
            ("momentum", momentum, 0 <= momentum < 1),
        ]
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"invalid {name}={value!r}")
        options.check_supported(type(self).__name__, _UNSUPPORTED)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self.sigma = float(sigma)
        self._init_correction(options, self._params())
        self.prior_mean: Optional[list[Tensor]] = None
        if prior_mean is not None:
            m0 = [t.detach().to(p.device, p.dtype, copy=True) for t, p in zip(prior_mean, self._params())]
            if len(m0) != len(self._params()) or any(a.shape != p.shape for a, p in zip(m0, self._params())):
                raise ValueError("prior_mean needs one tensor per trainable parameter, of the same shapes")
            self.prior_mean = m0
            if self.replay is not None:  # the anchor: θ_old, zero anchor statistics (α = 1, eq. 29)
                self.anchor.publish([t.clone() for t in m0], [torch.zeros_like(t) for t in m0], None, sigma=self.sigma)
        self._norm = RunningStatsGuard(model, norm_update, type(self).__name__)
        self.sync = bool(sync)
        self.clip_grad_norm = check_clip_grad_norm(clip_grad_norm)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        add_full_precision_group(self, param_group)

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _names(self) -> list[str]:
        return [f"params[{i}]" for i in range(len(self._params()))]

    def _refresh_anchor(self, loss_fn: Callable[[Any], Tensor], data: Iterable[Any], *, model: Optional[nn.Module],
                        batch_size: Optional[Callable[[Any], int]], progress: bool) -> tuple[int, int]:
        """The anchor at the current mean from a mega-batch iterable (see :meth:`Anchor.refresh`)."""
        chunks = self.anchor.refresh(loss_fn, data, scale=self.sigma, names=self._names(), model=model,
                                     batch_size=batch_size, max_examples=self.poco.megabatch_size,
                                     progress=progress, step=self.t, sync=self.sync)
        return chunks, self.anchor.examples

    # ------------------------------------------------------------------ step
    def _grads(self, params: list[Tensor]) -> list[Tensor]:
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]

    def _replay_closures(self, closure: Callable[[], Tensor],
                         memory: Callable[[], Tensor]) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
        """The two passes of the replay correction: (N_new∇ℓ̄_new + N_old∇ℓ̄_M)/λ at θ, N_old∇ℓ̄_M/λ at θ_old."""
        assert self.replay is not None and self.replay.data_size is not None
        lam = self.replay.data_size + self.replay.memory_weight
        w_new, w_old = self.replay.data_size / lam, self.replay.memory_weight / lam
        params = self._params()

        def inner() -> Tensor:
            loss = closure()
            g_new = [p.grad for p in params]
            for p in params:
                p.grad = None
            memory()
            for p, g0 in zip(params, g_new):
                if p.grad is not None:
                    p.grad.mul_(w_old)
                if g0 is not None:
                    p.grad = g0.mul_(w_new) if p.grad is None else p.grad.add_(g0, alpha=w_new)
            return loss

        def outer() -> Tensor:
            loss = memory()
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(w_old)
            return loss
        return inner, outer

    def step(self, closure: Optional[Callable[[], Tensor]] = None, *,  # type: ignore[override]
             batch_size: Optional[int] = None, memory: Optional[Callable[[], Tensor]] = None) -> Tensor:
        """One corrected step (eq. 20); returns the loss at the current sample.  ``memory``: a closure on
        a memory batch, required with ``correction=ReplayCorrection`` (the replay correction, class docs).

        ``batch_size`` (optional) feeds the cost counters: ``inner_examples`` counts gradient
        evaluations, i.e. examples × passes (2 per corrected step, 1 otherwise; §6.4)."""
        if closure is None:
            raise SamplingError("VSGDPoCo.step needs a closure (it evaluates the same batch twice)")
        if (memory is None) != (self.replay is None):
            raise ValueError("step(closure, memory=...) goes with correction=ReplayCorrection (the replay memory's "
                             "closure); without it pass no memory" if self.replay is None else
                             "the replay correction needs step(closure, memory=...): a closure on a memory batch")
        for gi, group in enumerate(self.param_groups):  # schedulers act at once: re-check before any state change
            if not (0.0 <= group["lr"] < math.inf):
                raise ValueError(f"invalid lr={group['lr']!r} in param group {gi}: must be finite and >= 0")
        c = self.correction
        c.begin_step()
        closure_in, closure_out = closure, closure
        if memory is not None:
            closure_in, closure_out = self._replay_closures(closure, memory)
            c.alpha_now, c.anchor_pass = 1.0, True
        params, names = self._params(), self._names()
        alpha = c.alpha_now
        sigma = self.sigma
        with torch.no_grad():
            z = [torch.randn_like(p) for p in params] if sigma > 0 else None

        def at(mean: Optional[list[Tensor]], noise: Optional[list[Tensor]], spread: float) -> Callable[[], None]:
            """θ = m + σz in place; ``mean=None`` means the parameters' own values (the current
            mean; ``perturbation`` already keeps the copy that restores them)."""
            def write() -> None:
                for i, p in enumerate(params):
                    if mean is not None:
                        p.copy_(mean[i])
                    if noise is not None:
                        p.add_(noise[i], alpha=spread)
            return write

        distributed = self.sync and ranks.active()
        finite: list[bool] = []
        grads: dict[str, list[Tensor]] = {}

        def current() -> Tensor:
            with perturbation(params, names, "VSGDPoCo.step", at(None, z, sigma)), self._norm(first=True):
                with torch.enable_grad():
                    loss = closure_loss(closure_in(), type(self).__name__)
                require_grads(params, type(self).__name__)
                grads["in"] = self._grads(params)
            finite.append(bool(torch.isfinite(loss).all()))
            if not distributed and not finite[0]:
                raise NonFiniteError(f"the closure returned a non-finite loss ({loss.item()}); no state changed")
            return loss

        def anchor() -> None:
            z_out = self.anchor.noise(params, z if self.poco.anchor_noise == "shared" else None, self.anchor.sigma)
            assert self.anchor.mean is not None
            anchor_mean = [m.to(p.device) for m, p in zip(self.anchor.mean, params)]
            with perturbation(params, names, "VSGDPoCo.step (anchor)", at(anchor_mean, z_out, self.anchor.sigma)), \
                    self._norm(first=False, anchor=True):
                with torch.enable_grad():
                    loss_out = closure_loss(closure_out(), type(self).__name__)
                require_grads(params, type(self).__name__)
                grads["out"] = self._grads(params)
            finite.append(bool(torch.isfinite(torch.as_tensor(loss_out)).all()))
            if not distributed and not finite[-1]:
                raise NonFiniteError("the closure returned a non-finite loss at the anchor; no state changed")

        loss = c.two_pass(current, anchor if c.anchor_pass else None)
        passes = (3 if memory is not None else 2) if c.anchor_pass else 1
        g_in, g_out = grads["in"], grads.get("out")
        if distributed:  # one collective decides for every rank, then the means are averaged
            ranks.agree_finite(all(finite))
            ranks.mean_(g_in + (g_out or []))
        bad = [n for n, g in zip(names, g_in + (g_out or [])) if not bool(torch.isfinite(g).all())]
        if bad:
            raise NonFiniteError(f"non-finite gradient for {bad[0]!r}; no state changed")
        track = self.poco.track_stats
        g_tilde = [g.clone() for g in g_in] if track else g_in
        if alpha != 0.0:
            assert g_out is not None
            self.anchor.correct_(g_tilde, g_out, alpha)
        if track:  # g̃ as corrected, before the clip
            keep = [g.clone() for g in g_tilde] if self.clip_grad_norm is not None else g_tilde
            self.last_stats = {"g_in": g_in, "g_out": g_out or [], "g_tilde": keep}
        clipped = False
        if self.clip_grad_norm is not None:  # the corrected gradient, after the all-reduce
            coef = clip_coef(g_tilde, self.clip_grad_norm)
            if not bool(torch.isfinite(coef)) or float(coef) == 0.0:
                raise NonFiniteError("the corrected gradient's norm overflowed (clip_grad_norm); no state changed")
            if float(coef) < 1.0:
                torch._foreach_mul_(g_tilde, coef)
                clipped = True
        self._update(params, g_tilde)
        self.counters["clipped_steps"] += int(clipped)
        c.count_step(passes, batch_size)
        return loss

    @torch.no_grad()
    def _update(self, params: list[Tensor], g_tilde: list[Tensor]) -> None:
        """:math:`v\\leftarrow\\beta v+(\\tilde g+\\delta m)`, :math:`m\\leftarrow m-\\rho v` (β=0: v = g̃ + δm)."""
        grads = dict(zip(map(id, params), g_tilde))
        m0 = None if self.prior_mean is None else dict(zip(map(id, params), self.prior_mean))
        for group in self.param_groups:
            lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if id(p) not in grads:
                    continue
                if m0 is not None:  # δ(m − m0)
                    v = grads[id(p)].add(p - m0[id(p)], alpha=wd) if wd != 0 else grads[id(p)]
                else:
                    v = grads[id(p)].add(p, alpha=wd) if wd != 0 else grads[id(p)]
                if beta != 0.0:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    v = buf.mul_(beta).add_(v)
                p.sub_(v, alpha=lr)

    # ------------------------------------------------------------------ serialization
    def __getstate__(self) -> dict[str, Any]:  # torch.optim keeps only 3 keys: keep everything (deepcopy)
        return dict(self.__dict__)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["vbpc"] = {**self.correction.state_dict(), "sigma": self.sigma, "alpha": self.poco.alpha,
                      "clip_grad_norm": self.clip_grad_norm}
        if self.prior_mean is not None:
            sd["vbpc"]["prior_mean"] = [t.clone() for t in self.prior_mean]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("vbpc")
        if extra is None:
            raise StateDictMismatchError("not a VSGDPoCo state dict (no 'vbpc' section)")
        self.correction.check_state(extra)  # validates shapes before anything changes
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "vbpc"})
        self.correction.load_state_dict(extra)
        if extra.get("prior_mean") is not None:
            self.prior_mean = [t.to(p.device, p.dtype).clone() for t, p in zip(extra["prior_mean"], self._params())]


class VSGD(VSGDPoCo):
    r"""Variational SGD (isotropic Gaussian, fixed σ); plain (α=0, no anchor) unless given
    ``correction=vbpc.PoCo(...)``, which makes it :class:`VSGDPoCo` (eq. 20), or
    ``correction=vbpc.ReplayCorrection(N_old, data_size=N_new)`` with ``prior_mean=θ_old`` (the replay
    correction of continual learning, docs/algorithms.md §8; see :class:`VSGDPoCo`)."""

    def __init__(self, params: Iterable[Any], lr: float, sigma: float, weight_decay: float = 0.0,
                 momentum: float = 0.0, *, correction: Union[PoCo, ReplayCorrection, None] = None, **kw: Any):
        if correction is None:  # plain VSGD unless correction options are given
            correction = PoCo(**{"alpha": 0.0, **{k: kw.pop(k) for k in PoCo.fields() if k in kw}})
        super().__init__(params, lr, sigma, weight_decay, momentum, correction=correction, **kw)


class SVRG(VSGDPoCo):
    r"""SVRG (Johnson & Zhang 2013) as VSGD-PoCo with σ=0, α=1 (docs/algorithms.md §4 P1, eq. 19).

    .. math:: \theta\leftarrow\theta-\rho\big[\nabla\bar\ell_B(\theta)-\nabla\bar\ell_B(\theta_{out})
        +\nabla\bar\ell(\theta_{out})+\delta\theta\big]

    The paper's sum-scale form with step η and unit prior is ``lr = η N``, ``weight_decay = 1/N`` (eq. 4).
    """

    def __init__(self, params: Iterable[Any], lr: float, anchor_period: int, weight_decay: float = 0.0, **kw: Any):
        super().__init__(params, lr, 0.0, weight_decay, 0.0, alpha=1.0, anchor_period=anchor_period, **kw)


class AlphaSVRG(VSGDPoCo):
    r"""α-SVRG (Yin et al., ICLR 2025) with an SGD base (docs/algorithms.md §4 P2):
    :math:`\tilde g=\nabla\bar\ell_B(\theta)-\alpha_k(\nabla\bar\ell_B(\theta_{out})-\bar g_{out})`.

    ``alpha_schedule="linear"`` (default) decays :math:`\alpha_k=\mathrm{linspace}(\alpha_0,0,K)[k]`.
    """

    def __init__(self, params: Iterable[Any], lr: float, anchor_period: int, alpha: float = 0.75,
                 alpha_schedule: str = "linear", total_steps: Optional[int] = None, weight_decay: float = 0.0,
                 momentum: float = 0.0, **kw: Any):
        super().__init__(params, lr, 0.0, weight_decay, momentum, alpha=alpha, alpha_schedule=alpha_schedule,
                         total_steps=total_steps, anchor_period=anchor_period, **kw)
