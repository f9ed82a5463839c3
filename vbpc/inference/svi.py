r"""Pyro interoperability: a Bayes-by-backprop baseline and vbpc posteriors as Pyro guides.

**Bayes by backprop** (Blundell et al., 2015) through Pyro's stochastic variational
inference, on the *same* ``nn.Module`` that vbpc's learners train.  With vbpc's scaling
convention (docs/algorithms.md §1: mean loss, ``ess`` :math:`=\lambda`, ``weight_decay``
:math:`=\delta`) :class:`BayesByBackprop` minimises the negative ELBO of eq. (2) over a
mean-field Gaussian :math:`q=\mathcal N(m,\mathrm{diag}(\sigma^2))`,

.. math::
    \mathcal E(q)=\lambda\,\mathbb E_q\big[\bar\ell_B(\theta)\big]
        +\mathrm{KL}\big(q\,\big\|\,\mathcal N(0,(\lambda\delta)^{-1}I)\big),\qquad
    \bar\ell_B(\theta)=\tfrac1{|B|}\textstyle\sum_{i\in B}-\log p(y_i\mid x_i,\theta),

i.e. the likelihood of a mini-batch is scaled by :math:`\lambda/|B|`
(``poutine.scale``) while the KL term, computed in closed form by
``TraceMeanField_ELBO``, is not scaled.  The prior standard deviation is
:math:`1/\sqrt{\lambda\delta}` (pass ``weight_decay`` or ``prior_std``).  The learned
posterior maps onto :class:`vbpc.DiagonalGaussian` with the same :math:`\lambda,\delta`
and :math:`h=1/(\lambda\sigma^2)-\delta`, so that :math:`\lambda(h+\delta)=1/\sigma^2`.

**Export.** :func:`to_pyro_model` turns a copy of any network into a Pyro model whose
latent sites are the parameters in scope, named exactly as in ``named_parameters``;
:func:`to_pyro_guide` turns any :class:`vbpc.GaussianPosterior` over those names into a
matching guide, so that ``pyro.infer.Predictive(pyro_model, guide=guide,
num_samples=S)(x)`` samples the posterior predictive

.. math::
    p(y\mid x)\approx\frac1S\sum_{s=1}^S p(y\mid x,\theta_s),\qquad \theta_s\sim q .

Pyro's parameter store is global and keyed by name, so two learners over the same
architecture would silently share parameters.  Every ``PyroModule`` here is therefore built
and called under ``pyro.settings.context(module_local_params=True)``
(:func:`pyro_local_params`; :class:`PyroNetModel` and :class:`MeanFieldGuide` enter it
themselves): learnable tensors live in the modules, never in the global store, whatever
the caller's setting, and ``SVI``/``Predictive`` can be used on them directly.  The
exported model and guide hold no learnable tensors at all.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO
from pyro.nn.module import PyroModule, PyroParam, PyroSample, to_pyro_module_
from pyro.optim import PyroOptim
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..posterior import DiagonalGaussian, Entry, FullGaussian, GaussianPosterior, IsotropicGaussian
from ..posterior.base import state_dtype
from ..scope import Scope, select_parameters

__all__ = [
    "BayesByBackprop",
    "MeanFieldGuide",
    "PosteriorGuide",
    "PyroNetModel",
    "LIKELIHOODS",
    "OBS_SITE",
    "OUTPUT_SITE",
    "PROBS_SITE",
    "FLAT_SITE",
    "pyro_local_params",
    "to_pyro",
    "to_pyro_guide",
    "to_pyro_model",
]

#: Supported likelihoods: ``"categorical"`` on logits, ``"gaussian"`` with a fixed noise std.
LIKELIHOODS = ("categorical", "gaussian")
#: Observed site (the labels / targets), inside the ``"data"`` plate.
OBS_SITE = "obs"
#: Deterministic site holding the network output (logits for classification).
OUTPUT_SITE = "output"
#: Deterministic site holding ``softmax(output)`` (categorical likelihood only).
PROBS_SITE = "probs"
#: Auxiliary joint site of a :class:`~vbpc.FullGaussian` guide (the flattened parameter vector).
FLAT_SITE = "_vbpc_flat"
_RESERVED = (OBS_SITE, OUTPUT_SITE, PROBS_SITE, FLAT_SITE, "data")

SitesSpec = Union[str, Scope, Sequence[str], GaussianPosterior]


def pyro_local_params() -> contextlib.AbstractContextManager:
    """``pyro.settings.context(module_local_params=True)``: Pyro parameters stay in their modules."""
    return pyro.settings.context(module_local_params=True)


# ----------------------------------------------------------------------------- helpers
def _check_likelihood(likelihood: str, noise_std: float) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")
    if likelihood == "gaussian" and not (math.isfinite(noise_std) and noise_std > 0):
        raise ValueError(f"noise_std must be finite and > 0, got {noise_std!r}")


def _resolve_prior(ess: float, weight_decay: Optional[float], prior_std: Optional[float],
                   default_weight_decay: Optional[float] = None) -> tuple[float, float]:
    r"""``(prior_std, weight_decay)`` with :math:`\sigma_0^2=1/(\lambda\delta)`; exactly one may be given."""
    if not (math.isfinite(ess) and ess > 0):
        raise ValueError(f"ess must be finite and > 0, got {ess!r}")
    if weight_decay is not None and prior_std is not None:
        raise ValueError("pass either weight_decay (prior precision / ess) or prior_std, not both")
    if prior_std is None and weight_decay is None:
        weight_decay = default_weight_decay
    if prior_std is not None:
        if not (math.isfinite(prior_std) and prior_std > 0):
            raise ValueError(f"prior_std must be finite and > 0, got {prior_std!r}")
        return float(prior_std), 1.0 / (ess * prior_std * prior_std)
    if weight_decay is None or not (math.isfinite(weight_decay) and weight_decay > 0):
        raise ValueError(f"weight_decay must be finite and > 0 (prior precision = ess * weight_decay), "
                         f"got {weight_decay!r}")
    return 1.0 / math.sqrt(ess * weight_decay), float(weight_decay)


def _ids_with_several_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {k: v for k, v in names.items() if len(v) > 1}


def _resolve_sites(model: nn.Module, sites: SitesSpec, module_types=None, include=None,
                   exclude=None) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs that become latent sites, in the order of ``sites``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(sites, (str, Scope)):
        pairs = select_parameters(model, sites, module_types=module_types, include=include, exclude=exclude)
    else:
        if module_types is not None or include is not None or exclude is not None:
            raise ValueError("module_types/include/exclude only apply to a scope name, not to explicit sites")
        names = sites.names if isinstance(sites, GaussianPosterior) else list(sites)
        shapes = ({e.name: tuple(e.mean.shape) for e in sites._entries}
                  if isinstance(sites, GaussianPosterior) else {})
        params = dict(model.named_parameters(remove_duplicate=False))
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"{len(missing)} posterior/site name(s) are not parameters of {type(model).__name__} "
                             f"(e.g. {missing[:3]}); its parameters are e.g. {list(params)[:3]}")
        bad = [n for n in names if n in shapes and tuple(params[n].shape) != shapes[n]]
        if bad:
            n = bad[0]
            raise ValueError(f"{n}: posterior shape {shapes[n]} != model shape {tuple(params[n].shape)}")
        if len(set(names)) != len(names):
            raise ValueError("duplicate site names")
        pairs = [(n, params[n]) for n in names]
    if not pairs:
        raise ValueError("no parameter selected as a latent site")
    tied = _ids_with_several_names(model)
    for n, p in pairs:
        if id(p) in tied:
            raise ValueError(f"parameter {n!r} is tied (also named {[m for m in tied[id(p)] if m != n]}); "
                             "tied parameters cannot be Pyro sample sites")
        if n in _RESERVED:
            raise ValueError(f"parameter name {n!r} clashes with a reserved Pyro site name {_RESERVED}")
    return pairs


def _normal_prior(like: Tensor, std: float) -> dist.TorchDistribution:
    r""":math:`\mathcal N(0,\sigma_0^2I)` over a tensor of ``like``'s shape, all dims as event dims."""
    loc = torch.zeros((), dtype=like.dtype, device=like.device)
    scale = torch.full((), std, dtype=like.dtype, device=like.device)
    return dist.Normal(loc, scale).expand(like.shape).to_event(like.dim())


def _split(name: str) -> tuple[str, str]:
    path, _, leaf = name.rpartition(".")
    return path, leaf


def _build_net(model: nn.Module, pairs: list[tuple[str, nn.Parameter]], prior_stds: Mapping[str, float],
               rest: str) -> PyroModule:
    """A deep copy of ``model`` converted with ``to_pyro_module_``: parameters in ``pairs`` become
    ``PyroSample`` priors; the others become ``PyroParam`` (``rest="param"``, trainable) or buffers
    (``rest="buffer"``, fixed point values).  Frozen parameters always become buffers."""
    in_scope = {n for n, _ in pairs}
    with pyro_local_params():
        net = copy.deepcopy(model)
        to_pyro_module_(net)
        params = list(net.named_parameters(remove_duplicate=False))
        tied = _ids_with_several_names(net)
        for name, p in params:
            sub = net.get_submodule(_split(name)[0])
            leaf = _split(name)[1]
            value = p.detach().clone()
            if name in in_scope:
                setattr(sub, leaf, PyroSample(_normal_prior(value, prior_stds[name])))
            elif rest == "param" and p.requires_grad:
                if id(p) in tied:
                    raise ValueError(f"out-of-scope parameter {name!r} is tied to {tied[id(p)]}; tied point "
                                     "estimates are not supported")
                setattr(sub, leaf, PyroParam(value, constraints.real, event_dim=value.dim()))
            else:
                delattr(sub, leaf)
                sub.register_buffer(leaf, value)
    return net


# ----------------------------------------------------------------------------- Pyro model
class PyroNetModel(nn.Module):
    r"""A Pyro model around a converted copy of a network (built by :func:`to_pyro_model`).

    ``forward(x, y=None)`` samples every latent parameter site :math:`\theta\sim p_0`
    (sites named as in the source module's ``named_parameters``), computes
    ``output = net(x)`` (recorded as the deterministic site ``"output"``, and
    ``softmax(output)`` as ``"probs"`` for the categorical likelihood; both inside the data
    plate, so ``Predictive`` returns them with shape ``(S, N, ...)``) and scores

    .. math::
        \frac{\lambda}{|B|}\sum_{i\in B}\log p(y_i\mid \mathrm{output}_i),\qquad
        p=\mathrm{Cat}(\mathrm{softmax})\ \text{or}\ \mathcal N(\cdot,\sigma_n^2I),

    inside ``pyro.plate("data", |B|)`` and ``poutine.scale(λ/|B|)`` (site ``"obs"``; sampled
    when ``y`` is None).  The parameter sites are outside the plate and unscaled.

    The wrapper is a plain ``nn.Module`` so that the converted network is a *root*
    ``PyroModule`` and its site names carry no prefix.
    """

    def __init__(self, net: PyroModule, site_shapes: Mapping[str, tuple[int, ...]], *, likelihood: str,
                 ess: float, noise_std: float, prior_stds: Mapping[str, float]) -> None:
        super().__init__()
        _check_likelihood(likelihood, noise_std)
        self.net = net
        self.site_shapes = dict(site_shapes)
        self.likelihood = likelihood
        self.ess = float(ess)
        self.noise_std = float(noise_std)
        self.prior_stds = dict(prior_stds)

    @property
    def site_names(self) -> list[str]:
        """The latent parameter sites, in the source module's order."""
        return list(self.site_shapes)

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        with pyro_local_params():
            out = self.net(x)
        if out.dim() < 1:
            raise ValueError("the network output needs a leading batch dimension")
        n, event_dim = out.shape[0], out.dim() - 1
        with pyro.plate("data", n), poutine.scale(scale=self.ess / n):
            pyro.deterministic(OUTPUT_SITE, out, event_dim=event_dim)
            if self.likelihood == "categorical":
                pyro.deterministic(PROBS_SITE, F.softmax(out, dim=-1), event_dim=event_dim)
                pyro.sample(OBS_SITE, dist.Categorical(logits=out), obs=y)
            else:
                pyro.sample(OBS_SITE, dist.Normal(out, self.noise_std).to_event(out.dim() - 1), obs=y)
        return out

    def extra_repr(self) -> str:
        return f"likelihood={self.likelihood!r}, ess={self.ess}, sites={len(self.site_shapes)}"


def to_pyro_model(
    model: nn.Module,
    sites: SitesSpec = Scope.ALL,
    *,
    likelihood: str = "categorical",
    ess: Optional[float] = None,
    weight_decay: Optional[float] = None,
    prior_std: Optional[float] = None,
    noise_std: float = 1.0,
    module_types=None,
    include=None,
    exclude=None,
) -> PyroNetModel:
    r"""A Pyro model over a deep copy of ``model`` (the original is not modified).

    ``sites`` picks the latent parameters: a scope name (``"all"``, ``"last_layer"``, ...,
    with ``module_types``/``include``/``exclude`` as in :func:`vbpc.select_parameters`), a
    list of parameter names, or a :class:`~vbpc.GaussianPosterior` (its names).  Each
    becomes ``PyroSample(Normal(0, σ₀).expand(shape).to_event(dim))``; all other parameters
    become fixed buffers with their current values.

    Prior :math:`\sigma_0=1/\sqrt{\lambda\delta}` from ``weight_decay`` :math:`\delta` (or
    ``prior_std`` directly).  With neither, a :class:`~vbpc.DiagonalGaussian` ``sites`` gives
    each tensor its own prior (:meth:`~vbpc.DiagonalGaussian.prior`), else :math:`\sigma_0=1`.
    ``ess`` :math:`\lambda` scales the likelihood (default: the diagonal posterior's common
    ``ess``, else 1); it does not matter for prediction.
    """
    _check_likelihood(likelihood, noise_std)
    pairs = _resolve_sites(model, sites, module_types, include, exclude)
    diag = sites if isinstance(sites, DiagonalGaussian) else None
    if ess is None:
        esses = {e.ess for e in diag._entries} if diag is not None else set()
        ess = esses.pop() if len(esses) == 1 else 1.0
    prior_stds: dict[str, float]
    if weight_decay is None and prior_std is None:
        if diag is not None and all(e.weight_decay > 0 for e in diag._entries):
            prior_stds = {e.name: 1.0 / math.sqrt(e.ess * e.weight_decay) for e in diag._entries}
        else:
            prior_stds = {n: 1.0 for n, _ in pairs}
    else:
        std, _ = _resolve_prior(float(ess), weight_decay, prior_std)
        prior_stds = {n: std for n, _ in pairs}
    net = _build_net(model, pairs, prior_stds, rest="buffer")
    return PyroNetModel(net, {n: tuple(p.shape) for n, p in pairs}, likelihood=likelihood, ess=float(ess),
                        noise_std=noise_std, prior_stds=prior_stds)


# ----------------------------------------------------------------------------- exported guide
class PosteriorGuide:
    r"""A Pyro guide sampling a snapshot of a :class:`~vbpc.GaussianPosterior` (see :func:`to_pyro_guide`).

    * diagonal: ``Normal(m, σ).to_event(dim)`` per site, :math:`\sigma=1/\sqrt{\lambda(h+\delta)}`;
    * isotropic: ``Normal(m, σ)`` per site with the scalar σ (``Delta(m)`` for σ = 0);
    * full: one auxiliary joint site ``"_vbpc_flat"`` :math:`\sim\mathcal N(m, S^{-1})`
      (``MultivariateNormal`` with the Cholesky factor of :math:`S^{-1}`, float64, over the
      row-major concatenation in the posterior's order), split into the per-parameter
      sites as ``Delta`` values.

    Callable with any arguments (those of the model); returns ``{site name: value}``.  The
    guide has no learnable parameters; re-export after further training.
    """

    def __init__(self, posterior: GaussianPosterior) -> None:
        if not isinstance(posterior, GaussianPosterior):
            raise TypeError(f"expected a vbpc GaussianPosterior, got {type(posterior).__name__}")
        self.family = posterior.family
        self.site_shapes = {e.name: tuple(e.mean.shape) for e in posterior._entries}
        self._dtypes = {e.name: e.mean.dtype for e in posterior._entries}
        self._devices = {e.name: e.mean.device for e in posterior._entries}
        with torch.no_grad():
            self.loc = {e.name: e.mean.detach().clone() for e in posterior._entries}
            if isinstance(posterior, DiagonalGaussian):
                self.scale: Any = {n: s.to(self._dtypes[n]) for n, s in posterior.std.items()}
            elif isinstance(posterior, IsotropicGaussian):
                self.scale = float(posterior.sigma)
            elif isinstance(posterior, FullGaussian):
                self.flat_loc = posterior._flat_mean()
                # Cov = S^{-1} = L^{-T} L^{-1} (S = L L^T); its own lower Cholesky factor, once
                self.scale_tril = torch.linalg.cholesky(posterior.covariance())
                self.scale = None
            else:
                raise TypeError(f"no Pyro guide for the {type(posterior).__name__} family")

    @property
    def site_names(self) -> list[str]:
        return list(self.site_shapes)

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.family == "full":
            flat = pyro.sample(FLAT_SITE, dist.MultivariateNormal(self.flat_loc, scale_tril=self.scale_tril),
                               infer={"is_auxiliary": True})
            off = 0
            for n, shape in self.site_shapes.items():
                k = math.prod(shape)
                value = flat[off:off + k].reshape(shape).to(dtype=self._dtypes[n], device=self._devices[n])
                off += k
                out[n] = pyro.sample(n, dist.Delta(value, event_dim=len(shape)))
            return out
        for n, loc in self.loc.items():
            if self.family == "diagonal":
                d: dist.TorchDistribution = dist.Normal(loc, self.scale[n]).to_event(loc.dim())
            elif self.scale == 0.0:
                d = dist.Delta(loc, event_dim=loc.dim())
            else:
                d = dist.Normal(loc, torch.full((), self.scale, dtype=loc.dtype, device=loc.device)).to_event(
                    loc.dim())
            out[n] = pyro.sample(n, d)
        return out

    def __repr__(self) -> str:
        return f"PosteriorGuide({self.family}, {len(self.site_shapes)} sites)"


def to_pyro_guide(posterior: GaussianPosterior, model: nn.Module) -> PosteriorGuide:
    """A Pyro guide for ``posterior``, checked against ``model``.

    ``model`` is a :class:`PyroNetModel` (then the posterior must cover exactly its latent
    sites, with equal shapes) or the plain source ``nn.Module`` (then every posterior name
    must be one of its parameters, with the same shape).  Raises ``ValueError`` naming the
    mismatch.  Neither the posterior nor the model is modified.
    """
    if not isinstance(posterior, GaussianPosterior):
        raise TypeError(f"expected a vbpc GaussianPosterior, got {type(posterior).__name__}")
    shapes = {e.name: tuple(e.mean.shape) for e in posterior._entries}
    if isinstance(model, PyroNetModel):
        extra = [n for n in shapes if n not in model.site_shapes]
        missing = [n for n in model.site_shapes if n not in shapes]
        if extra or missing:
            raise ValueError(f"posterior does not match the Pyro model: posterior names not among the model's "
                             f"latent sites: {extra[:5]}; latent sites the posterior does not cover: {missing[:5]}")
        for n, s in shapes.items():
            if model.site_shapes[n] != s:
                raise ValueError(f"{n}: posterior shape {s} != model site shape {model.site_shapes[n]}")
    else:
        _resolve_sites(model, posterior)
    return PosteriorGuide(posterior)


def to_pyro(posterior: GaussianPosterior, model: nn.Module, **model_kwargs: Any) -> tuple[PyroNetModel, PosteriorGuide]:
    """``(to_pyro_model(model, posterior, **model_kwargs), to_pyro_guide(posterior, model))``."""
    pyro_model = to_pyro_model(model, posterior, **model_kwargs)
    return pyro_model, to_pyro_guide(posterior, pyro_model)


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
        self.optim = optim if optim is not None else pyro.optim.Adam({"lr": float(lr)})
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

