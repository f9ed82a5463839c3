r"""VON and VON-PoCo: full-Gaussian, Newton-like variational learning with posterior correction
(docs/algorithms.md §7).

State: mean :math:`m`, symmetric :math:`P`, :math:`S=\lambda(P+\delta I)`; anchor
:math:`m_{out},P_{out},\bar g_{out},\bar H_{out}`.  With :math:`G_B,H_B` the expected gradient and
Hessian of :math:`\bar\ell_B` under :math:`q` (in) or :math:`q_{out}` (out):

.. math::
    \tilde H &= (H^{in}_B-\alpha H^{out}_B)+\alpha\bar H_{out},\qquad
        P\leftarrow(1-\eta)P+\eta\tilde H \hfill (25)\\
    m &\leftarrow m-\eta(P+\delta I)^{-1}\Big[(G^{in}_B-\alpha G^{out}_B)+\alpha\bar g_{out}+\delta m
        +\alpha(\bar H_{out}-H^{out}_B)(m-m_{out})\Big] \hfill (26)

with the **updated** :math:`P` in (26); the last term is the proximal term (on by default).
``pd_correction`` applies the matrix form (27) of IVON's positivity fix,
:math:`P'=P+\eta D+\tfrac{\eta^2}2D(P+\delta I)^{-1}D`, :math:`D=\tilde H-P`.

Expectations: ``expectation="mc"`` averages ``mc_samples`` draws :math:`\theta=m+L^{-\top}z`
(:math:`S=LL^\top`); ``"mean"`` evaluates at the mean (the delta method, exact for quadratic
losses).  Hessians: ``"exact"`` (autograd, one batched double-backward) or ``"price"``
(:math:`\hat H=\tfrac12(\hat g(\theta-m)^\top S+[\cdot]^\top)`, the matrix form of eq. 5).

**Closure contract.**  VON differentiates the loss itself (it needs second derivatives), so
``closure()`` returns the mean loss *with its graph* and does **not** call ``backward``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .. import _runtime as ranks
from ..errors import NonFiniteError, SamplingError, StateDictMismatchError
from ..nn.norm import RunningStatsGuard
from ..posterior.base import MeanEntry, cholesky, perturbation
from ..posterior.full import FullGaussian
from .correction import CorrectedLearner, PoCo, add_full_precision_group

__all__ = ["VONPoCo", "VON"]

HESSIANS = ("exact", "price")
EXPECTATIONS = ("mc", "mean")
#: correction options the full-Gaussian learner does not implement (refused when set)
_UNSUPPORTED = ("megabatch_size", "refresh_mc", "refresh_antithetic", "correct_hessian", "anchor_device",
                "alpha_mode", "alpha_smoothing", "anchor_update")


class VONPoCo(CorrectedLearner, Optimizer):
    r"""Variational online Newton over a full Gaussian with posterior correction (§7).

    Args:
        params: the parameters (all trainable ones form one flat vector of size d ≤ ``max_dim``).
        lr: η (the BLR step, for both the precision and the mean).  ess: λ.
        weight_decay: δ (prior precision / λ).  hess_init: :math:`P_0=h_0I`.
        hessian: ``"exact"`` | ``"price"``.  expectation: ``"mc"`` | ``"mean"``.
        mc_samples: draws per step (``"mc"``).  pd_correction: ``"auto"`` (on for ``"price"``),
        True or False.  max_dim: the largest d (O(d²) memory, O(d³) per step).
        correction: a :class:`vbpc.PoCo`; its fields are also accepted as keyword arguments (``alpha``,
            ``alpha_schedule``, ``total_steps``, ``anchor_period``, ``warmup_steps``, ``anchor_noise``,
            ``anchor_seed``, ``force_anchor_pass``, ``track_stats``, and ``proximal``: the last term of (26),
            on by default here).  The diagonal-family options are refused.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        ess: float,
        weight_decay: float = 0.0,
        *,
        hess_init: float = 1.0,
        hessian: str = "exact",
        expectation: str = "mc",
        mc_samples: int = 1,
        pd_correction: Any = "auto",
        max_dim: int = 5000,
        model: Optional[nn.Module] = None,
        norm_update: str = "first",
        sync: bool = False,
        correction: Optional[PoCo] = None,
        **correction_kw: Any,
    ):
        options = PoCo.take(type(self).__name__, correction_kw, correction)
        if options.proximal is None:  # VON's default: the proximal term of (26) on
            options = dataclasses.replace(options, proximal=True)
        checks = [
            ("lr", lr, 0.0 < lr <= 1.0), ("ess", ess, ess > 0), ("weight_decay", weight_decay, weight_decay >= 0),
            ("hess_init", hess_init, hess_init > 0), ("hessian", hessian, hessian in HESSIANS),
            ("expectation", expectation, expectation in EXPECTATIONS),
            ("mc_samples", mc_samples, isinstance(mc_samples, int) and mc_samples >= 1),
            ("pd_correction", pd_correction, pd_correction in ("auto", True, False)),
        ]
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"invalid {name}={value!r}")
        if hessian == "price" and expectation == "mean":
            raise ValueError("the Price Hessian needs samples: use expectation='mc'")
        options.check_supported(type(self).__name__, _UNSUPPORTED)
        super().__init__(params, dict(lr=lr, ess=ess, weight_decay=weight_decay))
        plist = self._params()
        d = sum(p.numel() for p in plist)
        if d > max_dim:
            raise ValueError(f"VON keeps a dense {d}×{d} precision ({8 * d * d / 2**20:.0f} MiB in float64), more "
                             f"than max_dim={max_dim} allows: use vbpc.IVON / IVONPoCo (diagonal) or restrict "
                             "the parameters (e.g. select_parameters(model, 'last_layer'))")
        self.d, self.max_dim = d, max_dim
        self.hessian, self.expectation, self.mc_samples = hessian, expectation, mc_samples
        self.pd_correction = (hessian == "price") if pd_correction == "auto" else bool(pd_correction)
        self.P = hess_init * torch.eye(d, dtype=torch.float64)
        self._init_correction(options, plist)
        self._norm = RunningStatsGuard(model, norm_update, type(self).__name__)
        self.sync = bool(sync)  # average G, H (in and anchor) and the refresh over torch.distributed ranks

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """One group only: the flat d-dimensional Gaussian has one (η, λ, δ)."""
        if self.param_groups:
            raise ValueError(f"{type(self).__name__} takes one param group (one flat Gaussian over every parameter, "
                             "with one lr/ess/weight_decay); got a second: pass the parameters as one group")
        add_full_precision_group(self, param_group)

    # ------------------------------------------------------------------ helpers
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _names(self) -> list[str]:
        return [f"params[{i}]" for i in range(len(self._params()))]

    def _flat(self) -> Tensor:
        return torch.cat([p.detach().to(torch.float64).reshape(-1).cpu() for p in self._params()])

    def _write_flat(self, flat: Tensor) -> Callable[[], None]:
        params = self._params()

        def write() -> None:
            off = 0
            for p in params:
                p.copy_(flat[off:off + p.numel()].view(p.shape).to(p.dtype))
                off += p.numel()
        return write

    @property
    def _group(self) -> dict:
        return self.param_groups[0]

    def precision_matrix(self, P: Optional[Tensor] = None) -> Tensor:
        """:math:`S=\\lambda(P+\\delta I)` (float64)."""
        g = self._group
        P = self.P if P is None else P
        return g["ess"] * (P + g["weight_decay"] * torch.eye(self.d, dtype=torch.float64))

    def posterior(self, model: Optional[nn.Module] = None) -> FullGaussian:
        """The current posterior as a :class:`vbpc.FullGaussian` (means shared with the parameters)."""
        names: dict[int, str] = {}
        if model is not None:
            for n, p in model.named_parameters(remove_duplicate=False):
                names.setdefault(id(p), n)
        entries = [MeanEntry(names.get(id(p), f"params[{i}]"), p, target=p) for i, p in enumerate(self._params())]
        return FullGaussian(entries, self.precision_matrix(), max_dim=self.max_dim)

    def _stats(self, closure: Callable[[], Tensor], theta: Tensor, m: Tensor, S: Tensor,
               names: list[str], *, first: bool = True, anchor: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Loss, gradient and Hessian of ``closure`` at ``theta`` (flat, float64); ``first``/``anchor``
        select the BatchNorm policy of the pass (:mod:`vbpc.nn.norm`)."""
        params = self._params()
        with perturbation(params, names, "VON", self._write_flat(theta)), self._norm(first=first, anchor=anchor):
            with torch.enable_grad():
                loss = closure()
                if not isinstance(loss, Tensor) or loss.grad_fn is None:
                    raise SamplingError("VON's closure must return the loss with its graph and must not call "
                                        "backward (VON differentiates it itself)")
                grads = torch.autograd.grad(loss, params, create_graph=self.hessian == "exact", allow_unused=True)
                g = torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in zip(grads, params)])
                if self.hessian == "exact":
                    eye = torch.eye(self.d, dtype=g.dtype, device=g.device)
                    rows = torch.autograd.grad(g, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
                    H = torch.cat([(torch.zeros(self.d, p.numel(), dtype=g.dtype, device=g.device) if r is None
                                    else r.reshape(self.d, -1)) for r, p in zip(rows, params)], dim=1)
                    H = H.detach().to(torch.float64).cpu()
                    H = 0.5 * (H + H.T)
        g = g.detach().to(torch.float64).cpu()
        if self.hessian == "price":
            outer = torch.outer(g, theta - m) @ S  # ĝ(θ-m)ᵀS, symmetrized (§7)
            H = 0.5 * (outer + outer.T)
        return loss.detach(), g, H

    def _draws(self, generator: Optional[torch.Generator]) -> list[Optional[Tensor]]:
        if self.expectation == "mean":
            return [None]
        return [torch.randn(self.d, dtype=torch.float64, generator=generator) for _ in range(self.mc_samples)]

    @staticmethod
    def _sample(m: Tensor, low: Tensor, z: Optional[Tensor]) -> Tensor:
        """:math:`\\theta=m+L^{-\\top}z` (Cov = S⁻¹; §7, O10)."""
        if z is None:
            return m
        return m + torch.linalg.solve_triangular(low.T, z.unsqueeze(1), upper=True).squeeze(1)

    # ------------------------------------------------------------------ refresh
    def _refresh_anchor(self, loss_fn: Callable[[Any], Tensor], data: Iterable[Any], *, model: Optional[nn.Module],
                        batch_size: Optional[Callable[[Any], int]], progress: bool) -> tuple[int, int]:
        r""":math:`m_{out}\leftarrow m`, :math:`P_{out}\leftarrow P`, and chunk-weighted
        :math:`\bar g_{out},\bar H_{out}` over ``data`` at samples of :math:`q_{out}` (anchor
        generator) or at :math:`m_{out}` (``expectation="mean"``)."""
        m_out, P_out = self._flat(), self.P.clone()
        S_out = self.precision_matrix(P_out)
        low = cholesky(S_out, "VON refresh")
        names = self._names()

        def evaluate(batch: Any) -> tuple[list[Tensor], list[Tensor], int]:
            draws = self._draws(self.anchor.generator)
            g_c, H_c = torch.zeros(self.d, dtype=torch.float64), torch.zeros(self.d, self.d, dtype=torch.float64)
            for z in draws:
                _, g, H = self._stats(lambda: loss_fn(batch), self._sample(m_out, low, z), m_out, S_out, names)
                g_c += g / len(draws)
                H_c += H / len(draws)
            return [g_c], [H_c], len(draws)

        g_bar, H_bar, passes, seen = self.anchor.accumulate(evaluate, data, names=["flat parameters"], model=model,
                                                            batch_size=batch_size, progress=progress, sync=self.sync)
        self.anchor.publish([m_out], g_bar, H_bar, extra={"P": P_out}, step=self.t, examples=seen)
        return passes, seen

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None, *,  # type: ignore[override]
             batch_size: Optional[int] = None) -> Tensor:
        """One VON(-PoCo) step, eqs. (25)-(27); ``closure`` returns the mean loss with its graph."""
        if closure is None:
            raise SamplingError("VON.step needs a closure returning the loss (without backward)")
        c = self.correction
        c.begin_step()
        g = self._group
        eta, delta = g["lr"], g["weight_decay"]
        alpha, anchor_pass = c.alpha_now, c.anchor_pass
        names = self._names()
        m = self._flat()
        S = self.precision_matrix()
        low = cholesky(S, "VON step")
        draws = self._draws(None)
        G_in = torch.zeros(self.d, dtype=torch.float64)
        H_in = torch.zeros(self.d, self.d, dtype=torch.float64)
        G_out, H_out = torch.zeros_like(G_in), torch.zeros_like(H_in)
        if anchor_pass:
            m_out, P_out = self.anchor.mean[0], self.anchor.extra["P"]  # type: ignore[index]
            S_out = self.precision_matrix(P_out)
            low_out = cholesky(S_out, "VON anchor")
        losses = []
        for k, z in enumerate(draws):
            def current(k: int = k, z: Optional[Tensor] = z) -> Tensor:
                nonlocal G_in, H_in
                loss, gi, Hi = self._stats(closure, self._sample(m, low, z), m, S, names, first=k == 0)
                G_in += gi / len(draws)
                H_in += Hi / len(draws)
                return loss

            def anchor(z: Optional[Tensor] = z) -> None:
                nonlocal G_out, H_out
                z_out = z if (self.poco.anchor_noise == "shared" or z is None) else torch.randn(
                    self.d, dtype=torch.float64, generator=self.anchor.generator)
                _, go, Ho = self._stats(closure, self._sample(m_out, low_out, z_out), m_out, S_out, names,
                                        anchor=True)
                G_out += go / len(draws)
                H_out += Ho / len(draws)

            losses.append(c.two_pass(current, anchor if anchor_pass else None))
        loss = torch.stack(losses).mean()
        if self.sync and ranks.active():
            ranks.agree_finite(bool(torch.isfinite(loss)))
            ranks.mean_([G_in, H_in, G_out, H_out])
        if not (bool(torch.isfinite(loss)) and bool(torch.isfinite(G_in).all()) and bool(torch.isfinite(H_in).all())
                and bool(torch.isfinite(G_out).all()) and bool(torch.isfinite(H_out).all())):
            raise NonFiniteError("non-finite loss, gradient or Hessian in a VON step; no state changed")
        G, H = G_in, H_in
        if alpha != 0.0:
            g_bar, H_bar = self.anchor.grad[0], self.anchor.hess[0]  # type: ignore[index]
            G = (G_in - alpha * G_out) + alpha * g_bar
            H = (H_in - alpha * H_out) + alpha * H_bar
            if self.poco.proximal:
                G = G + alpha * ((H_bar - H_out) @ (m - m_out))
        eye = torch.eye(self.d, dtype=torch.float64)
        D = H - self.P
        P_new = self.P + eta * D
        if self.pd_correction:
            P_new = P_new + 0.5 * eta**2 * (D @ torch.linalg.solve(self.P + delta * eye, D))
        P_new = 0.5 * (P_new + P_new.T)
        A = P_new + delta * eye
        low_new, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            raise NonFiniteError("VON: the updated P + δI is not positive definite (an indefinite Hessian); "
                                 "use pd_correction=True, hessian='price', or a smaller lr; no state changed")
        m_new = m - eta * torch.cholesky_solve((G + delta * m).unsqueeze(1), low_new).squeeze(1)
        if self.poco.track_stats:
            self.last_stats = {"G_in": G_in, "H_in": H_in, "G_out": G_out, "H_out": H_out, "G": G, "H": H}
        self.P = P_new
        self._write_flat(m_new)()
        c.count_step(len(draws) * (2 if anchor_pass else 1), batch_size)
        return loss

    # ------------------------------------------------------------------ serialization
    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["vbpc"] = {**self.correction.state_dict(), "P": self.P.clone()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("vbpc")
        if extra is None or "P" not in extra:
            raise StateDictMismatchError("not a VON state dict (no 'vbpc.P')")
        if tuple(extra["P"].shape) != (self.d, self.d):
            raise StateDictMismatchError(f"saved P has shape {tuple(extra['P'].shape)}, this VON has d={self.d}")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "vbpc"})
        self.P = extra["P"].to(torch.float64).clone()
        self.correction.load_state_dict(extra, anchor=False)  # the anchor holds flat vectors: restored here
        saved = extra["anchor"]
        self.anchor.mean = None if saved["mean"] is None else [t.clone() for t in saved["mean"]]
        self.anchor.grad = None if saved["grad"] is None else [t.clone() for t in saved["grad"]]
        self.anchor.hess = None if saved.get("hess") is None else [t.clone() for t in saved["hess"]]
        self.anchor.extra = dict(saved.get("extra", {}))
        self.anchor.refreshes, self.anchor.step = int(saved["refreshes"]), int(saved["step"])
        self.anchor.examples, self.anchor.sigma = int(saved.get("examples", 0)), float(saved.get("sigma", 0.0))
        self.anchor.generator.set_state(saved["generator"])


class VON(VONPoCo):
    """VON, the full-Gaussian Bayesian learning rule: plain (α = 0, no anchor) unless given
    ``correction=vbpc.PoCo(...)``, which makes it :class:`VONPoCo`."""

    def __init__(self, params: Iterable[Any], lr: float, ess: float, weight_decay: float = 0.0, *,
                 correction: Optional[PoCo] = None, **kw: Any):
        if correction is None:  # plain VON unless correction options are given
            correction = PoCo(**{"alpha": 0.0, **{k: kw.pop(k) for k in PoCo.fields() if k in kw}})
        super().__init__(params, lr, ess, weight_decay, correction=correction, **kw)

