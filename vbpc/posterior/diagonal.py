r"""The diagonal Gaussian (docs/algorithms.md eq. 3): IVON's posterior family."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..errors import NonFiniteError, StateDictMismatchError
from ..functional import gaussian_noise_
from ..scope import Scope, select_parameters
from .base import BAYES_PRECISION_SUFFIX, Entry, GaussianPosterior, state_dtype

__all__ = ["DiagonalGaussian"]


class DiagonalGaussian(GaussianPosterior):
    r"""Diagonal Gaussian :math:`\mathcal N(m,\mathrm{diag}(\lambda(h+\delta))^{-1})` over named tensors.

    Build one with :meth:`from_module` (any network, any scope), :meth:`from_state_dict`
    (a saved posterior, for prediction without the optimizer) or ``IVON.posterior()``.
    """

    family = "diagonal"

    def __init__(self, entries: list[Entry]):
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
    ) -> DiagonalGaussian:
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
                hess = torch.as_tensor(precision[name], dtype=state_dtype(p.dtype), device=p.device)
                hess = hess.expand_as(p).clone()
            else:
                if not precision > 0:
                    raise ValueError(f"precision must be > 0, got {precision}")
                hess = torch.full_like(p, float(precision), dtype=state_dtype(p.dtype))
            entries.append(Entry(name, p, hess, 1.0, 0.0, target=p))
        return cls(entries)

    @classmethod
    def from_state_dict(cls, state: Mapping, model: Optional[nn.Module] = None) -> DiagonalGaussian:
        """Rebuild a saved posterior; with ``model`` it is bound for :meth:`sampled`."""
        return cls._from_state(state, model)

    @classmethod
    def _from_state(cls, state: Mapping, model: Optional[nn.Module] = None) -> DiagonalGaussian:
        cls._check_state(state)
        entries = [
            Entry(n, state["mean"][n].clone(), state["hess"][n].clone(), float(state["ess"][n]),
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

    def prior(self, mean: float = 0.0) -> DiagonalGaussian:
        r"""The prior of objective (2), :math:`\mathcal N(\text{mean}, (\lambda\delta)^{-1}I)`, per tensor."""
        entries = []
        for e in self._entries:
            if not e.weight_decay > 0:
                raise ValueError(f"{e.name}: the prior needs weight_decay > 0 (prior precision = ess * weight_decay)")
            entries.append(Entry(e.name, torch.full_like(e.mean, mean, dtype=e.hess.dtype),
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
