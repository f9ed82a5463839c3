r"""The isotropic Gaussian :math:`\mathcal N(m,\sigma^2I)` (docs/algorithms.md §5): VSGD's family."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..errors import StateDictMismatchError
from ..scope import Scope, select_parameters
from .base import GaussianPosterior, MeanEntry, check_mean_state, check_same_layout

__all__ = ["IsotropicGaussian"]


class IsotropicGaussian(GaussianPosterior):
    r"""Isotropic Gaussian :math:`\mathcal N(m,\sigma^2I)` over named tensors (docs/algorithms.md §5).

    ``sigma`` is a 0-d float64 tensor: fixed, or updated by a learner when ``learn_sigma``.
    :math:`\sigma=0` is the delta method (VSGD-PoCo with σ=0 is SVRG, §4 P1): samples are the
    mean exactly and draw no random numbers; the entropy is :math:`-\infty`.
    """

    family = "isotropic"

    def __init__(self, entries: list[MeanEntry], sigma: Union[float, Tensor], *, learn_sigma: bool = False):
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
    ) -> IsotropicGaussian:
        """A posterior whose mean *is* the module's parameters (shared, not copied)."""
        pairs = select_parameters(model, scope, module_types=module_types, include=include, exclude=exclude)
        return cls([MeanEntry(n, p, target=p) for n, p in pairs], sigma, learn_sigma=learn_sigma)

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
    def _from_state(cls, state: Mapping, model: Optional[nn.Module] = None) -> IsotropicGaussian:
        check_mean_state(state, cls.family, ("sigma",))
        post = cls([MeanEntry(n, state["mean"][n].clone()) for n in state["names"]], state["sigma"],
                   learn_sigma=bool(state.get("learn_sigma", False)))
        return post.bind(model) if model is not None else post

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Copy a saved posterior into this one in place; checks everything before writing."""
        check_mean_state(state, self.family, ("sigma",))
        check_same_layout(self, state)
        sigma = float(state["sigma"])
        if not (math.isfinite(sigma) and sigma >= 0):
            raise StateDictMismatchError(f"saved sigma must be finite and >= 0, got {sigma}")
        for e in self._entries:
            e.mean.copy_(state["mean"][e.name])
        self.sigma.fill_(sigma)
        self.learn_sigma = bool(state.get("learn_sigma", self.learn_sigma))
