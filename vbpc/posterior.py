r"""Gaussian posteriors over the parameters of any :class:`torch.nn.Module`.

A :class:`DiagonalGaussian` holds, per named parameter tensor, a mean :math:`m`, a
per-example curvature :math:`h`, an effective sample size :math:`\lambda` (``ess``) and
a prior precision per example :math:`\delta` (``weight_decay``), docs/algorithms.md eq. (3):

.. math::
    q(\theta) = \mathcal N\big(m, \mathrm{diag}(S)^{-1}\big), \qquad S=\lambda(h+\delta),
    \qquad \sigma = 1/\sqrt{\lambda(h+\delta)}.

This is exactly the state :class:`vbpc.IVON` keeps, so ``IVON.posterior()`` returns a
view on the optimizer's tensors without copying.  A posterior built from a precision
:math:`S` directly uses :math:`h=S`, :math:`\lambda=1`, :math:`\delta=0`.

Sampling into a module is a context manager that writes :math:`\theta=m+\sigma\odot z`
*in place* into the live parameters and restores them **bit for bit** on exit, also
when the body raises (docs/algorithms.md §2.2 fix 2, oracle §10.5).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ._dtensor import any_dtensor, locals_
from .errors import NonFiniteError, SamplingError, StateDictMismatchError
from .functional import gaussian_noise_
from .scope import Scope, select_parameters

__all__ = [
    "GaussianPosterior",
    "DiagonalGaussian",
    "IsotropicGaussian",
    "FullGaussian",
    "perturbation",
    "BAYES_PRECISION_SUFFIX",
]

#: Bayesian layers (``vbpc.nn``) store the precision of parameter ``w`` in buffer ``w_precision``.
BAYES_PRECISION_SUFFIX = "_precision"

# Tensors currently holding a weight sample, with the owner that perturbed them.  Guards
# against nested or overlapping sampling contexts, which would restore the wrong values.
_PERTURBED: dict[int, str] = {}


@contextlib.contextmanager
def perturbation(
    targets: list[Tensor],
    names: Union[list[str], Callable[[], list[str]]],
    owner: str,
    write: Callable[[], None],
    saved: Optional[list[Tensor]] = None,
) -> Iterator[list[Tensor]]:
    """Save ``targets``, call ``write()`` to load a weight sample into them in place, and
    restore the saved values bitwise on exit, also when the body raises.

    ``saved`` are optional preallocated buffers (reused across steps by the learners).
    Raises :class:`SamplingError` if a target already holds a sample (nested contexts).
    Yields the saved originals.
    """
    for i, t in enumerate(targets):
        if id(t) in _PERTURBED:
            name = (names() if callable(names) else names)[i]
            raise SamplingError(
                f"{owner}: parameter {name!r} already holds a weight sample from {_PERTURBED[id(t)]}; "
                "sampling contexts cannot be nested"
            )
    with torch.no_grad():
        if saved is None:
            saved = [t.detach().clone() for t in targets]
        else:
            _copy_(saved, targets)
        for t in targets:
            _PERTURBED[id(t)] = owner
    try:
        with torch.no_grad():
            write()
        yield saved
    finally:
        with torch.no_grad():
            _copy_(targets, saved)
        for t in targets:
            _PERTURBED.pop(id(t), None)


def _copy_(dst: list[Tensor], src: list[Tensor]) -> None:
    if any_dtensor(dst) or any_dtensor(src):  # sharded (FSDP2) parameters: copy the local shards
        dst, src = locals_(dst), locals_(src)
    if all(d.dtype == s.dtype and d.device == s.device for d, s in zip(dst, src)):
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


@dataclass
class _Entry:
    """One parameter tensor of a diagonal posterior (tensors are shared, never copied)."""

    name: str
    mean: Tensor
    hess: Tensor
    ess: float
    weight_decay: float
    target: Optional[Tensor] = None  # live module tensor that receives samples

    def precision(self) -> Tensor:
        return self.hess.add(self.weight_decay).mul_(self.ess)


@dataclass
class _MeanEntry:
    """One parameter tensor of an isotropic or full posterior: a name, a (shared) mean, a target."""

    name: str
    mean: Tensor
    target: Optional[Tensor] = None


class GaussianPosterior:
    """Interface shared by vbpc's Gaussian families: ``"diagonal"``, ``"isotropic"``, ``"full"``.

    Every family is a Gaussian over named parameter tensors whose means may be shared with a
    module's parameters.  Common to all: :attr:`names`, :attr:`mean`, :meth:`numel`,
    :meth:`bind`, :meth:`sampled`, :meth:`kl`; per family: :meth:`sample`, :meth:`entropy`,
    :meth:`log_prob`, :meth:`state_dict` / :meth:`load_state_dict`.  Densities are float64
    scalars.  :meth:`GaussianPosterior.from_state_dict` rebuilds any family.
    """

    family: str = "abstract"
    _entries: list

    # ------------------------------------------------------------------ common
    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    @property
    def mean(self) -> dict[str, Tensor]:
        return {e.name: e.mean for e in self._entries}

    def numel(self) -> int:
        return sum(e.mean.numel() for e in self._entries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._entries)} tensors, {self.numel()} parameters)"

    def _check_entries(self) -> None:
        if not self._entries:
            raise ValueError(f"a {type(self).__name__} needs at least one parameter tensor")
        names = self.names
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate parameter name {dup[0]!r}")

    def bind(self, model: nn.Module) -> "GaussianPosterior":
        """Attach the module whose parameters receive samples (matched by name, or by identity
        for entries already bound to one of its parameters).  All-or-nothing on mismatch."""
        params = dict(model.named_parameters(remove_duplicate=False))
        own = {id(p) for p in params.values()}
        targets = []
        for e in self._entries:
            if e.target is not None and id(e.target) in own:
                targets.append(e.target)
                continue
            if e.name not in params:
                raise StateDictMismatchError(f"posterior parameter {e.name!r} is not in {type(model).__name__}")
            if params[e.name].shape != e.mean.shape:
                raise StateDictMismatchError(
                    f"{e.name}: posterior shape {tuple(e.mean.shape)} != model shape {tuple(params[e.name].shape)}"
                )
            targets.append(params[e.name])
        for e, t in zip(self._entries, targets):
            e.target = t
        return self

    @contextlib.contextmanager
    def sampled(self, model: Optional[nn.Module] = None, generator: Optional[torch.Generator] = None,
                theta: Optional[Mapping[str, Tensor]] = None):
        """Load one weight sample into the module; restore the parameters bitwise on exit.

        Yields the sample dictionary: a fresh :meth:`sample` drawn with ``generator``, or the given
        ``theta`` (e.g. a draw made earlier; it must cover every parameter).  Nested or overlapping
        sampling raises :class:`~vbpc.errors.SamplingError`; exceptions in the body still restore.
        """
        if model is not None:
            self.bind(model)
        missing = [e.name for e in self._entries if e.target is None]
        if missing:
            raise SamplingError(f"posterior is not bound to a module (e.g. {missing[0]!r}); pass the model")
        if theta is None:
            theta = self.sample(generator)
        else:
            self._check_theta(theta)
        targets: list[Tensor] = [e.target for e in self._entries]

        def write() -> None:
            _copy_(targets, [theta[e.name].to(t.dtype) for e, t in zip(self._entries, targets)])

        with perturbation(targets, self.names, f"{type(self).__name__}.sampled", write):
            yield theta

    def _check_theta(self, theta: Mapping[str, Tensor]) -> None:
        for e in self._entries:
            if e.name not in theta:
                raise KeyError(f"log_prob: sample has no tensor {e.name!r}")
            if tuple(theta[e.name].shape) != tuple(e.mean.shape):
                raise ValueError(f"log_prob: {e.name} has shape {tuple(theta[e.name].shape)}, "
                                 f"expected {tuple(e.mean.shape)}")

    def _flat(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([tensors[e.name].detach().double().reshape(-1).cpu() for e in self._entries])

    def _flat_mean(self) -> Tensor:
        return self._flat(self.mean)

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        out, off = {}, 0
        for e in self._entries:
            n = e.mean.numel()
            out[e.name] = flat[off:off + n].view(e.mean.shape)
            off += n
        return out

    def _diag_precision(self) -> Tensor:  # pragma: no cover - per family
        raise NotImplementedError

    def _dense_precision(self, max_dim: int) -> Tensor:
        """The sum-scale precision as a (d, d) float64 matrix (for KL across families)."""
        d = self.numel()
        if d > max_dim:
            raise ValueError(f"{type(self).__name__} over {d} parameters is too large for a dense "
                             f"precision (max_dim={max_dim})")
        return torch.diag(self._diag_precision())

    def kl(self, other: "GaussianPosterior") -> Tensor:
        r""":math:`\mathrm{KL}(q\|p)` in float64, for any two families over the same tensors.

        Diagonal and isotropic pairs use the elementwise form
        :math:`\tfrac12\sum_j[S^p_j/S^q_j+S^p_j(m^q_j-m^p_j)^2-1+\log(S^q_j/S^p_j)]`; a full
        member on either side makes both dense:
        :math:`\tfrac12[\mathrm{tr}(S_pS_q^{-1})+(m_q-m_p)^\top S_p(m_q-m_p)-d+\log\det S_q-\log\det S_p]`.
        """
        if not isinstance(other, GaussianPosterior):
            raise TypeError(f"KL to {type(other).__name__} is not defined")
        if other.names != self.names:
            raise ValueError("KL needs posteriors over the same parameter names in the same order")
        for a, b in zip(self._entries, other._entries):
            if a.mean.shape != b.mean.shape:
                raise ValueError(f"KL: {a.name} shapes differ: {tuple(a.mean.shape)} vs {tuple(b.mean.shape)}")
        r = self._flat_mean() - other._flat_mean()
        if "full" in (self.family, other.family):
            max_dim = max(getattr(self, "max_dim", 0), getattr(other, "max_dim", 0))
            sq, sp = self._dense_precision(max_dim), other._dense_precision(max_dim)
            lq, lp = _cholesky(sq, "KL"), _cholesky(sp, "KL")
            trace = (sp * torch.cholesky_inverse(lq)).sum()
            logdet = 2 * lq.diagonal().log().sum() - 2 * lp.diagonal().log().sum()
            return 0.5 * (trace + r @ sp @ r - r.numel() + logdet)
        sq, sp = self._diag_precision(), other._diag_precision()
        return (0.5 * (sp / sq + sp * r * r - 1.0 + (sq / sp).log())).sum()

    # ------------------------------------------------------------------ per family
    def sample(self, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def sample_stack(self, n: int, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """``n`` samples stacked sample-first, ``{name: (n, *shape)}`` (for batched BMA, §9).

        The base implementation stacks ``n`` calls of :meth:`sample`; families may draw all ``n``
        at once (same distribution, a different order of the random stream)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        draws = [self.sample(generator) for _ in range(n)]
        return {k: torch.stack([d[k] for d in draws]) for k in self.names}

    def entropy(self) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def log_prob(self, theta: Mapping[str, Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def state_dict(self) -> dict:  # pragma: no cover
        raise NotImplementedError

    def load_state_dict(self, state: Mapping) -> None:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def _from_state(cls, state: Mapping, model: Optional[nn.Module] = None) -> "GaussianPosterior":
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def from_state_dict(state: Mapping, model: Optional[nn.Module] = None) -> "GaussianPosterior":
        """Rebuild a saved posterior of any family; with ``model`` it is bound for :meth:`sampled`."""
        family = state.get("family") if isinstance(state, Mapping) else None
        classes = {c.family: c for c in (DiagonalGaussian, IsotropicGaussian, FullGaussian)}
        if family not in classes:
            raise StateDictMismatchError(f"unknown posterior family {family!r}; expected one of {sorted(classes)}")
        return classes[family]._from_state(state, model)


class DiagonalGaussian(GaussianPosterior):
    r"""Diagonal Gaussian :math:`\mathcal N(m,\mathrm{diag}(\lambda(h+\delta))^{-1})` over named tensors.

    Build one with :meth:`from_module` (any network, any scope), :meth:`from_state_dict`
    (a saved posterior, for prediction without the optimizer) or ``IVON.posterior()``.
    """

    family = "diagonal"

    def __init__(self, entries: list[_Entry]):
        self._entries = entries
        self._check_entries()
        for e in entries:
            if e.mean.shape != e.hess.shape:
                raise ValueError(f"{e.name}: mean shape {tuple(e.mean.shape)} != hess shape {tuple(e.hess.shape)}")
            if not e.ess > 0:
                raise ValueError(f"{e.name}: ess must be > 0, got {e.ess}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(
        cls,
        model: nn.Module,
        scope: Union[str, Scope] = Scope.ALL,
        *,
        precision: Union[float, Mapping[str, Tensor]] = 1.0,
        module_types=None,
        include=None,
        exclude=None,
    ) -> "DiagonalGaussian":
        """A posterior whose mean *is* the module's parameters (shared, not copied).

        The precision comes from Bayesian layers' ``<param>_precision`` buffers where present
        (shared too), else from ``precision`` (a scalar or a per-name mapping of tensors).
        """
        pairs = select_parameters(model, scope, module_types=module_types, include=include, exclude=exclude)
        buffers = dict(model.named_buffers())
        entries = []
        for name, p in pairs:
            buf = buffers.get(name + BAYES_PRECISION_SUFFIX)
            if buf is not None:
                hess = buf
            elif isinstance(precision, Mapping):
                if name not in precision:
                    raise KeyError(f"precision mapping has no entry for {name!r}")
                hess = torch.as_tensor(precision[name], dtype=_state_dtype(p.dtype), device=p.device)
                hess = hess.expand_as(p).clone()
            else:
                if not precision > 0:
                    raise ValueError(f"precision must be > 0, got {precision}")
                hess = torch.full_like(p, float(precision), dtype=_state_dtype(p.dtype))
            entries.append(_Entry(name, p, hess, 1.0, 0.0, target=p))
        return cls(entries)

    @classmethod
    def from_state_dict(cls, state: Mapping, model: Optional[nn.Module] = None) -> "DiagonalGaussian":
        """Rebuild a saved posterior; with ``model`` it is bound for :meth:`sampled`."""
        return cls._from_state(state, model)

    @classmethod
    def _from_state(cls, state: Mapping, model: Optional[nn.Module] = None) -> "DiagonalGaussian":
        cls._check_state(state)
        entries = [
            _Entry(n, state["mean"][n].clone(), state["hess"][n].clone(), float(state["ess"][n]),
                   float(state["weight_decay"][n]))
            for n in state["names"]
        ]
        post = cls(entries)
        if model is not None:
            post.bind(model)
        return post

    # ------------------------------------------------------------------ accessors
    @property
    def hess(self) -> dict[str, Tensor]:
        return {e.name: e.hess for e in self._entries}

    @property
    def precision(self) -> dict[str, Tensor]:
        r"""Sum-scale precision :math:`\lambda(h+\delta)` per tensor (eq. 3); a new tensor."""
        return {e.name: e.precision() for e in self._entries}

    @property
    def variance(self) -> dict[str, Tensor]:
        return {e.name: e.precision().reciprocal_() for e in self._entries}

    @property
    def std(self) -> dict[str, Tensor]:
        return {e.name: e.precision().sqrt_().reciprocal_() for e in self._entries}

    def _diag_precision(self) -> Tensor:
        return torch.cat([e.precision().double().reshape(-1).cpu() for e in self._entries])

    # ------------------------------------------------------------------ sampling
    def _noise(self, generator: Optional[torch.Generator]) -> list[Tensor]:
        z = [torch.randn(e.hess.shape, dtype=e.hess.dtype, device=e.hess.device, generator=generator)
             for e in self._entries]
        out: list[Tensor] = []
        for e, zi in zip(self._entries, z):
            out += gaussian_noise_([zi], [e.hess], e.ess, e.weight_decay, foreach=False)
        return out

    @torch.no_grad()
    def sample(self, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        r""":math:`\theta = m + z/\sqrt{\lambda(h+\delta)}`, :math:`z\sim\mathcal N(0,I)` (eq. 5).

        Built in the wider of the mean's and the precision's dtypes."""
        noise = self._noise(generator)
        out = {}
        for e, n in zip(self._entries, noise):
            dtype = torch.promote_types(e.mean.dtype, n.dtype)
            out[e.name] = e.mean.to(dtype) + n.to(dtype)
        return out

    @torch.no_grad()
    def sample_stack(self, n: int, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        r""":math:`\theta_s = m + z_s/\sqrt{\lambda(h+\delta)}` for :math:`s=1..n` at once (eq. 5): one
        ``randn`` of shape ``(n, *shape)`` per tensor, scaled by the same kernel as :meth:`sample`."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        out = {}
        for e in self._entries:
            std = gaussian_noise_([torch.ones_like(e.hess)], [e.hess], e.ess, e.weight_decay, foreach=False)[0]
            z = torch.randn((n, *e.hess.shape), dtype=e.hess.dtype, device=e.hess.device, generator=generator)
            dtype = torch.promote_types(e.mean.dtype, z.dtype)
            out[e.name] = torch.addcmul(e.mean.to(dtype), z, std.to(dtype))  # one pass over the n samples
        return out

    # ------------------------------------------------------------------ densities
    def _logdet_terms(self) -> Tensor:
        return sum(e.precision().double().log().sum() for e in self._entries)  # type: ignore[return-value]

    def entropy(self) -> Tensor:
        r""":math:`\mathcal H[q]=\tfrac12\sum_j(1+\log 2\pi-\log S_j)` in float64."""
        d = self.numel()
        return 0.5 * d * (1.0 + math.log(2 * math.pi)) - 0.5 * self._logdet_terms()

    def log_prob(self, theta: Mapping[str, Tensor]) -> Tensor:
        r""":math:`\log q(\theta)=-\tfrac12\sum_j[S_j(\theta_j-m_j)^2-\log S_j+\log 2\pi]` in float64."""
        total = torch.zeros((), dtype=torch.float64)
        for e in self._entries:
            if e.name not in theta:
                raise KeyError(f"log_prob: sample has no tensor {e.name!r}")
            x = theta[e.name]
            if x.shape != e.mean.shape:
                raise ValueError(f"log_prob: {e.name} has shape {tuple(x.shape)}, expected {tuple(e.mean.shape)}")
            s = e.precision().double()
            r = x.double() - e.mean.double()
            total = total + (-0.5 * (s * r * r - s.log() + math.log(2 * math.pi))).sum().cpu()
        return total

    def prior(self, mean: float = 0.0) -> "DiagonalGaussian":
        r"""The prior of objective (2), :math:`\mathcal N(\text{mean}, (\lambda\delta)^{-1}I)`, per tensor."""
        entries = []
        for e in self._entries:
            if not e.weight_decay > 0:
                raise ValueError(f"{e.name}: the prior needs weight_decay > 0 (prior precision = ess * weight_decay)")
            entries.append(_Entry(e.name, torch.full_like(e.mean, mean, dtype=e.hess.dtype),
                                  torch.zeros_like(e.hess), e.ess, e.weight_decay))
        return DiagonalGaussian(entries)

    # ------------------------------------------------------------------ serialization
    def state_dict(self) -> dict:
        """Plain-data state (tensors detached and cloned), loadable without any optimizer."""
        return {
            "family": self.family,
            "version": 1,
            "names": self.names,
            "mean": {e.name: e.mean.detach().clone() for e in self._entries},
            "hess": {e.name: e.hess.detach().clone() for e in self._entries},
            "ess": {e.name: e.ess for e in self._entries},
            "weight_decay": {e.name: e.weight_decay for e in self._entries},
        }

    @staticmethod
    def _check_state(state: Mapping) -> None:
        if not isinstance(state, Mapping) or state.get("family") != "diagonal":
            fam = state.get("family") if isinstance(state, Mapping) else type(state).__name__
            raise StateDictMismatchError(f"expected a diagonal-Gaussian state dict, got family {fam!r}")
        for key in ("names", "mean", "hess", "ess", "weight_decay"):
            if key not in state:
                raise StateDictMismatchError(f"posterior state dict lacks {key!r}")
        for n in state["names"]:
            for key in ("mean", "hess", "ess", "weight_decay"):
                if n not in state[key]:
                    raise StateDictMismatchError(f"posterior state dict has no {key} for {n!r}")
            mean, hess = state["mean"][n], state["hess"][n]
            if not (isinstance(mean, Tensor) and isinstance(hess, Tensor)):
                raise StateDictMismatchError(f"{n}: mean and hess must be tensors in the state dict")
            if tuple(mean.shape) != tuple(hess.shape):
                raise StateDictMismatchError(f"{n}: mean and hess shapes differ in the state dict")
            ess, delta = state["ess"][n], state["weight_decay"][n]
            if not (isinstance(ess, (int, float)) and math.isfinite(ess) and ess > 0):
                raise ValueError(f"{n}: ess must be a finite number > 0 in the state dict, got {ess!r}")
            if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta >= 0):
                raise ValueError(f"{n}: weight_decay must be a finite number >= 0 in the state dict, got {delta!r}")
            if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(hess).all())):
                raise NonFiniteError(f"{n}: the saved posterior's mean or hess holds NaN or inf")
            if bool((hess < 0).any()) or not bool((hess + delta > 0).all()):
                raise ValueError(f"{n}: the saved hess has negative entries or zero precision λ(h+δ); "
                                 "a diagonal Gaussian needs h >= 0 and h + δ > 0")

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Copy a saved posterior into this one in place; checks everything before writing."""
        self._check_state(state)
        if list(state["names"]) != self.names:
            extra = sorted(set(state["names"]) ^ set(self.names))
            raise StateDictMismatchError(f"posterior names differ (e.g. {extra[:3]}) or are in another order")
        for e in self._entries:
            for key, t in (("mean", e.mean), ("hess", e.hess)):
                if tuple(state[key][e.name].shape) != tuple(t.shape):
                    raise StateDictMismatchError(
                        f"{e.name}: saved {key} shape {tuple(state[key][e.name].shape)} != {tuple(t.shape)}")
        for e in self._entries:
            e.mean.copy_(state["mean"][e.name])
            e.hess.copy_(state["hess"][e.name])
            e.ess = float(state["ess"][e.name])
            e.weight_decay = float(state["weight_decay"][e.name])

    @torch.no_grad()
    def to_module(self, model: nn.Module) -> None:
        """Write the mean into ``model``'s parameters and the precision into Bayesian layers' buffers."""
        params = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers())
        for e in self._entries:
            if e.name not in params:
                raise StateDictMismatchError(f"{e.name!r} is not a parameter of {type(model).__name__}")
            if params[e.name] is not e.mean:
                params[e.name].copy_(e.mean)
            buf = buffers.get(e.name + BAYES_PRECISION_SUFFIX)
            if buf is not None and buf is not e.hess:
                buf.copy_(e.precision())


def _state_dtype(dtype: torch.dtype, floor: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype state is kept in: at least ``floor`` (fp32), docs/algorithms.md §2.2 fix 5."""
    return torch.promote_types(dtype, floor)


def _cholesky(matrix: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor; a clear error if ``matrix`` is not symmetric positive definite."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise ValueError(f"{what}: the precision matrix is not positive definite (Cholesky failed at "
                         f"column {int(info) - 1})")
    return factor


def _check_mean_state(state: Mapping, family: str, keys: tuple[str, ...]) -> None:
    if not isinstance(state, Mapping) or state.get("family") != family:
        fam = state.get("family") if isinstance(state, Mapping) else type(state).__name__
        raise StateDictMismatchError(f"expected a {family}-Gaussian state dict, got family {fam!r}")
    for key in ("names", "mean", *keys):
        if key not in state:
            raise StateDictMismatchError(f"posterior state dict lacks {key!r}")
    for n in state["names"]:
        if n not in state["mean"]:
            raise StateDictMismatchError(f"posterior state dict has no mean for {n!r}")


def _check_same_layout(post: GaussianPosterior, state: Mapping) -> None:
    if list(state["names"]) != post.names:
        extra = sorted(set(state["names"]) ^ set(post.names))
        raise StateDictMismatchError(f"posterior names differ (e.g. {extra[:3]}) or are in another order")
    for e in post._entries:
        if tuple(state["mean"][e.name].shape) != tuple(e.mean.shape):
            raise StateDictMismatchError(
                f"{e.name}: saved mean shape {tuple(state['mean'][e.name].shape)} != {tuple(e.mean.shape)}")


class IsotropicGaussian(GaussianPosterior):
    r"""Isotropic Gaussian :math:`\mathcal N(m,\sigma^2I)` over named tensors (docs/algorithms.md §5).

    ``sigma`` is a 0-d float64 tensor: fixed, or updated by a learner when ``learn_sigma``.
    :math:`\sigma=0` is the delta method (VSGD-PoCo with σ=0 is SVRG, §4 P1): samples are the
    mean exactly and draw no random numbers; the entropy is :math:`-\infty`.
    """

    family = "isotropic"

    def __init__(self, entries: list[_MeanEntry], sigma: Union[float, Tensor], *, learn_sigma: bool = False):
        self._entries = entries
        self._check_entries()
        sigma_t = torch.as_tensor(sigma, dtype=torch.float64).detach().clone().cpu()
        if sigma_t.dim() != 0 or not bool(torch.isfinite(sigma_t)) or float(sigma_t) < 0:
            raise ValueError(f"sigma must be a finite scalar >= 0, got {sigma!r}")
        self.sigma = sigma_t
        self.learn_sigma = bool(learn_sigma)

    @classmethod
    def from_module(
        cls, model: nn.Module, scope: Union[str, Scope] = Scope.ALL, *, sigma: Union[float, Tensor],
        learn_sigma: bool = False, module_types=None, include=None, exclude=None,
    ) -> "IsotropicGaussian":
        """A posterior whose mean *is* the module's parameters (shared, not copied)."""
        pairs = select_parameters(model, scope, module_types=module_types, include=include, exclude=exclude)
        return cls([_MeanEntry(n, p, target=p) for n, p in pairs], sigma, learn_sigma=learn_sigma)

    @property
    def precision(self) -> float:
        r"""Sum-scale precision :math:`1/\sigma^2` (``inf`` for the delta method)."""
        s = float(self.sigma)
        return math.inf if s == 0.0 else 1.0 / (s * s)

    def _diag_precision(self) -> Tensor:
        if float(self.sigma) == 0.0:
            raise ValueError("a delta (sigma = 0) posterior has no finite density")
        return torch.full((self.numel(),), self.precision, dtype=torch.float64)

    @torch.no_grad()
    def sample(self, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        r""":math:`\theta=m+\sigma z`; for :math:`\sigma=0` a copy of the mean (no draw)."""
        s = float(self.sigma)
        out = {}
        for e in self._entries:
            if s == 0.0:
                out[e.name] = e.mean.detach().clone()
            else:
                z = torch.randn(e.mean.shape, dtype=e.mean.dtype, device=e.mean.device, generator=generator)
                out[e.name] = e.mean + z * s
        return out

    def entropy(self) -> Tensor:
        r""":math:`\tfrac d2(1+\log2\pi)+d\log\sigma` (:math:`-\infty` for σ=0)."""
        d, s = self.numel(), float(self.sigma)
        if s == 0.0:
            return torch.tensor(-math.inf, dtype=torch.float64)
        return torch.tensor(0.5 * d * (1.0 + math.log(2 * math.pi)) + d * math.log(s), dtype=torch.float64)

    def log_prob(self, theta: Mapping[str, Tensor]) -> Tensor:
        r""":math:`-\tfrac12\sum_j[(\theta_j-m_j)^2/\sigma^2+\log2\pi\sigma^2]`."""
        self._check_theta(theta)
        s = float(self.sigma)
        if s == 0.0:
            raise ValueError("a delta (sigma = 0) posterior has no finite density")
        r = self._flat(theta) - self._flat_mean()
        return -0.5 * ((r * r).sum() / (s * s) + r.numel() * math.log(2 * math.pi * s * s))

    def state_dict(self) -> dict:
        return {"family": self.family, "version": 1, "names": self.names,
                "mean": {e.name: e.mean.detach().clone() for e in self._entries},
                "sigma": float(self.sigma), "learn_sigma": self.learn_sigma}

    @classmethod
    def _from_state(cls, state: Mapping, model: Optional[nn.Module] = None) -> "IsotropicGaussian":
        _check_mean_state(state, cls.family, ("sigma",))
        post = cls([_MeanEntry(n, state["mean"][n].clone()) for n in state["names"]], state["sigma"],
                   learn_sigma=bool(state.get("learn_sigma", False)))
        return post.bind(model) if model is not None else post

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Copy a saved posterior into this one in place; checks everything before writing."""
        _check_mean_state(state, self.family, ("sigma",))
        _check_same_layout(self, state)
        sigma = float(state["sigma"])
        if not (math.isfinite(sigma) and sigma >= 0):
            raise StateDictMismatchError(f"saved sigma must be finite and >= 0, got {sigma}")
        for e in self._entries:
            e.mean.copy_(state["mean"][e.name])
        self.sigma.fill_(sigma)
        self.learn_sigma = bool(state.get("learn_sigma", self.learn_sigma))


class FullGaussian(GaussianPosterior):
    r"""Full-covariance Gaussian :math:`\mathcal N(m,S^{-1})` over named tensors (docs/algorithms.md §7).

    ``precision`` is the sum-scale :math:`S` as a symmetric positive-definite ``(d, d)``
    float64 matrix over the row-major concatenation of the tensors.  Sampling uses
    :math:`S=LL^\top`, :math:`\theta=m+L^{-\top}z`, so :math:`\mathrm{Cov}=S^{-1}` (§7; using
    :math:`L^{-1}` instead is the transposition bug O10 guards against).  :math:`O(d^2)` memory
    and :math:`O(d^3)` factorizations: ``max_dim`` (5000) bounds ``d`` (GLMs, last layers).
    """

    family = "full"

    def __init__(self, entries: list[_MeanEntry], precision: Tensor, *, max_dim: int = 5000):
        self._entries = entries
        self._check_entries()
        d = self.numel()
        if d > max_dim:
            raise ValueError(f"a full Gaussian over {d} parameters exceeds max_dim={max_dim}; use a diagonal "
                             "posterior or a smaller scope (e.g. 'last_layer'), or raise max_dim")
        self.max_dim = int(max_dim)
        self.precision = self._checked(torch.as_tensor(precision), d)
        self._chol: Optional[tuple[int, Tensor]] = None

    @staticmethod
    def _checked(precision: Tensor, d: int) -> Tensor:
        s = precision.detach().to(torch.float64).clone()
        if s.shape != (d, d):
            raise ValueError(f"precision must have shape ({d}, {d}), got {tuple(s.shape)}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError("precision has non-finite entries")
        scale = float(s.abs().max()) or 1.0
        if float((s - s.T).abs().max()) > 1e-10 * scale:
            raise ValueError("precision is not symmetric")
        _cholesky(s, "FullGaussian")
        return s

    @classmethod
    def from_module(
        cls, model: nn.Module, scope: Union[str, Scope] = Scope.ALL, *, precision: Union[float, Tensor] = 1.0,
        max_dim: int = 5000, module_types=None, include=None, exclude=None,
    ) -> "FullGaussian":
        """A posterior whose mean *is* the module's parameters; ``precision`` a scalar (×I) or (d, d)."""
        pairs = select_parameters(model, scope, module_types=module_types, include=include, exclude=exclude)
        d = sum(p.numel() for _, p in pairs)
        if d > max_dim:
            raise ValueError(f"scope selects {d} parameters, more than max_dim={max_dim} for a full Gaussian")
        s = torch.as_tensor(precision, dtype=torch.float64)
        if s.dim() == 0:
            s = float(s) * torch.eye(d, dtype=torch.float64)
        return cls([_MeanEntry(n, p, target=p) for n, p in pairs], s, max_dim=max_dim)

    def cholesky(self) -> Tensor:
        """Lower Cholesky factor of the precision (cached until the matrix is modified in place)."""
        key = self.precision._version
        if self._chol is None or self._chol[0] != key or self._chol[1].shape != self.precision.shape:
            self._chol = (key, _cholesky(self.precision, "FullGaussian"))
        return self._chol[1]

    def covariance(self) -> Tensor:
        """:math:`S^{-1}` (float64)."""
        return torch.cholesky_inverse(self.cholesky())

    def _dense_precision(self, max_dim: int) -> Tensor:
        return self.precision

    def _diag_precision(self) -> Tensor:
        return self.precision.diagonal().clone()

    @torch.no_grad()
    def sample(self, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        r""":math:`\theta=m+L^{-\top}z`, :math:`z\sim\mathcal N(0,I_d)` in float64 (on the CPU generator)."""
        z = torch.randn(self.numel(), dtype=torch.float64, generator=generator)
        x = torch.linalg.solve_triangular(self.cholesky().T, z.unsqueeze(1), upper=True).squeeze(1)
        flat = self._flat_mean() + x
        return {n: t.to(dtype=e.mean.dtype, device=e.mean.device)
                for (n, t), e in zip(self._unflatten(flat).items(), self._entries)}

    def entropy(self) -> Tensor:
        r""":math:`\tfrac d2(1+\log2\pi)-\tfrac12\log\det S`."""
        d = self.numel()
        return 0.5 * d * (1.0 + math.log(2 * math.pi)) - self.cholesky().diagonal().log().sum()

    def log_prob(self, theta: Mapping[str, Tensor]) -> Tensor:
        r""":math:`-\tfrac12[(\theta-m)^\top S(\theta-m)-\log\det S+d\log2\pi]`."""
        self._check_theta(theta)
        r = self._flat(theta) - self._flat_mean()
        logdet = 2 * self.cholesky().diagonal().log().sum()
        return -0.5 * (r @ self.precision @ r - logdet + r.numel() * math.log(2 * math.pi))

    def state_dict(self) -> dict:
        return {"family": self.family, "version": 1, "names": self.names,
                "mean": {e.name: e.mean.detach().clone() for e in self._entries},
                "precision": self.precision.clone(), "max_dim": self.max_dim}

    @classmethod
    def _from_state(cls, state: Mapping, model: Optional[nn.Module] = None) -> "FullGaussian":
        _check_mean_state(state, cls.family, ("precision",))
        post = cls([_MeanEntry(n, state["mean"][n].clone()) for n in state["names"]], state["precision"],
                   max_dim=int(state.get("max_dim", 5000)))
        return post.bind(model) if model is not None else post

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Copy a saved posterior into this one in place; checks everything before writing."""
        _check_mean_state(state, self.family, ("precision",))
        _check_same_layout(self, state)
        try:
            s = self._checked(torch.as_tensor(state["precision"]), self.numel())
        except ValueError as exc:
            raise StateDictMismatchError(f"saved precision: {exc}") from None
        for e in self._entries:
            e.mean.copy_(state["mean"][e.name])
        self.precision.copy_(s)
