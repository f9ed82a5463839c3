r"""Gaussian posteriors over the parameters of any :class:`torch.nn.Module`.

A :class:`DiagonalGaussian` holds, per named parameter tensor, a mean :math:`m`, a
per-example curvature :math:`h`, an effective sample size :math:`\lambda` (``ess``) and
a prior precision per example :math:`\delta` (``weight_decay``), ALGORITHMS.md eq. (3):

.. math::
    q(\theta) = \mathcal N\big(m, \mathrm{diag}(S)^{-1}\big), \qquad S=\lambda(h+\delta),
    \qquad \sigma = 1/\sqrt{\lambda(h+\delta)}.

This is exactly the state :class:`vbpc.IVON` keeps, so ``IVON.posterior()`` returns a
view on the optimizer's tensors without copying.  A posterior built from a precision
:math:`S` directly uses :math:`h=S`, :math:`\lambda=1`, :math:`\delta=0`.

Sampling into a module is a context manager that writes :math:`\theta=m+\sigma\odot z`
*in place* into the live parameters and restores them **bit for bit** on exit, also
when the body raises (ALGORITHMS.md §2.2 fix 2, oracle §10.5).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .errors import SamplingError, StateDictMismatchError
from .functional import gaussian_noise_
from .scope import Scope, select_parameters

__all__ = ["GaussianPosterior", "DiagonalGaussian", "perturbation", "BAYES_PRECISION_SUFFIX"]

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


class GaussianPosterior:
    """Interface shared by vbpc's Gaussian families (diagonal now; isotropic/full later)."""

    family: str = "abstract"

    @property
    def names(self) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def sample(self, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def sampled(self, model: Optional[nn.Module] = None, generator: Optional[torch.Generator] = None):
        """Context manager loading one weight sample into ``model`` (restored bitwise on exit)."""
        raise NotImplementedError  # pragma: no cover

    def entropy(self) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def kl(self, other: "GaussianPosterior") -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def log_prob(self, theta: Mapping[str, Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def state_dict(self) -> dict:  # pragma: no cover
        raise NotImplementedError


class DiagonalGaussian(GaussianPosterior):
    r"""Diagonal Gaussian :math:`\mathcal N(m,\mathrm{diag}(\lambda(h+\delta))^{-1})` over named tensors.

    Build one with :meth:`from_module` (any network, any scope), :meth:`from_state_dict`
    (a saved posterior, for prediction without the optimizer) or ``IVON.posterior()``.
    """

    family = "diagonal"

    def __init__(self, entries: list[_Entry]):
        if not entries:
            raise ValueError("a DiagonalGaussian needs at least one parameter tensor")
        seen = set()
        for e in entries:
            if e.name in seen:
                raise ValueError(f"duplicate parameter name {e.name!r}")
            seen.add(e.name)
            if e.mean.shape != e.hess.shape:
                raise ValueError(f"{e.name}: mean shape {tuple(e.mean.shape)} != hess shape {tuple(e.hess.shape)}")
            if not e.ess > 0:
                raise ValueError(f"{e.name}: ess must be > 0, got {e.ess}")
        self._entries = entries

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

    def bind(self, model: nn.Module) -> "DiagonalGaussian":
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

    # ------------------------------------------------------------------ accessors
    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    @property
    def mean(self) -> dict[str, Tensor]:
        return {e.name: e.mean for e in self._entries}

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

    def numel(self) -> int:
        return sum(e.mean.numel() for e in self._entries)

    def __repr__(self) -> str:
        return f"DiagonalGaussian({len(self._entries)} tensors, {self.numel()} parameters)"

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

    @contextlib.contextmanager
    def sampled(self, model: Optional[nn.Module] = None, generator: Optional[torch.Generator] = None):
        """Load one weight sample into the module; restore the parameters bitwise on exit.

        Yields the sample dictionary.  Nested or overlapping sampling raises
        :class:`~vbpc.errors.SamplingError`; exceptions in the body still restore.
        """
        if model is not None:
            self.bind(model)
        missing = [e.name for e in self._entries if e.target is None]
        if missing:
            raise SamplingError(f"posterior is not bound to a module (e.g. {missing[0]!r}); pass the model")
        theta = self.sample(generator)
        targets: list[Tensor] = [e.target for e in self._entries]  # type: ignore[misc]

        def write() -> None:
            _copy_(targets, [theta[e.name] for e in self._entries])

        with perturbation(targets, self.names, "DiagonalGaussian.sampled", write):
            yield theta

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

    def kl(self, other: "GaussianPosterior") -> Tensor:
        r""":math:`\mathrm{KL}(q\|p)=\tfrac12\sum_j[S^p_j/S^q_j+S^p_j(m^q_j-m^p_j)^2-1+\log(S^q_j/S^p_j)]` (float64)."""
        if not isinstance(other, DiagonalGaussian):
            raise TypeError(f"KL from a diagonal Gaussian to {type(other).__name__} is not implemented")
        if other.names != self.names:
            raise ValueError("KL needs posteriors over the same parameter names in the same order")
        total = torch.zeros((), dtype=torch.float64)
        for a, b in zip(self._entries, other._entries):
            if a.mean.shape != b.mean.shape:
                raise ValueError(f"KL: {a.name} shapes differ: {tuple(a.mean.shape)} vs {tuple(b.mean.shape)}")
            sq, sp = a.precision().double(), b.precision().double().to(a.mean.device)
            r = a.mean.double() - b.mean.double().to(a.mean.device)
            total = total + (0.5 * (sp / sq + sp * r * r - 1.0 + (sq / sp).log())).sum().cpu()
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
            if tuple(state["mean"][n].shape) != tuple(state["hess"][n].shape):
                raise StateDictMismatchError(f"{n}: mean and hess shapes differ in the state dict")

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
    """The dtype state is kept in: at least ``floor`` (fp32), ALGORITHMS.md §2.2 fix 5."""
    return torch.promote_types(dtype, floor)
