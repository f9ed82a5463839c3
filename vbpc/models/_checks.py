"""Input validation shared by the models: clear errors when data and model do not match."""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def check_image_input(name: str, x: Tensor, channels: int, min_size: int = 1, size: Optional[int] = None) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(N, channels, H, W)`` with ``H, W >= min_size`` (``== size`` if given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a tensor of images, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} expects images of shape (N, {channels}, H, W), got shape {tuple(x.shape)}"
                         + (" (add a channel dimension: x.unsqueeze(1))" if x.dim() == 3 else ""))
    if x.shape[1] != channels:
        raise ValueError(f"{name} was built for {channels}-channel images but got {x.shape[1]} channels "
                         f"(input shape {tuple(x.shape)}); set in_channels={x.shape[1]} or convert the data")
    h, w = x.shape[-2:]
    if size is not None and (h != size or w != size):
        raise ValueError(f"{name} was built for {size}x{size} images but got {h}x{w} (input shape {tuple(x.shape)})")
    if h < min_size or w < min_size:
        raise ValueError(f"{name} needs images of at least {min_size}x{min_size}, got {h}x{w}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects floating-point images, got dtype {x.dtype} (convert with x.float() / 255)")
