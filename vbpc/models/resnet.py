r"""CIFAR-style ResNet-20 (He et al., 2016, §4.2) with FilterResponseNorm, BatchNorm or GroupNorm.

Three stages of ``n=3`` basic blocks with 16, 32 and 64 channels (``width`` multiplies them),
a 3x3 stem, global average pooling and one linear layer: :math:`6n+2=20` weighted layers.
``norm="frn"`` (default) is the variant of IVON's published results (docs/algorithms.md §11):
every ``norm + ReLU`` pair becomes FRN+TLU, so the network has no batch dependence and no
running statistics; ``norm="bn"`` is the classic BatchNorm network (see :mod:`vbpc.nn.norm`
for how vbpc treats its running statistics under weight noise); ``norm="gn"`` uses GroupNorm.
"""

from __future__ import annotations

import enum
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._enums import parse_enum
from ..nn.norm import TLU, FilterResponseNorm2d
from ._checks import check_image_input

__all__ = ["Norm", "ResNet20", "resnet20"]


class Norm(str, enum.Enum):
    """Normalisation layer of :class:`ResNet20`."""

    FRN = "frn"
    BN = "bn"
    GN = "gn"


def _norm_act(norm: Norm, c: int, act: bool) -> nn.Module:
    """``norm`` followed (``act=True``) by its activation: FRN+TLU, BN+ReLU or GN+ReLU."""
    if norm is Norm.FRN:
        return FilterResponseNorm2d(c, tlu=act)
    layer: nn.Module = nn.BatchNorm2d(c) if norm is Norm.BN else nn.GroupNorm(min(8, c), c)
    return nn.Sequential(layer, nn.ReLU()) if act else layer


def _post_act(norm: Norm, c: int) -> nn.Module:
    return TLU(c) if norm is Norm.FRN else nn.ReLU()


class BasicBlock(nn.Module):
    """``conv3x3 -> norm+act -> conv3x3 -> norm``, plus the shortcut, then the activation."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: Norm, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm_act(norm, c_out, act=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm_act(norm, c_out, act=False)
        self.act = _post_act(norm, c_out)
        self.pad = 0
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            if shortcut == "conv":  # option B: 1x1 projection
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                              _norm_act(norm, c_out, act=False))
            else:  # option A: subsample and zero-pad the channels (no parameters)
                self.shortcut = nn.Identity()
                self.pad = c_out - c_in
                self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm2(self.conv2(self.norm1(self.conv1(x))))
        if self.pad:
            s = x[:, :, ::self.stride, ::self.stride]
            s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        else:
            s = self.shortcut(x)
        return self.act(out + s)


class ResNet20(nn.Module):
    """CIFAR ResNet-``6n+2`` (``depth=20`` by default).

    Args:
        num_classes: number of logits.
        in_channels: 3 (CIFAR-10) or 1 (Fashion-MNIST).
        norm: ``"frn"`` (FilterResponseNorm+TLU, default), ``"bn"`` (BatchNorm) or ``"gn"`` (GroupNorm).
        width: channel multiplier (16·width, 32·width, 64·width).
        depth: ``6n+2`` (20, 32, 44, 56, 110).
        shortcut: ``"conv"`` (1x1 projection where the shape changes, default) or ``"pad"``
            (He et al.'s parameter-free option A).

    Parameter names: ``stem.*``, ``stages.{0,1,2}.{block}.*`` and ``fc.*`` (the last layer).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: Union[str, Norm] = "frn",
                 width: int = 1, depth: int = 20, shortcut: str = "conv") -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        if shortcut not in ("conv", "pad"):
            raise ValueError(f"invalid shortcut={shortcut!r}; expected 'conv' or 'pad'")
        if width < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError("width, num_classes and in_channels must be positive")
        self.norm = parse_enum(Norm, norm, "norm")
        self.num_classes, self.in_channels = int(num_classes), int(in_channels)
        n = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  _norm_act(self.norm, widths[0], act=True))
        stages, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks = [BasicBlock(c if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1, self.norm, shortcut)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            c = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, in_channels, H, W)`` with H, W >= 4."""
        check_image_input("ResNet20", x, self.in_channels, min_size=4)
        h = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))

    def extra_repr(self) -> str:
        return f"norm={self.norm.value!r}"


def resnet20(num_classes: int = 10, in_channels: int = 3, norm: Union[str, Norm] = "frn", **kw: object) -> ResNet20:
    """:class:`ResNet20` with the given classes, input channels and norm (``"frn"``, ``"bn"``, ``"gn"``)."""
    return ResNet20(num_classes, in_channels, norm, **kw)  # type: ignore[arg-type]
