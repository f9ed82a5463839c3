r"""Knowledge adaptation by posterior correction (docs/algorithms.md §8): continual learning and
finetuning from an anchored pretrained posterior.

**Vector prior.**  Every workflow replaces IVON's prior :math:`\mathcal N(0,(\lambda\delta)^{-1}I)`
by :math:`\mathcal N(m_0,\mathrm{diag}(p_0)^{-1})`, i.e. in (8)-(10) :math:`\delta\to\delta_v=p_0/\lambda`
and :math:`\delta m\to\delta_v\odot(m-m_0)`.  :class:`ContinualIVON` runs IVON's kernels unchanged
with the state :math:`\tilde h=h+\delta_v-\delta` (scalar δ = the group's ``weight_decay``):

.. math::
    \tilde h+\delta &= h+\delta_v \quad(\text{so } \sigma=1/\sqrt{\lambda(h+\delta_v)}
        \text{ and the Price estimate (5) are exact})\\
    \tilde h' &= \beta_2\tilde h+(1-\beta_2)(\hat h+\Delta)+\tfrac12(1-\beta_2)^2
        \frac{(\tilde h-(\hat h+\Delta))^2}{\tilde h+\delta},\quad \Delta=\delta_v-\delta \\
    m' &= m-\eta_t\,\mathrm{clip}\Big(\frac{g/c_t+\delta m+e}{\tilde h'+\delta}\Big),\quad
        e=\delta_v\odot(m-m_0)-\delta m

which is (8)-(9) with the vector prior, term by term (substitute :math:`\tilde h=h+\Delta`).  The
posterior view :meth:`posterior` then has precision :math:`\lambda(\tilde h+\delta)=\lambda h+p_0`, the
new data's curvature on top of the prior's.

**Correction (eq. 29).**  With a replay memory :math:`\mathcal M` of old data (size :math:`N_{old}` =
``memory_weight``), each MC sample evaluates the new batch and a memory batch at
:math:`\theta=m+\sigma\odot z` and the memory batch again at :math:`\theta_{old}=m_{old}+\sigma_{old}\odot z`
(shared noise, replayed RNG, §6.3):

.. math::
    \tilde g &= \tfrac{N_{new}}\lambda\hat g_{new}+\tfrac{N_{old}}\lambda\big[\hat g_{\mathcal M}(q)-
        \hat g_{\mathcal M}(q_{old})-\hat h_{\mathcal M}(q_{old})\odot(m-m_{old})\big]\\
    \tilde h &= \tfrac{N_{new}}\lambda\hat h_{new}+\tfrac{N_{old}}\lambda\big[\hat h_{\mathcal M}(q)-
        \hat h_{\mathcal M}(q_{old})\big]  \hfill (29)

This is IVON-PoCo's corrected step (22)-(23) with the anchor at :math:`q_{old}`, α=1 and zero
anchor statistics, so the two-pass machinery of :class:`~vbpc.IVONPoCo` is reused.  Without a
memory (``correction=False``) the learner is the prior-focused online-VI/VCL-like method.

**Pretrained anchor (eq. 30).**  :func:`pretrained_posterior` forms :math:`q_{pre}` from one diagonal
curvature pass at :math:`\theta_{pre}` (antithetic Price by default, ``"gradsq"`` or ``"fisher"``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from .._enums import parse_enum
from ..errors import SamplingError, StateDictMismatchError
from ..posterior import DiagonalGaussian, Entry
from .correction import ReplayCorrection
from .curvature import (
    Curvature,
    PreMean,
    cycle,
    laplace_posterior,
    mean_gradient,
    pretrained_posterior,
    price_curvature,
)
from .ivon_poco import IVONPoCo

__all__ = ["ContinualIVON", "pretrained_posterior", "cycle", "Curvature", "PreMean", "Start"]


class Start(str, enum.Enum):
    """Where a :class:`ContinualIVON` starts its mean."""

    PRIOR = "prior"
    KEEP = "keep"


def _no_new_data() -> Tensor:
    """The new-batch closure of ``step(None, memory=...)`` with ``data_size=0``: never called."""
    raise AssertionError("unreachable: data_size=0 evaluates the memory only")


class ContinualIVON(IVONPoCo):
    r"""IVON with the Gaussian prior :math:`q_{old}` and, optionally, the posterior-correction term on
    a replay memory (docs/algorithms.md §8, eq. 29; the module docstring derives the update).

    Args:
        params: the parameters (``model.parameters()`` or groups), already at :math:`m_{old}` or
            :math:`\theta_{pre}` usually (``start="prior"`` copies the prior mean in).
        lr, ess: IVON's; ``ess`` is :math:`\lambda` of the new posterior (usually :math:`N_{new}`).
        prior: the old posterior :math:`q_{old}=(m_{old},p_{old})` as a :class:`~vbpc.DiagonalGaussian`
            (``IVON.posterior()``, :func:`pretrained_posterior`, a checkpoint); matched to the
            trainable parameters by name when ``model`` is given, else by position.
        correction: evaluate the correction term of (29) on a replay memory; :meth:`step` then needs
            ``memory=`` (a closure on a memory batch).  False: prior-focused (VCL-like).  A
            :class:`vbpc.ReplayCorrection` carries ``memory_weight``/``data_size`` (and the anchor noise)
            itself; ``vbpc.IVON(..., prior=q_old, correction=vbpc.ReplayCorrection(N_old))`` builds this learner.
        memory_weight: :math:`N_{old}`, the number of old examples the memory stands for (required
            with ``correction``; unbiased for a uniform memory).
        data_size: :math:`N_{new}` (default ``ess``): the new batch's gradient is scaled by
            :math:`N_{new}/\lambda`.  ``0.0``: no new data (:math:`w_{new}=0`); each step is then
            ``step(None, memory=...)``, the memory alone (needs ``correction``).
        anchor: the posterior :math:`q_{anc}` at which the replay memory's reference sites were formed
            (default: ``prior``).  The correction terms of (29) use it, :math:`\theta_{old}=m_{anc}+
            \sigma_{anc}\odot z`, :math:`\hat g_{\mathcal M}(q_{anc})`, :math:`\hat h_{\mathcal M}(q_{anc})\odot
            (m-m_{anc})` and :meth:`set_memory_curvature`, while the prior term
            :math:`\delta_v\odot(m-m_0)` and :meth:`prior` keep ``prior``.  Unlearning uses
            ``prior=q_rm`` (eq. 32), ``anchor=q_old``, ``data_size=0.0`` and the retained memory.
        start: ``"prior"`` (copy :math:`m_{old}` into the parameters) or ``"keep"``.
        **kw: every other :class:`vbpc.IVON` argument (``beta1`` defaults to 0.9 here, IVON's),
            ``model``/``norm_update``, ``anchor_noise`` (``"shared"``) and ``track_stats``.

    Usage::

        post = ivon.posterior(model)                       # after task 1
        opt = vbpc.ContinualIVON(model.parameters(), lr=0.5, ess=len(task2), prior=post, model=model,
                                 correction=True, memory_weight=len(task1))
        for (x, y), (xm, ym) in zip(loader2, memory_loader):
            opt.step(lambda: loss(x, y), memory=lambda: loss(xm, ym))
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        ess: float,
        prior: DiagonalGaussian,
        *,
        correction: Union[bool, ReplayCorrection, None] = False,
        memory_weight: Optional[float] = None,
        data_size: Optional[float] = None,
        anchor: Optional[DiagonalGaussian] = None,
        start: str = "keep",
        beta1: float = 0.9,
        model: Optional[nn.Module] = None,
        **kw: Any,
    ):
        for bad in ("alpha", "alpha_schedule", "anchor_period", "warmup_steps", "megabatch_size", "proximal",
                    "alpha_mode", "anchor_update"):
            if bad in kw:
                raise TypeError(f"ContinualIVON does not take {bad!r}: the anchor is the prior (α=1, eq. 29)")
        if not isinstance(prior, DiagonalGaussian):
            raise TypeError(f"prior must be a vbpc.DiagonalGaussian, got {type(prior).__name__}")
        if correction is None:
            correction = False
        if isinstance(correction, ReplayCorrection):
            if memory_weight is not None or data_size is not None:
                raise TypeError("memory_weight/data_size given twice: as keywords and in correction=ReplayCorrection")
            memory_weight, data_size = correction.memory_weight, correction.data_size
            for key in ("anchor_noise", "track_stats"):
                if key in kw and kw[key] != getattr(correction, key):
                    raise TypeError(f"{key} given twice: {kw[key]!r} as a keyword and {getattr(correction, key)!r} in "
                                    "correction=ReplayCorrection(...); put it in the ReplayCorrection")
                kw[key] = getattr(correction, key)
        elif not isinstance(correction, bool):
            raise TypeError(f"correction must be a bool or a vbpc.ReplayCorrection, got {type(correction).__name__}")
        if correction and not (memory_weight is not None and memory_weight > 0):
            raise ValueError("correction=True needs memory_weight > 0: the number of old examples N_old "
                             "the replay memory stands for (eq. 29)")
        if data_size is not None and not (data_size >= 0 and math.isfinite(data_size)):
            raise ValueError(f"invalid data_size={data_size!r}: must be finite and >= 0")
        if data_size == 0 and not correction:
            raise ValueError("data_size=0 (no new data) leaves only the replay memory: pass correction=True and "
                             "memory_weight, or give data_size > 0")
        if anchor is prior:
            anchor = None  # the same object: the default, bit for bit
        if anchor is not None:
            if not isinstance(anchor, DiagonalGaussian):
                raise TypeError(f"anchor must be a vbpc.DiagonalGaussian, got {type(anchor).__name__}")
            if not correction:
                raise ValueError("anchor= is the posterior the replay memory's reference sites were formed at (eq. "
                                 "29); it needs correction=True (without a correction the prior is all there is)")
        start_at = parse_enum(Start, start, "start")
        super().__init__(params, lr, ess, beta1=beta1, alpha=0.0, model=model, **kw)
        self.replay = bool(correction)  # the correction term of (29) on a replay memory
        self.memory_weight = None if memory_weight is None else float(memory_weight)
        self.data_size = None if data_size is None else float(data_size)
        self.last_memory_loss: Optional[Tensor] = None
        self.memory_hess: Optional[list[Tensor]] = None  # h̄_M(q_old), see set_memory_curvature
        self._memory: Optional[Callable[[], Tensor]] = None
        self.separate_anchor = anchor is not None  # prior term at m_0, correction terms at m_anc
        self._memory_source: Optional[tuple[Callable[[Any], Tensor], list[Any], dict[str, Any]]] = None
        self._memory_raw: Optional[list[Tensor]] = None  # running mean of the h̄_M(q_old) draws (unclamped)
        self._bind_prior(prior, model, start_at is Start.PRIOR, anchor)

    # ------------------------------------------------------------------ prior
    def _prior_entries(self, prior: DiagonalGaussian, model: Optional[nn.Module]) -> list[Entry]:
        params = self._anchor_params()
        entries = list(prior._entries)
        if model is not None:
            names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
            by_name = {e.name: e for e in entries}
            out = []
            for p in params:
                n = names.get(id(p))
                if n is None:
                    raise ValueError("a trainable parameter is not a parameter of `model`")
                if n not in by_name:
                    raise StateDictMismatchError(f"the prior has no entry for parameter {n!r} "
                                                 f"(prior names: {list(by_name)[:4]}...)")
                out.append(by_name[n])
        else:
            if len(entries) != len(params):
                raise StateDictMismatchError(f"the prior has {len(entries)} tensors, the learner "
                                             f"{len(params)} trainable ones (pass model= to match by name)")
            out = entries
        for e, p, n in zip(out, params, self._names(params)):
            if tuple(e.mean.shape) != tuple(p.shape):
                raise StateDictMismatchError(f"prior {e.name!r} has shape {tuple(e.mean.shape)}, "
                                             f"parameter {n!r} has {tuple(p.shape)}")
        return out

    @torch.no_grad()
    def _bind_prior(self, prior: DiagonalGaussian, model: Optional[nn.Module], copy_mean: bool,
                    anchor: Optional[DiagonalGaussian] = None) -> None:
        r"""Store :math:`m_0=m_{old}` (the anchor mean), :math:`\sigma_{old}` and :math:`\delta_v=p_{old}/\lambda`,
        and start :math:`\tilde h=h_0+\delta_v-\delta` (the posterior starts at the prior plus
        :math:`\lambda h_0`).  With a separate ``anchor`` the anchor holds :math:`(m_{anc},\sigma_{anc})`,
        and the state :math:`m_0` (``prior_mean``) and :math:`p_{anc}/\lambda` (``anchor_delta``, the clamp's cap)."""
        entries = self._prior_entries(prior, model)
        a_entries = entries if anchor is None else self._prior_entries(anchor, model)
        means, rsqrt, ess_old = [], [], []
        self._prior_names = [e.name for e in entries]
        it, it_a = iter(entries), iter(a_entries)
        for g in self.param_groups:
            lam, wd = float(g["ess"]), float(g["weight_decay"])
            for p in self._trainable(g):
                e, ea = next(it), next(it_a)
                st = self._state(p, g)
                sd = st["hess"].dtype
                m0 = e.mean.detach().to(p.device, sd, copy=True)
                hw_old = (e.hess.detach().to(p.device, sd) + e.weight_decay)
                if not bool((hw_old > 0).all()):
                    raise ValueError(f"prior {e.name!r}: precision ess*(hess+weight_decay) is not positive")
                hw_anc = hw_old
                if anchor is not None:
                    hw_anc = ea.hess.detach().to(p.device, sd) + ea.weight_decay
                    if not bool((hw_anc > 0).all()):
                        raise ValueError(f"anchor {ea.name!r}: precision ess*(hess+weight_decay) is not positive")
                    st["prior_mean"] = m0
                    st["anchor_delta"] = hw_anc.mul(ea.ess / lam)  # p_anc / λ
                means.append(m0 if anchor is None else ea.mean.detach().to(p.device, sd, copy=True))
                rsqrt.append(hw_anc.rsqrt())
                ess_old.append(float(ea.ess))
                st["prior_delta"] = hw_old.mul(e.ess / lam)  # δ_v = p_old / λ
                st["hess"].add_(st["prior_delta"]).sub_(wd)  # h̃ = h0 + δ_v − δ
                if copy_mean:  # the prior's mean
                    st.get("mean", p).copy_(m0)
                    if "mean" in st:
                        p.copy_(st["mean"])
        self.anchor.publish(means, None, None, extra={"rsqrt": rsqrt, "ess": ess_old})  # type: ignore[arg-type]

    def prior(self) -> DiagonalGaussian:
        r"""The prior :math:`\mathcal N(m_0,\mathrm{diag}(\lambda\delta_v)^{-1})` as a posterior object
        (copies; named as the prior it was built from)."""
        entries = []
        o = 0
        assert self.anchor.mean is not None
        for g in self.param_groups:
            for p in self._trainable(g):
                st = self.state[p]
                m0 = st["prior_mean"] if self.separate_anchor else self.anchor.mean[o]
                entries.append(Entry(self._prior_names[o], m0.clone(), st["prior_delta"].clone(),
                                      float(g["ess"]), 0.0))
                o += 1
        return DiagonalGaussian(entries)

    @torch.no_grad()
    def set_memory_curvature(self, loss_fn: Callable[[Any], Tensor], data: Iterable[Any], *, mc_samples: int = 1,
                             model: Optional[nn.Module] = None, seed: int = 0, clamp: bool = True,
                             every: Optional[int] = None, progress: bool = False) -> None:
        r"""Estimate :math:`\bar h_{\mathcal M}(q_{old})`, the memory's mean diagonal Hessian under the
        anchor (:func:`~vbpc.inference.curvature.price_curvature`: antithetic Price pairs at
        :math:`m_{old}\pm\sigma_{old}z`, chunks weighted by size, as eq. 30) and use it in the gradient
        term :math:`-\hat h_{\mathcal M}(q_{old})\odot(m-m_{old})` of (29) instead of the per-step sample
        estimate.  Still unbiased (the term is linear in the memory batch), and without the
        :math:`z\odot\nabla\bar\ell/\sigma_{old}` noise that grows with :math:`\|m-m_{old}\|` [vbpc].
        ``loss_fn(batch)``: mean loss of a memory chunk.

        ``every``: re-draw every ``every`` steps (seeds ``seed+1, seed+2, …``) and use the running mean of
        all :math:`J` draws so far, :math:`\bar h^{(J)}=\frac1J\sum_{j<J}\bar h_j`.  A single draw keeps its
        Monte-Carlo error for the whole task, and the solution moves by it (a single-run bias); the
        running mean shrinks it like :math:`1/\sqrt J`.  ``None``: one draw.  ``counters``:
        ``memory_curvature_draws``, and the passes in ``refresh_passes``/``refresh_examples``.

        ``clamp`` keeps :math:`0\le\frac{N_{old}}\lambda\bar h_{\mathcal M}\le\delta_v-\delta`
        (:math:`p_{anc}/\lambda-\delta` with a separate ``anchor``): the term removes old curvature
        *already in* :math:`p_{old}`, so it never removes more than :math:`p_{old}-\lambda\delta` holds, nor
        adds any.  It is needed only when :math:`q_{old}` is not a posterior of the learning rule (an IVON
        :math:`h` that had not converged, β2 near 1, few steps: the diagonal quadratic model is then
        indefinite and the run diverges, seen on permuted Fashion-MNIST) [vbpc]; with an old posterior
        from a curvature pass (:meth:`laplace_posterior`) it can stay off."""
        if every is not None and not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(f"every={every!r}: an int >= 1 (steps between re-draws) or None (one draw)")
        self._memory_source = (loss_fn, list(data), {"mc_samples": mc_samples, "seed": int(seed), "clamp": bool(clamp),
                                                     "every": every, "draws": 0, "progress": progress,
                                                     "model": self._norm.model if model is None else model})
        self._memory_raw = None
        self._draw_memory_curvature()

    @torch.no_grad()
    def _draw_memory_curvature(self) -> None:
        """One more draw of h̄_M(q_old), folded into the running mean (then clamped into memory_hess)."""
        assert self._memory_source is not None
        loss_fn, data, o = self._memory_source
        a = self.anchor
        assert a.mean is not None
        params = self._anchor_params()
        scale = [r.div(math.sqrt(e)) for r, e in zip(a.extra["rsqrt"], a.extra["ess"])]
        hs, passes, evals = price_curvature(params, loss_fn, data, means=a.mean, sigma=scale,
                                            mc_samples=o["mc_samples"], seed=o["seed"] + o["draws"],
                                            names=self._names(params), model=o["model"], progress=o["progress"])
        o["draws"] += 1
        if self._memory_raw is None:
            self._memory_raw = hs
        else:
            for acc, h in zip(self._memory_raw, hs):
                acc.add_(h.sub(acc), alpha=1.0 / o["draws"])
        hs = [h.clone() for h in self._memory_raw]
        c = self.correction.counters
        c["memory_curvature_draws"] = c.get("memory_curvature_draws", 0) + 1
        self.correction.count_refresh(passes, evals)
        if o["clamp"]:  # 0 <= (N_old/λ) h̄_M <= δ_v − δ: never remove more old curvature than p_old holds
            it = iter(hs)
            for g in self.param_groups:
                cap = float(g["ess"]) / float(self.memory_weight or 1.0)
                for p in self._trainable(g):
                    h = next(it)
                    dv = self.state[p].get("anchor_delta", self.state[p]["prior_delta"])
                    h.clamp_(min=0.0).copy_(torch.minimum(h, (dv - g["weight_decay"]).clamp(min=0.0).mul_(cap)))
        self.memory_hess = hs

    @torch.no_grad()
    def set_memory_curvature_from(self, base: DiagonalGaussian, *, model: Optional[nn.Module] = None) -> None:
        r"""Use the old data's curvature already in :math:`p_{old}` as :math:`\bar h_{\mathcal M}(q_{old})`:

        .. math:: \bar h_{\mathcal M}=\max\big(0,\ (p_{old}-p_{base})/N_{old}\big)

        with :math:`p_{old}` the anchor's precision (the prior's by default) and :math:`p_{base}` its part
        that is not old data (the first task's prior).  When :math:`p_{old}=p_{base}+N_{old}\bar h` (an old
        posterior from curvature passes, :func:`~vbpc.inference.curvature.laplace_posterior`), the gradient
        term :math:`-\frac{N_{old}}\lambda\bar h\odot(m-m_{old})` cancels the old-data part of
        :math:`\delta_v\odot(m-m_{old})` exactly, leaving :math:`\frac{p_{base}}\lambda\odot(m-m_{old})`: the
        corrected objective is the K-prior (old data only through the memory's
        :math:`\hat g_{\mathcal M}(q)-\hat g_{\mathcal M}(q_{old})`), positive definite by construction
        (docs/algorithms.md §8).  A Price estimate on the memory instead (:meth:`set_memory_curvature`) differs
        from it per coordinate by its Monte-Carlo error, which for a network is dominated by the off-diagonal
        Hessian (:math:`z_i\sum_jH_{ij}z_j`) and can leave the quadratic model indefinite [vbpc, measured]."""
        if not self.replay:
            raise ValueError("set_memory_curvature_from needs correction=True (a replay memory and memory_weight)")
        entries = self._prior_entries(base, self._norm.model if model is None else model)
        hs, it = [], iter(entries)
        for g in self.param_groups:
            lam = float(g["ess"])
            for p in self._trainable(g):
                e = next(it)
                st = self.state[p]
                p_old = st.get("anchor_delta", st["prior_delta"]).mul(lam)
                p_base = e.precision().to(p_old)
                hs.append(p_old.sub_(p_base).div_(float(self.memory_weight or 1.0)).clamp_(min=0.0))
        self._memory_source, self._memory_raw = None, None
        self.memory_hess = hs

    def laplace_posterior(self, loss_fn: Callable[[Any], Tensor], data: Iterable[Any], *,
                          memory: Optional[Iterable[Any]] = None, floor: bool = False, mc_samples: int = 4,
                          seed: int = 0, model: Optional[nn.Module] = None,
                          progress: bool = False) -> tuple[DiagonalGaussian, int]:
        r"""The posterior at the end of the task from a curvature pass at the final mean
        (:func:`~vbpc.inference.curvature.laplace_posterior`), with the same terms as this learner's
        precision :math:`\lambda h+p_{prior}` and :math:`h` replaced by its target at :math:`q`:

        .. math:: p=p_{prior}+N_{new}\bar h_{new}(q)+N_{old}\big[\bar h_{\mathcal M}(q)-
            \bar h_{\mathcal M}(q_{old})\big]\quad(\ge\lambda\delta;\ \texttt{floor}:\ \ge p_q)

        (the bracket with ``memory``, the memory chunks, and needs :meth:`set_memory_curvature`: its
        :math:`\bar h_{\mathcal M}(q_{old})` is the one the correction used, so the old curvature the
        correction removed is the curvature added back).  ``data``: the new task's chunks.  Returns the
        posterior and the number of precision entries clamped at :math:`\lambda\delta`."""
        mdl = self._norm.model if model is None else model
        if mdl is None:
            raise ValueError("laplace_posterior needs model= (the learner was built without one)")
        terms: list[tuple[float, list[Tensor]]] = []
        if memory is not None:
            if not self.replay or self.memory_hess is None:
                raise ValueError("laplace_posterior(memory=...) needs correction=True and set_memory_curvature "
                                 "(the h̄_M(q_old) the correction removed)")
            post = self.posterior(mdl)
            params = self._anchor_params()
            sigma = [e.precision().rsqrt_() for e in post._entries]
            h_m, _, _ = price_curvature(params, loss_fn, list(memory), means=[e.mean for e in post._entries],
                                        sigma=sigma, mc_samples=mc_samples, seed=seed + 1, names=self._names(params),
                                        model=mdl, progress=progress)
            terms.append((float(self.memory_weight or 0.0), [a - b for a, b in zip(h_m, self.memory_hess)]))
        n_new = float(self.param_groups[0]["ess"]) if self.data_size is None else self.data_size
        return laplace_posterior(self.posterior(mdl), self.prior(), mdl, loss_fn, data, data_size=n_new, terms=terms,
                                 floor=floor, mc_samples=mc_samples, seed=seed, progress=progress)

    @torch.no_grad()
    def residual(self, loss_fn: Callable[[Any], Tensor], data: Iterable[Any], *,
                 memory: Optional[Iterable[Any]] = None, mc_samples: int = 1, seed: int = 0,
                 model: Optional[nn.Module] = None, progress: bool = False) -> list[Tensor]:
        r"""The gradient of this learner's objective (29) at its mean, sum scale, the expectations over all
        of ``data`` (the new task's chunks) and the memory chunks:

        .. math:: r=N_{new}\bar g_{new}(q)+N_{old}\big[\bar g_{\mathcal M}(q)-\bar g_{\mathcal M}(q_{anc})-
            \bar h_{\mathcal M}(q_{anc})\odot(m-m_{anc})\big]+p_{prior}\odot(m-m_0)

        (the bracket with ``memory``; needs the learner's :math:`\bar h_{\mathcal M}`).  Zero at a fixed point;
        after an epoch of IVON it is not, and an old posterior used as a prior by (29) must be its fixed point
        (the next learner's correction subtracts :math:`\bar g_{\mathcal M}(q_{old})` as if :math:`r=0`):
        :func:`~vbpc.inference.curvature.newton_mean` moves its mean by :math:`-r/p_{old}`
        (docs/algorithms.md §8)."""
        mdl = self._norm.model if model is None else model
        if mdl is None:
            raise ValueError("residual needs model= (the learner was built without one)")
        params = self._anchor_params()
        names = self._names(params)
        post = self.posterior(mdl)
        means = [e.mean for e in post._entries]
        sigma = [e.precision().rsqrt_() for e in post._entries]
        g_new = mean_gradient(params, loss_fn, list(data), means=means, sigma=sigma, mc_samples=mc_samples,
                              seed=seed, names=names, model=mdl, progress=progress)
        n_new = float(self.param_groups[0]["ess"]) if self.data_size is None else self.data_size
        out = [g.mul(n_new) for g in g_new]
        if memory is not None:
            if not self.replay or self.memory_hess is None:
                raise ValueError("residual(memory=...) needs correction=True and the memory curvature "
                                 "(set_memory_curvature or set_memory_curvature_from)")
            chunks = list(memory)
            a = self.anchor
            assert a.mean is not None
            g_m = mean_gradient(params, loss_fn, chunks, means=means, sigma=sigma, mc_samples=mc_samples,
                                seed=seed + 1, names=names, model=mdl, progress=progress)
            sigma_a = [r.to(m) / math.sqrt(e) for r, m, e in zip(a.extra["rsqrt"], a.mean, a.extra["ess"])]
            g_a = mean_gradient(params, loss_fn, chunks, means=list(a.mean), sigma=sigma_a, mc_samples=mc_samples,
                                seed=seed + 1, names=names, model=mdl, progress=progress)
            w = float(self.memory_weight or 0.0)
            for o, gm, ga, hb, m, ma in zip(out, g_m, g_a, self.memory_hess, means, a.mean):
                o.add_(gm.sub(ga).sub_(hb.to(m) * (m - ma.to(m))), alpha=w)
        prior = self.prior()
        for o, e, m in zip(out, prior._entries, means):
            o.add_(e.precision().to(m) * (m - e.mean.to(m)))
        return out

    # ------------------------------------------------------------------ step
    def step(self, closure: Optional[Callable[[], Tensor]] = None, *,  # type: ignore[override]
             memory: Optional[Callable[[], Tensor]] = None, batch_size: Optional[int] = None) -> Optional[Tensor]:
        """One step of (29): ``closure`` on a new batch; ``memory`` (needed with ``correction``) on a
        memory batch.  Both follow the ``torch.optim`` closure convention (backward, return the mean loss)."""
        if closure is None and self.data_size != 0:
            raise SamplingError("ContinualIVON.step needs a closure on a new batch (step(None, memory=...) is for "
                                "data_size=0.0, no new data)")
        if closure is not None and self.data_size == 0:
            raise ValueError("data_size=0.0 (no new data) gives the new batch zero weight: call step(None, "
                             "memory=...) or set data_size to N_new")
        if self.replay and memory is None:
            raise ValueError("the posterior correction needs a replay memory: pass step(closure, memory=...) "
                             "(an empty memory cannot correct; use correction=False for the prior-focused method)")
        self._memory = memory if self.replay else None
        self.correction.alpha_now = 1.0
        self.correction.anchor_pass = self.replay
        try:
            loss = super(IVONPoCo, self).step(_no_new_data if closure is None else closure)
        finally:
            self._memory = None
        passes = (2 if closure is None else 3) if self.replay else 1
        self.correction.count_step(self.mc_samples * passes, batch_size)
        src = self._memory_source
        if src is not None and src[2]["every"] is not None and self.correction.t % src[2]["every"] == 0:
            self._draw_memory_curvature()  # the scheduled re-draw (running mean)
        return loss

    def sample(self, closure: Callable[[], Tensor]) -> Tensor:
        """Not supported: a step needs the new batch and the memory together (``step(closure, memory=)``)."""
        raise SamplingError("ContinualIVON collects its samples in step(closure, memory=...); sample() is IVON-PoCo's")

    def _closure_sample(self, closure: Callable[[], Tensor], noop_ok: bool = False) -> Optional[Tensor]:
        if self.replay:
            return super()._closure_sample(closure, noop_ok)
        draw, ctx = self._sample_context("ContinualIVON.step")
        watch = self._watch(draw)
        with self._norm(first=self._count == 0):
            loss = self._run_closure(self._scaled_new(closure), ctx, watch)
        self._check_foreign(watch)
        self._collect(draw)
        return loss

    def _weights(self) -> list[tuple[list[Tensor], float, float]]:
        """Per group: (params, N_new/λ, N_old/λ)."""
        out = []
        for g in self.param_groups:
            lam = float(g["ess"])
            w_new = 1.0 if self.data_size is None else self.data_size / lam
            w_old = 0.0 if self.memory_weight is None else self.memory_weight / lam
            out.append((self._trainable(g), w_new, w_old))
        return out

    def _scaled_new(self, closure: Callable[[], Tensor]) -> Callable[[], Tensor]:
        if self.data_size is None:
            return closure

        def run() -> Tensor:
            loss = closure()
            for params, w_new, _ in self._weights():
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(w_new)
            return loss
        return run

    def _pass_closures(self, closure: Callable[[], Tensor]) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
        memory = self._memory
        assert memory is not None

        if closure is _no_new_data:  # data_size = 0: the memory alone, weighted N_old/λ
            def only_memory() -> Tensor:
                mem_loss = memory()
                for params, _, w_old in self._weights():
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(w_old)
                self.last_memory_loss = torch.as_tensor(mem_loss).detach()
                return mem_loss
            return only_memory, memory

        def inner() -> Tensor:
            """(N_new/λ)∇ℓ_new + (N_old/λ)∇ℓ_M at the same θ: one accumulator pair (linear in ĝ)."""
            loss = closure()
            groups = self._weights()
            saved = [[p.grad for p in params] for params, _, _ in groups]
            for params, _, _ in groups:
                for p in params:
                    p.grad = None
            mem_loss = memory()
            for (params, w_new, w_old), g_new in zip(groups, saved):
                for p, g0 in zip(params, g_new):
                    if p.grad is None:
                        p.grad = None if g0 is None else g0.mul_(w_new)
                    else:
                        p.grad.mul_(w_old)
                        if g0 is not None:
                            p.grad.add_(g0, alpha=w_new)
            self.last_memory_loss = torch.as_tensor(mem_loss).detach()
            return loss
        return inner, memory

    # ------------------------------------------------------------------ correction hook
    def _correct(self, gi: int, group: dict, ws: dict, hess: list[Tensor], price: bool) -> bool:
        r"""Eq. (29) and the vector prior: rewrite ĝ as :math:`\tilde g`, the statistic as
        :math:`(\tilde h+\Delta)/\sqrt\lambda` (the fused kernel's non-Price input) and set the
        numerator shift :math:`e=\delta_v\odot(m-m_0)-\delta m`."""
        if not price:
            raise ValueError("ContinualIVON needs hess_approx='price'")
        o = self._offsets()[gi]
        params = ws["params"]
        n = len(params)
        lam, wd = float(group["ess"]), float(group["weight_decay"])
        root = math.sqrt(lam)
        a = self.anchor
        assert a.mean is not None
        m0 = [self.state[p]["prior_mean"] for p in params] if self.separate_anchor else a.mean[o:o + n]
        h_t = [torch.mul(s, root, out=b).div_(r) for s, r, b in zip(ws["stat"], ws["rsqrt"], ws["s1"])]
        means = [self.state[p].get("mean", p) for p in params]
        g_t = ws["ghat"]
        snap = None
        if self.poco.track_stats:
            snap = {"g_in": [t.clone() for t in g_t], "h_in": [t.clone() for t in h_t]}
        shift = ws.get("prior_shift")
        if shift is None or len(shift) != n:
            shift = ws["prior_shift"] = [torch.empty_like(t) for t in h_t]
        diff = [torch.sub(m, mo, out=e) for m, mo, e in zip(means, m0, shift)]  # m − m0, reused below
        if self.correction.anchor_pass:
            d_anc = [torch.sub(m, ma) for m, ma in zip(means, a.mean[o:o + n])] if self.separate_anchor else diff
            w_old = self.memory_weight / lam  # type: ignore[operator]
            r_out, e_out = a.extra["rsqrt"][o:o + n], a.extra["ess"][o:o + n]
            for i, (gt, ht, d) in enumerate(zip(g_t, h_t, d_anc)):
                h_out = torch.mul(ws["stat_out"][i], math.sqrt(e_out[i]), out=ws["s2"][i]).div_(r_out[i])
                g_out = ws["grad_out"][i]
                if snap is not None:
                    snap.setdefault("g_out", []).append(g_out.clone())
                    snap.setdefault("h_out", []).append(h_out.clone())
                h_old = h_out if self.memory_hess is None else self.memory_hess[o + i]
                g_out.addcmul_(h_old, d)  # ĝ_M(q_old) + ĥ_M(q_old) ⊙ (m − m_old)
                gt.sub_(g_out, alpha=w_old)
                ht.sub_(h_out, alpha=w_old)
        if snap is not None:
            self._track(gi, {**snap, "g_tilde": [t.clone() for t in g_t], "h_tilde": [t.clone() for t in h_t]})
        for p, m, h, e in zip(params, means, h_t, diff):
            dv = self.state[p]["prior_delta"]
            h.add_(dv).sub_(wd)  # ĥ + Δ
            e.mul_(dv).sub_(m, alpha=wd)  # e = δ_v(m − m0) − δm, in the shift buffer
        for s, h in zip(ws["stat"], h_t):
            torch.div(h, root, out=s)
        return False

    # ------------------------------------------------------------------ serialization
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["vbpc"]["continual"] = {"correction": self.replay, "memory_weight": self.memory_weight,
                                   "data_size": self.data_size, "separate_anchor": self.separate_anchor,
                                   "memory_hess": None if self.memory_hess is None else [t.clone() for t in
                                                                                         self.memory_hess]}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("vbpc", {}).get("continual")
        if extra is None:
            raise StateDictMismatchError("not a ContinualIVON state dict (no 'vbpc.continual' section)")
        if bool(extra["correction"]) != self.replay:
            raise StateDictMismatchError(f"the checkpoint was saved with correction={extra['correction']}, "
                                         f"this learner has correction={self.replay}")
        if bool(extra.get("separate_anchor", False)) != self.separate_anchor:
            raise StateDictMismatchError(f"the checkpoint was saved with a separate anchor="
                                         f"{bool(extra.get('separate_anchor', False))}, this learner has "
                                         f"{self.separate_anchor} (build it with the same anchor=)")
        super().load_state_dict(state_dict)
        self.memory_weight = extra["memory_weight"]
        self.data_size = extra["data_size"]
        mh = extra.get("memory_hess")
        self.memory_hess = None if mh is None else [t.to(m.device, m.dtype).clone() for t, m in
                                                    zip(mh, self.anchor.mean or [])]
