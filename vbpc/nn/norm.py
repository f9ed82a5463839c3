r"""Normalisation under weight noise: FilterResponseNorm and BatchNorm running statistics.

**FilterResponseNorm** (Singh & Krishnan, 2019), the norm of IVON's published vision results
(docs/algorithms.md §11), normalises each channel of each example by its own mean square, so it has
no batch dependence and no running statistics:

.. math::
    \nu^2_{nc}=\tfrac{1}{HW}\textstyle\sum_{hw}x_{nchw}^2,\qquad
    y=\gamma_c\,\frac{x}{\sqrt{\nu^2_{nc}+\epsilon}}+\beta_c,\qquad
    \mathrm{TLU}(y)=\max(y,\tau_c).

**BatchNorm under weight noise** (docs/algorithms.md §12 pitfall 14).  vbpc's policy:

* a training step's *first* Monte-Carlo pass updates the running statistics, as one ordinary
  forward would; extra MC passes (``mc_samples > 1``) and every anchor pass of a corrected
  learner (IVON-PoCo, VSGD-PoCo, VON-PoCo) leave them bit-for-bit untouched
  (:func:`preserved_running_stats`), as do anchor refreshes.  Pass ``model=`` to the learner to
  enable this; ``norm_update="all"`` restores PyTorch's every-forward semantics and
  ``"none"`` freezes the statistics during steps.
* the statistics are gathered under noisy weights and then serve every test sample, so for
  Bayesian model averaging they can be re-estimated per weight sample on ``k`` batches with
  :func:`recalibrate_batchnorm`; or prefer FRN/GroupNorm/LayerNorm, which have none (the IVON
  experiments avoided BatchNorm).  Learners warn once when given a model with BatchNorm.
"""

from __future__ import annotations

import contextlib
import enum
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from .._enums import parse_enum

__all__ = [
    "FilterResponseNorm2d",
    "TLU",
    "NormUpdate",
    "RunningStatsGuard",
    "has_batchnorm",
    "norm_modules",
    "preserved_running_stats",
    "recalibrate_batchnorm",
    "running_stat_buffers",
]


class FilterResponseNorm2d(nn.Module):
    r"""Filter response normalisation with a thresholded linear unit (FRN + TLU).

    :math:`y=\max(\gamma\,x/\sqrt{\nu^2+|\epsilon|}+\beta,\ \tau)` with :math:`\nu^2` the mean of
    :math:`x^2` over the spatial dimensions of each example and channel.  ``learnable_eps``
    makes :math:`\epsilon` a parameter (used as :math:`\epsilon_0+|\epsilon|`); ``tlu=False``
    drops the threshold (plain FRN).  Inputs ``(N, C, H, W)``.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, learnable_eps: bool = False, tlu: bool = True) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        shape = (1, num_features, 1, 1)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.tau = nn.Parameter(torch.zeros(shape)) if tlu else None
        self.learned_eps = nn.Parameter(torch.zeros(shape)) if learnable_eps else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"FilterResponseNorm2d({self.num_features}) expects (N, {self.num_features}, H, W), "
                             f"got shape {tuple(x.shape)}")
        nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)
        eps = self.eps if self.learned_eps is None else self.eps + self.learned_eps.abs()
        y = x * torch.rsqrt(nu2 + eps) * self.weight + self.bias
        return y if self.tau is None else torch.maximum(y, self.tau)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, learnable_eps={self.learned_eps is not None}, " \
               f"tlu={self.tau is not None}"


class TLU(nn.Module):
    r"""Thresholded linear unit :math:`\max(x,\tau_c)` with a learned per-channel :math:`\tau` (the
    activation that pairs with FRN; used after a residual addition)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.tau = nn.Parameter(torch.zeros(1, num_features, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.maximum(x, self.tau)

    def extra_repr(self) -> str:
        return str(self.num_features)


def norm_modules(model: nn.Module) -> list[_NormBase]:
    """BatchNorm-like modules (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, tracking ``InstanceNorm``)
    that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds any module with running normalisation statistics."""
    return bool(norm_modules(model))


def running_stat_buffers(model: nn.Module) -> list[Tensor]:
    """``running_mean``, ``running_var`` and ``num_batches_tracked`` of every module in :func:`norm_modules`."""
    out: list[Tensor] = []
    for m in norm_modules(model):
        for b in (m.running_mean, m.running_var, m.num_batches_tracked):
            if b is not None:
                out.append(b)
    return out


@contextlib.contextmanager
def preserved_running_stats(model: Optional[nn.Module]) -> Iterator[None]:
    """Restore the running statistics of ``model`` bit for bit on exit (also on an exception).

    ``None`` or a model without running statistics makes this a no-op."""
    bufs = running_stat_buffers(model) if model is not None else []
    saved = [b.detach().clone() for b in bufs]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(bufs, saved):
                b.copy_(s)


def _as_input(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: Optional[int] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    device: Optional[torch.device] = None,
) -> int:
    r"""Re-estimate BatchNorm running statistics at the model's *current* weights.

    Resets the statistics, then runs ``num_batches`` batches of ``data`` (all if ``None``) through
    ``model`` with only the norm modules in training mode (dropout etc. stay as they are) and
    ``momentum=None``, i.e. the cumulative average of the per-batch statistics
    (:math:`\hat\mu=\frac1k\sum_j\mu_j`, :math:`\hat\sigma^2=\frac1k\sum_j s_j^2` with the unbiased
    batch variances).  Call it inside a weight-sample context (``posterior.sampled(model)``) to
    give each BMA sample its own statistics; wrap the whole thing in
    :func:`preserved_running_stats` to get the original statistics back afterwards.

    ``forward(model, batch)`` defaults to ``model(batch[0])`` for tuples/lists and ``model(batch)``
    otherwise.  Returns the number of batches used.  Raises ``ValueError`` for a model without
    BatchNorm or an empty ``data``.
    """
    mods = norm_modules(model)
    if not mods:
        raise ValueError("recalibrate_batchnorm: the model has no BatchNorm module with running statistics")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
    modes = [(m, m.training, m.momentum) for m in mods]
    used = 0
    try:
        for m in mods:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in data:
            if num_batches is not None and used >= num_batches:
                break
            if forward is not None:
                forward(model, batch)
            else:
                x = _as_input(batch)
                model(x.to(device) if device is not None and isinstance(x, Tensor) else x)
            used += 1
    finally:
        for m, training, momentum in modes:
            m.momentum = momentum
            m.train(training)
    if used == 0:
        raise ValueError("recalibrate_batchnorm: `data` yielded no batch; the statistics were reset to defaults")
    return used


class NormUpdate(str, enum.Enum):
    """Which passes of a training step may update BatchNorm running statistics."""

    FIRST = "first"  #: the first MC pass of each step (default)
    ALL = "all"  #: every MC pass (plain PyTorch semantics); anchor passes still never do
    NONE = "none"  #: no pass of a step (frozen statistics)


class RunningStatsGuard:
    """The BatchNorm policy of a learner (module docstring): a context per forward pass.

    ``guard(first=..., anchor=...)`` returns a no-op context for a pass allowed to update the
    running statistics of ``model`` and :func:`preserved_running_stats` otherwise.  Without a
    model (``None``) every context is a no-op: the learner cannot see the statistics.
    """

    def __init__(self, model: Optional[nn.Module], update: Union[str, NormUpdate] = "first",
                 owner: str = "learner") -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model= must be an nn.Module (used for its BatchNorm statistics), "
                            f"got {type(model).__name__}")
        self.model = model
        self.update = parse_enum(NormUpdate, update, "norm_update")
        if model is not None and has_batchnorm(model):
            warnings.warn(
                f"{owner}: the model has BatchNorm; its running statistics are gathered under weight noise and "
                f"serve every test sample. Policy norm_update={self.update.value!r}: anchor and extra MC passes "
                "leave them untouched. For Bayesian model averaging consider vbpc.nn.recalibrate_batchnorm per "
                "sample, or FilterResponseNorm/GroupNorm (docs/algorithms.md §12.14).",
                UserWarning, stacklevel=3)

    def __call__(self, *, first: bool, anchor: bool = False) -> contextlib.AbstractContextManager[None]:
        if self.model is None:
            return contextlib.nullcontext()
        allowed = not anchor and (self.update is NormUpdate.ALL or (self.update is NormUpdate.FIRST and first))
        return contextlib.nullcontext() if allowed else preserved_running_stats(self.model)
