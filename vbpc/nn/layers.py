r"""Explicit Bayesian layers: ``nn.Linear``/``nn.Conv2d``/``nn.Embedding`` with a diagonal Gaussian.

Each layer keeps the posterior **mean** :math:`m` as its ordinary parameters and, for every
parameter ``w``, a persistent float32 buffer ``w_precision`` holding the sum-scale
precision :math:`S=\lambda(h+\delta)` of docs/algorithms.md eq. (3), so that
``module.state_dict()`` persists the whole posterior.  The buffer suffix is
:data:`vbpc.posterior.BAYES_PRECISION_SUFFIX`, which is what
:meth:`vbpc.DiagonalGaussian.from_module` reads (sharing the buffer as the posterior's
``hess`` with ``ess=1``, ``weight_decay=0``) and :meth:`vbpc.DiagonalGaussian.to_module`
writes (the posterior's :math:`\lambda(h+\delta)`)::

    net = nn.Sequential(BayesLinear(10, 32), nn.ReLU(), BayesLinear(32, 2))
    opt = vbpc.IVON(vbpc.select_parameters(net), lr=0.1, ess=len(data))
    ...                                   # train
    opt.posterior(net).to_module(net)     # precision -> net.*_precision buffers
    torch.save(net.state_dict(), "net.pt")  # mean and precision
    with vbpc.nn.sampling(net):           # every forward draws fresh weights
        probs = torch.stack([net(x).softmax(-1) for _ in range(64)]).mean(0)

With ``sample_weights=True`` (or inside :func:`sampling`) a forward uses a fresh sample
:math:`\theta=m+z/\sqrt{S}`, :math:`z\sim\mathcal N(0,I)` (eq. 5 with :math:`\lambda(h+\delta)=S`),
formed out of place: the stored parameters are never modified and gradients flow to the
mean through the reparameterisation.  Layers sample independently at every call (one
weight draw per forward, shared by the batch).  Leave ``sample_weights`` off while training
with :class:`vbpc.IVON` or while inside ``DiagonalGaussian.sampled``: those already load a
sample into the parameters, and a sampled forward would add a second, independent noise.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..posterior import BAYES_PRECISION_SUFFIX

__all__ = [
    "BAYES_PRECISION_SUFFIX",
    "BayesModule",
    "BayesLinear",
    "BayesConv2d",
    "BayesEmbedding",
    "bayesian_layers",
    "sampling",
]

#: Default precision of a fresh layer: weight std 0.01 (a near-deterministic start).
DEFAULT_INIT_PRECISION = 1e4


def _check_precision(init_precision: float) -> float:
    if isinstance(init_precision, bool) or not isinstance(init_precision, numbers.Real):
        raise TypeError(f"invalid init_precision={init_precision!r}: must be a real number, "
                        f"got {type(init_precision).__name__}")
    value = float(init_precision)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"invalid init_precision={init_precision!r}: must be a finite number > 0")
    return value


class BayesModule(nn.Module):
    """Mixin of the Bayesian layers: precision buffers, the sampling flag, sampled weights.

    Subclasses call :meth:`_init_bayes` at the end of ``__init__`` (after the parameters
    exist) and build their forward from :meth:`sampled_parameter`.
    """

    sample_weights: bool
    init_precision: float

    def _init_bayes(self, init_precision: float) -> None:
        self.init_precision = _check_precision(init_precision)
        self.sample_weights = False
        for name, p in list(self.named_parameters(recurse=False)):
            self.register_buffer(
                name + BAYES_PRECISION_SUFFIX,
                torch.full(p.shape, self.init_precision, dtype=torch.float32, device=p.device),
                persistent=True,
            )

    # ------------------------------------------------------------------ accessors
    def precision_names(self) -> list[str]:
        """Names of the parameters (direct, not recursive) that carry a precision buffer."""
        return [n for n, _ in self.named_parameters(recurse=False)
                if n + BAYES_PRECISION_SUFFIX in self._buffers]

    def precision(self, name: str) -> Tensor:
        """The precision buffer of parameter ``name`` (the live tensor, not a copy)."""
        key = name + BAYES_PRECISION_SUFFIX
        if key not in self._buffers:
            raise KeyError(f"{type(self).__name__} has no precision buffer for parameter {name!r}")
        return self._buffers[key]  # type: ignore[return-value]

    @torch.no_grad()
    def reset_precision(self, init_precision: Optional[float] = None) -> None:
        """Fill every precision buffer with ``init_precision`` (default: the constructor's value)."""
        value = self.init_precision if init_precision is None else _check_precision(init_precision)
        for name in self.precision_names():
            self.precision(name).fill_(value)

    def sampled_parameter(self, name: str) -> Optional[Tensor]:
        r"""Parameter ``name`` as the forward should use it.

        The mean itself when ``sample_weights`` is False (or the parameter is ``None``), else
        the out-of-place sample :math:`m + z/\mathrm{sqrt}(S)`, drawn from the global RNG in
        ``promote(dtype, float32)`` and cast to the parameter's dtype (docs/algorithms.md §2.1
        item 3 arithmetic: ``sqrt`` then true division).
        """
        p = getattr(self, name)
        if p is None or not self.sample_weights:
            return p
        noise = self._noise(name, p)
        return p + noise

    def _sampled_weight(self) -> Tensor:
        """:meth:`sampled_parameter` of ``weight``, which every Bayesian layer has."""
        w = self.sampled_parameter("weight")
        assert w is not None
        return w

    def _noise(self, name: str, p: Tensor) -> Tensor:
        cd = torch.promote_types(p.dtype, torch.float32)
        prec = self.precision(name).to(device=p.device, dtype=cd)
        z = torch.randn(p.shape, dtype=cd, device=p.device)
        return z.div_(prec.sqrt()).to(p.dtype)

    # ------------------------------------------------------------------ dtype handling
    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Keep precision buffers float32 under ``.half()``/``.bfloat16()``/``.double()``.

        A device move is still applied; only a dtype change of a precision buffer is undone
        (fp16 would overflow precisions above 65504; docs/algorithms.md §2.2 fix 5 keeps state fp32).
        """
        before = {k: self._buffers[k] for k in self._buffers if k.endswith(BAYES_PRECISION_SUFFIX)}
        out = super()._apply(fn, recurse)
        for key, old in before.items():
            new = self._buffers.get(key)
            if new is not None and old is not None and new.dtype != old.dtype and old.dtype == torch.float32:
                self._buffers[key] = old.to(device=new.device)
        return out

    def _bayes_repr(self) -> str:
        return f"init_precision={self.init_precision:g}, sample_weights={self.sample_weights}"


class BayesLinear(BayesModule, nn.Linear):
    r""":class:`torch.nn.Linear` with a diagonal Gaussian over ``weight`` (and ``bias``).

    Args:
        in_features, out_features, bias, device, dtype: as :class:`torch.nn.Linear`.
        init_precision: initial value :math:`S` of the ``weight_precision``/``bias_precision``
            buffers (sum-scale precision, docs/algorithms.md eq. (3)); must be finite and > 0.
            The default 1e4 gives a weight standard deviation of 0.01.

    Attributes:
        sample_weights: when True, every forward uses a fresh weight sample (default False).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Union[torch.device, str, None] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        init_precision: float = DEFAULT_INIT_PRECISION,
    ) -> None:
        _check_precision(init_precision)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_bayes(init_precision)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self._sampled_weight(), self.sampled_parameter("bias"))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._bayes_repr()}"


class BayesConv2d(BayesModule, nn.Conv2d):
    r""":class:`torch.nn.Conv2d` with a diagonal Gaussian over ``weight`` (and ``bias``).

    Same arguments as :class:`torch.nn.Conv2d` plus keyword-only ``init_precision``
    (see :class:`BayesLinear`).  The forward goes through ``self._conv_forward``, so every
    ``padding_mode`` works.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, tuple[int, int]],
        stride: Union[int, tuple[int, int]] = 1,
        padding: Union[str, int, tuple[int, int]] = 0,
        dilation: Union[int, tuple[int, int]] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
        device: Union[torch.device, str, None] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        init_precision: float = DEFAULT_INIT_PRECISION,
    ) -> None:
        _check_precision(init_precision)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._init_bayes(init_precision)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self._sampled_weight(), self.sampled_parameter("bias"))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._bayes_repr()}"


class BayesEmbedding(BayesModule, nn.Embedding):
    r""":class:`torch.nn.Embedding` with a diagonal Gaussian over ``weight``.

    Same arguments as :class:`torch.nn.Embedding` plus keyword-only ``init_precision``
    (see :class:`BayesLinear`); ``BayesEmbedding.from_pretrained`` works as for the parent.
    The ``padding_idx`` row, which ``nn.Embedding`` keeps fixed (it gets no gradient), is
    not sampled: a sampled forward returns the stored padding vector for it.  With
    ``max_norm`` the renormalisation acts on the sample, not on the stored mean.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int] = None,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Optional[Tensor] = None,
        _freeze: bool = False,
        device: Union[torch.device, str, None] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        init_precision: float = DEFAULT_INIT_PRECISION,
    ) -> None:
        _check_precision(init_precision)
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, max_norm=max_norm,
                         norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq, sparse=sparse,
                         _weight=_weight, _freeze=_freeze, device=device, dtype=dtype)
        self._init_bayes(init_precision)

    def _noise(self, name: str, p: Tensor) -> Tensor:
        noise = super()._noise(name, p)
        if name == "weight" and self.padding_idx is not None:
            noise[self.padding_idx] = 0
        return noise

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(input, self._sampled_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._bayes_repr()}"


def bayesian_layers(model: nn.Module) -> Iterator[BayesModule]:
    """The Bayesian layers of ``model`` (itself included), in ``model.modules()`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"bayesian_layers expects an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, BayesModule):
            yield module


@contextlib.contextmanager
def sampling(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Set ``sample_weights = enabled`` on every Bayesian layer of ``model`` for the block.

    The previous per-layer flags are restored on exit, also when the body raises; contexts
    nest (e.g. ``sampling(model, False)`` inside ``sampling(model)`` gives one mean forward).
    Raises ``ValueError`` if ``model`` has no Bayesian layer, so that a model built from plain
    layers is never silently evaluated deterministically.  Yields ``model``.
    """
    layers = list(bayesian_layers(model))
    if not layers:
        raise ValueError(f"sampling: {type(model).__name__} has no Bayesian layer (vbpc.nn.BayesLinear, ...)")
    previous = [layer.sample_weights for layer in layers]
    try:
        for layer in layers:
            layer.sample_weights = bool(enabled)
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.sample_weights = flag
