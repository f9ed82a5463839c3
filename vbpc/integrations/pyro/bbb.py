r"""Bayes by backprop (Blundell et al., 2015) through Pyro SVI on the same ``nn.Module`` vbpc's learners train
(see the package docstring for the objective)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO
from pyro.nn.module import PyroModule, PyroParam
from pyro.optim import PyroOptim
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...posterior import DiagonalGaussian, Entry
from ...posterior.base import state_dtype
from ...scope import Scope
from .bridge import (
    OUTPUT_SITE,
    PROBS_SITE,
    PyroNetModel,
    _build_net,
    _check_likelihood,
    _ids_with_several_names,
    _resolve_prior,
    _resolve_sites,
    _split,
    pyro_local_params,
)

__all__ = ["BayesByBackprop", "MeanFieldGuide"]


def _predictive_mean(model: PyroNetModel, guide: Any, x: Tensor, n_samples: int, chunk: int) -> Tensor:
    """Mean over ``n_samples`` of ``probs`` (categorical) or ``output`` via ``Predictive``, in chunks."""
    site = PROBS_SITE if model.likelihood == "categorical" else OUTPUT_SITE
    total: Optional[Tensor] = None
    done = 0
    while done < n_samples:
        k = min(chunk, n_samples - done)
        draws = Predictive(model, guide=guide, num_samples=k, return_sites=(site,))(x)[site]
        part = draws.sum(0)
        total = part if total is None else total + part
        done += k
    assert total is not None
    return total / n_samples


# ----------------------------------------------------------------------------- BBB
class MeanFieldGuide(PyroModule):
    r"""Mean-field Gaussian guide :math:`q(\theta)=\prod_j\mathcal N(m_j,\sigma_j^2)`, one site per tensor.

    Site ``name`` is ``pyro.sample(name, Normal(loc, scale).to_event(dim))`` directly (no
    auxiliary site), so ``TraceMeanField_ELBO`` computes the KL to a Normal prior in closed
    form.  ``loc`` is a real ``PyroParam`` initialised at the given values; ``scale`` a
    softplus-constrained one (:math:`\sigma=\log(1+e^\rho)`) initialised at ``init_scale``.
    """

    def __init__(self, init_locs: Mapping[str, Tensor], init_scale: float) -> None:
        if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a finite float > 0, got {init_scale!r}")
        with pyro_local_params():  # the module's Pyro context is created for local parameters
            super().__init__(name="_vbpc_guide")
            self.site_names = list(init_locs)
            for i, v in enumerate(init_locs.values()):
                v = v.detach().clone()
                setattr(self, f"loc_{i}", PyroParam(v, constraints.real, event_dim=v.dim()))
                setattr(self, f"scale_{i}", PyroParam(torch.full_like(v, float(init_scale)),
                                                      constraints.softplus_positive, event_dim=v.dim()))

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        with pyro_local_params():
            return super().__call__(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        out = {}
        for i, n in enumerate(self.site_names):
            loc, scale = getattr(self, f"loc_{i}"), getattr(self, f"scale_{i}")
            out[n] = pyro.sample(n, dist.Normal(loc, scale).to_event(loc.dim()))
        return out

    def loc(self, name: str) -> Tensor:
        """The mean of site ``name`` (detached)."""
        return getattr(self, f"loc_{self.site_names.index(name)}").detach()

    def scale(self, name: str) -> Tensor:
        """The standard deviation of site ``name`` (detached)."""
        return getattr(self, f"scale_{self.site_names.index(name)}").detach()


class BayesByBackprop:
    r"""Bayes by backprop (mean-field VI, reparameterised) with Pyro SVI on any ``nn.Module``.

    Minimises, per mini-batch :math:`B`, docs/algorithms.md eq. (2)

    .. math::
        \mathcal E(q)=\frac{\lambda}{|B|}\sum_{i\in B}\mathbb E_q[-\log p(y_i\mid x_i,\theta)]
        +\mathrm{KL}\big(q\,\|\,\mathcal N(0,(\lambda\delta)^{-1}I)\big)

    with ``TraceMeanField_ELBO`` (closed-form KL, ``num_particles`` reparameterised draws
    for the likelihood) and ``pyro.optim.Adam`` (or ``optim``).

    The network is a deep copy of ``model`` converted with ``to_pyro_module_``; ``model``
    itself is never modified (use :meth:`copy_to` to write the result back).  Parameters in
    scope (``scope``/``module_types``/``include``/``exclude``, as in
    :func:`vbpc.select_parameters`; all trainable ones by default) get the prior and a
    :class:`MeanFieldGuide` whose means start at the current weights and whose stds start at
    ``init_scale``; other trainable parameters are point estimates (maximum likelihood,
    ``PyroParam``); frozen ones stay fixed.  Tied parameters are not supported.

    Args:
        model: the network (its output: logits, or the regression mean).
        ess: effective sample size :math:`\lambda` (the training-set size for the ELBO).
        weight_decay: :math:`\delta`, prior precision / ess (default 1e-4, as IVON); or
        prior_std: :math:`\sigma_0=1/\sqrt{\lambda\delta}` directly.
        init_scale: initial posterior std.
        lr: Adam step size (ignored when ``optim`` is given).
        num_particles: Monte-Carlo draws per step.
        likelihood: ``"categorical"`` (logits, integer labels) or ``"gaussian"`` (outputs shaped
            like the targets, fixed ``noise_std``).
        scope, module_types, include, exclude: which parameters are Bayesian.
        optim: a ``pyro.optim.PyroOptim`` (e.g. ``pyro.optim.ClippedAdam({...})``).

    ``model`` (:class:`PyroNetModel`), ``guide`` (:class:`MeanFieldGuide`) and ``svi`` are
    public; plain Pyro calls on them (``Predictive``, another ``SVI``) work without touching
    Pyro's global parameter store.
    """

    def __init__(
        self,
        model: nn.Module,
        ess: float,
        *,
        weight_decay: Optional[float] = None,
        prior_std: Optional[float] = None,
        init_scale: float = 1e-2,
        lr: float = 1e-3,
        num_particles: int = 1,
        likelihood: str = "categorical",
        noise_std: float = 1.0,
        scope: Union[str, Scope] = Scope.ALL,
        module_types=None,
        include=None,
        exclude=None,
        optim: Optional[PyroOptim] = None,
    ) -> None:
        _check_likelihood(likelihood, noise_std)
        self.ess = float(ess)
        self.prior_std, self.weight_decay = _resolve_prior(self.ess, weight_decay, prior_std, 1e-4)
        if not (isinstance(num_particles, int) and num_particles >= 1):
            raise ValueError(f"num_particles must be an int >= 1, got {num_particles!r}")
        if optim is None and not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be finite and > 0, got {lr!r}")
        self.source = model
        self._tied_check(model)
        pairs = _resolve_sites(model, scope, module_types, include, exclude)
        self._targets = dict(pairs)
        prior_stds = {n: self.prior_std for n, _ in pairs}
        with pyro_local_params():
            net = _build_net(model, pairs, prior_stds, rest="param")
            self.model = PyroNetModel(net, {n: tuple(p.shape) for n, p in pairs}, likelihood=likelihood,
                                      ess=self.ess, noise_std=noise_std, prior_stds=prior_stds)
            self.guide = MeanFieldGuide({n: p for n, p in pairs}, float(init_scale))
        self.optim = optim if optim is not None else pyro.optim.Adam({"lr": float(lr)})  # type: ignore[attr-defined]  # generated at import
        self.elbo = TraceMeanField_ELBO(num_particles=num_particles, max_plate_nesting=1)
        self.svi = SVI(self.model, self.guide, self.optim, loss=self.elbo)
        self.steps = 0

    @staticmethod
    def _tied_check(model: nn.Module) -> None:
        tied = _ids_with_several_names(model)
        if tied:
            raise ValueError(f"tied parameters are not supported (e.g. {next(iter(tied.values()))})")

    @property
    def site_names(self) -> list[str]:
        return self.guide.site_names

    def _device(self) -> torch.device:
        return self.guide.loc(self.site_names[0]).device

    # ------------------------------------------------------------------ training
    def step(self, x: Tensor, y: Tensor) -> float:
        r"""One SVI step on the batch; returns the negative ELBO per example,
        :math:`\mathcal E/\lambda=\mathbb E_q\bar\ell_B+\mathrm{KL}/\lambda` (one-sample estimate)."""
        dev = self._device()
        x, y = x.to(dev), y.to(dev)
        self.model.train()
        with pyro_local_params():
            loss = self.svi.step(x, y)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite negative ELBO {loss} at step {self.steps}")
        self.steps += 1
        return loss / self.ess

    @torch.no_grad()
    def loss(self, x: Tensor, y: Tensor) -> float:
        """The negative ELBO per example on the batch without a parameter update (``svi.evaluate_loss``)."""
        dev = self._device()
        with pyro_local_params():
            return self.svi.evaluate_loss(x.to(dev), y.to(dev)) / self.ess

    def fit(self, loader: Iterable[tuple[Tensor, Tensor]], epochs: int = 1, progress: bool = True) -> list[float]:
        """``epochs`` passes of :meth:`step` over ``loader``; returns each epoch's mean per-example loss."""
        history = []
        for epoch in range(int(epochs)):
            total, count = 0.0, 0
            bar = tqdm(loader, desc=f"bbb {epoch + 1}/{epochs}", disable=not progress, dynamic_ncols=True,
                       mininterval=0.5)
            for x, y in bar:
                total += self.step(x, y) * len(y)
                count += len(y)
                if progress:
                    bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
            bar.close()
            if count == 0:
                raise ValueError("fit: the loader yielded no batch")
            history.append(total / count)
        return history

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict(self, x: Tensor, n_samples: int = 64, *, chunk: int = 64) -> Tensor:
        r"""Bayesian model average via ``pyro.infer.Predictive``:
        :math:`\frac1S\sum_s\mathrm{softmax}(f_{\theta_s}(x))` (categorical) or
        :math:`\frac1S\sum_s f_{\theta_s}(x)` (gaussian), :math:`\theta_s\sim q`.
        ``n_samples=0`` uses the posterior mean.  The network runs in eval mode."""
        if n_samples < 0:
            raise ValueError(f"n_samples must be >= 0, got {n_samples}")
        x = x.to(self._device())
        was = self.model.training
        self.model.eval()
        try:
            with pyro_local_params():
                if n_samples == 0:
                    means = {n: self.guide.loc(n) for n in self.site_names}
                    guide = poutine.condition(self.guide, data=means)
                    return _predictive_mean(self.model, guide, x, 1, 1)
                return _predictive_mean(self.model, self.guide, x, n_samples, max(1, int(chunk)))
        finally:
            self.model.train(was)

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def posterior(self) -> DiagonalGaussian:
        r"""The guide as a :class:`~vbpc.DiagonalGaussian` (a snapshot) over the source module's names.

        Mean :math:`m`; ``ess`` :math:`\lambda` and ``weight_decay`` :math:`\delta` of this learner;
        :math:`h=1/(\lambda\sigma^2)-\delta` (float64 arithmetic, stored in the state dtype), so
        that ``std`` is the guide's scale and ``prior()`` the BBB prior.  Bound to the source
        module, so ``with post.sampled(model): ...`` and :func:`vbpc.training.evaluate` work.
        """
        entries = []
        for n in self.site_names:
            target = self._targets[n]
            std = self.guide.scale(n).double()
            hess = (1.0 / (self.ess * std * std) - self.weight_decay).to(state_dtype(target.dtype))
            entries.append(Entry(n, self.guide.loc(n).clone().to(target.dtype), hess, self.ess,
                                  self.weight_decay, target=target))
        return DiagonalGaussian(entries)

    @torch.no_grad()
    def copy_to(self, model: Optional[nn.Module] = None) -> nn.Module:
        """Write the posterior mean, the point-estimated parameters and the buffers (e.g. BatchNorm
        statistics) into ``model`` (default: the source module); returns it."""
        model = self.source if model is None else model
        params = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers())
        values: dict[str, Tensor] = {n: self.guide.loc(n) for n in self.site_names}
        for n in params:
            if n in values:
                continue
            sub = self.model.net.get_submodule(_split(n)[0])
            values[n] = getattr(sub, _split(n)[1]).detach()  # PyroParam (outside a Pyro context) or buffer
        missing = [n for n in params if n not in values]
        if missing:
            raise ValueError(f"{type(model).__name__} has parameters this learner does not know: {missing[:3]}")
        for n, p in params.items():
            p.copy_(values[n])
        own = dict(self.model.net.named_buffers())
        for n, b in buffers.items():
            if n in own:
                b.copy_(own[n])
        return model

    def __repr__(self) -> str:
        return (f"BayesByBackprop(ess={self.ess}, weight_decay={self.weight_decay}, prior_std={self.prior_std:.4g}, "
                f"{len(self.site_names)} sites, likelihood={self.model.likelihood!r}, steps={self.steps})")
