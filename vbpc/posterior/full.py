r"""The full-covariance Gaussian :math:`\mathcal N(m,S^{-1})` (docs/algorithms.md §7): VON's family."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..errors import StateDictMismatchError
from ..scope import Scope, select_parameters
from .base import GaussianPosterior, MeanEntry, check_mean_state, check_same_layout, cholesky

__all__ = ["FullGaussian"]


class FullGaussian(GaussianPosterior):
    r"""Full-covariance Gaussian :math:`\mathcal N(m,S^{-1})` over named tensors (docs/algorithms.md §7).

    ``precision`` is the sum-scale :math:`S` as a symmetric positive-definite ``(d, d)``
    float64 matrix over the row-major concatenation of the tensors.  Sampling uses
    :math:`S=LL^\top`, :math:`\theta=m+L^{-\top}z`, so :math:`\mathrm{Cov}=S^{-1}` (§7; using
    :math:`L^{-1}` instead is the transposition bug O10 guards against).  :math:`O(d^2)` memory
    and :math:`O(d^3)` factorizations: ``max_dim`` (5000) bounds ``d`` (GLMs, last layers).
    """

    family = "full"

    def __init__(self, entries: list[MeanEntry], precision: Tensor, *, max_dim: int = 5000):
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
        cholesky(s, "FullGaussian")
        return s

    @classmethod
    def from_module(
        cls, model: nn.Module, scope: Union[str, Scope] = Scope.ALL, *, precision: Union[float, Tensor] = 1.0,
        max_dim: int = 5000, module_types=None, include=None, exclude=None,
    ) -> FullGaussian:
        """A posterior whose mean *is* the module's parameters; ``precision`` a scalar (×I) or (d, d)."""
        pairs = select_parameters(model, scope, module_types=module_types, include=include, exclude=exclude)
        d = sum(p.numel() for _, p in pairs)
        if d > max_dim:
            raise ValueError(f"scope selects {d} parameters, more than max_dim={max_dim} for a full Gaussian")
        s = torch.as_tensor(precision, dtype=torch.float64)
        if s.dim() == 0:
            s = float(s) * torch.eye(d, dtype=torch.float64)
        return cls([MeanEntry(n, p, target=p) for n, p in pairs], s, max_dim=max_dim)

    def cholesky(self) -> Tensor:
        """Lower Cholesky factor of the precision (cached until the matrix is modified in place)."""
        key = self.precision._version
        if self._chol is None or self._chol[0] != key or self._chol[1].shape != self.precision.shape:
            self._chol = (key, cholesky(self.precision, "FullGaussian"))
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
    def _from_state(cls, state: Mapping, model: Optional[nn.Module] = None) -> FullGaussian:
        check_mean_state(state, cls.family, ("precision",))
        post = cls([MeanEntry(n, state["mean"][n].clone()) for n in state["names"]], state["precision"],
                   max_dim=int(state.get("max_dim", 5000)))
        return post.bind(model) if model is not None else post

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Copy a saved posterior into this one in place; checks everything before writing."""
        check_mean_state(state, self.family, ("precision",))
        check_same_layout(self, state)
        try:
            s = self._checked(torch.as_tensor(state["precision"]), self.numel())
        except ValueError as exc:
            raise StateDictMismatchError(f"saved precision: {exc}") from None
        for e in self._entries:
            e.mean.copy_(state["mean"][e.name])
        self.precision.copy_(s)
