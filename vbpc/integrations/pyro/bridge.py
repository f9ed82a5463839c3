r"""Pyro interoperability: vbpc posteriors as Pyro models and guides (see the package docstring)."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union, cast

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import constraints
from pyro.nn.module import PyroModule, PyroParam, PyroSample, to_pyro_module_
from torch import Tensor, nn

from ...posterior import DiagonalGaussian, FullGaussian, GaussianPosterior, IsotropicGaussian
from ...scope import Scope, select_parameters

__all__ = ["PosteriorGuide", "PyroNetModel", "LIKELIHOODS", "OBS_SITE", "OUTPUT_SITE", "PROBS_SITE", "FLAT_SITE",
           "pyro_local_params", "to_pyro", "to_pyro_guide", "to_pyro_model"]


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
    return cast(PyroModule, net)


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
