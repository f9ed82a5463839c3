r"""Dataset shift for image classifiers: corruption families at increasing intensity.

Uncertainty must be checked under shift, not only on the i.i.d. test set (Ovadia et al., 2019,
"Can you trust your model's uncertainty?").  Each family maps images with pixels in ``[0, 1]``,
shape ``(N, C, H, W)``, to corrupted images in ``[0, 1]``:

* ``"rotation"``: counter-clockwise rotation by ``level`` degrees about the centre (bilinear,
  black outside the original frame); :data:`SHIFT_LEVELS` has 22.5° to 180° in 8 steps;
* ``"gaussian_noise"``: :math:`x+\sigma\varepsilon`, :math:`\varepsilon\sim\mathcal N(0,I)`, clipped to
  ``[0, 1]``; ``level`` is :math:`\sigma` (5 levels, 0.04 to 0.32);
* ``"contrast"``: :math:`\bar x+c\,(x-\bar x)` with :math:`\bar x` each image's mean; ``level`` is the
  remaining contrast :math:`c` (5 levels, 0.4 down to 0.05; 1 is the identity);
* ``"blur"``: a Gaussian blur of standard deviation ``level`` pixels (5 levels, 0.5 to 3), reflected
  at the borders.

Level 0 of rotation, noise and blur (and contrast 1) returns the images unchanged, bit for bit.
:func:`shifted_fashion_mnist` gives the corrupted Fashion-MNIST test set, normalised like
:func:`vbpc.data.load_fashion_mnist`.  See ``docs/evaluation.md``.
"""

from __future__ import annotations

import difflib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = ["SHIFT_LEVELS", "corrupt", "shifted_fashion_mnist"]

#: the intensities of each family, mildest first (the clean images are level 0, contrast 1)
SHIFT_LEVELS: dict[str, tuple[float, ...]] = {
    "rotation": tuple(22.5 * k for k in range(1, 9)),
    "gaussian_noise": (0.04, 0.08, 0.12, 0.20, 0.32),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "blur": (0.5, 1.0, 1.5, 2.0, 3.0),
}


def _check(images: Tensor, family: str, level: float) -> None:
    if family not in SHIFT_LEVELS:
        near = difflib.get_close_matches(family, list(SHIFT_LEVELS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown shift family {family!r}: one of {sorted(SHIFT_LEVELS)}{hint}")
    if not (isinstance(images, Tensor) and images.is_floating_point() and images.dim() == 4):
        raise ValueError("corrupt() takes float images of shape (N, C, H, W) with pixels in [0, 1]")
    if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
        raise ValueError(f"corrupt() takes pixels in [0, 1]; got [{float(images.min()):.3g}, "
                         f"{float(images.max()):.3g}] (load with normalize=False)")
    if not math.isfinite(level) or (family != "rotation" and level < 0) or (family == "contrast" and level > 1):
        rule = "in [0, 1]" if family == "contrast" else ("finite" if family == "rotation" else "finite and >= 0")
        raise ValueError(f"invalid {family} level {level!r}: must be {rule}")


def _rotate(x: Tensor, degrees: float) -> Tensor:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    # affine_grid maps output coordinates (x right, y down) to input ones: the inverse rotation
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0.0, 1.0)


def _blur(x: Tensor, sigma: float) -> Tensor:
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w).clamp_(0.0, 1.0)


def corrupt(images: Tensor, family: str, level: float, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """``images`` (pixels in ``[0, 1]``, ``(N, C, H, W)``) under ``family`` at ``level`` (see the module
    docstring); a new tensor.  ``generator`` draws the Gaussian noise (reproducible corruption)."""
    _check(images, family, level)
    x = images.detach()
    if family == "rotation":
        return x.clone() if level % 360 == 0 else _rotate(x, level)
    if family == "gaussian_noise":
        if level == 0:
            return x.clone()
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return (x + level * eps).clamp_(0.0, 1.0)
    if family == "contrast":
        if level == 1:
            return x.clone()
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (mean + level * (x - mean)).clamp_(0.0, 1.0)
    return x.clone() if level == 0 else _blur(x, level)


def shifted_fashion_mnist(family: str, level: float, seed: int = 0, root: Optional[str] = None) -> TensorDataset:
    """The Fashion-MNIST test set under ``family`` at ``level``, normalised like
    :func:`vbpc.data.load_fashion_mnist` (noise drawn from a generator seeded with ``seed``)."""
    from .fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist

    x, y = load_fashion_mnist("test", root=root, normalize=False).tensors
    g = torch.Generator().manual_seed(seed)
    xs = corrupt(x, family, level, generator=g)
    return TensorDataset((xs - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, y)
