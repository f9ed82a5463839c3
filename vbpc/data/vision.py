"""MNIST and CIFAR-10 through torchvision, and scikit-learn's 8x8 digits as an OOD set for Fashion-MNIST models.

Nothing is downloaded unless ``download=True`` is passed (which needs a network); missing
files raise ``FileNotFoundError`` naming the directory torchvision looked in.  The results are
``TensorDataset``\\ s of float32 images ``(N, C, H, W)`` and int64 labels, like
:func:`vbpc.data.load_fashion_mnist`, cached in-process (do not modify them in place).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ._cache import cache_dir
from .fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "clear_vision_cache",
    "default_torchvision_root",
    "load_cifar10",
    "load_digits_ood",
    "load_mnist",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Mean and standard deviation of the MNIST training pixels after scaling to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
#: Per-channel (RGB) mean and standard deviation of the CIFAR-10 training pixels in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_SPLITS = {"train": True, "test": False}
# What torchvision expects under ``root`` (for the error message).
_LAYOUT = {
    "MNIST": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (all four files, uncompressed)",
    "CIFAR10": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (md5-checked)",
}


def default_torchvision_root() -> Path:
    """``<vbpc cache>/torchvision``: the ``root`` used when none is given."""
    return cache_dir() / "torchvision"


def _split_flag(split: str) -> bool:
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    return _SPLITS[split]


@functools.lru_cache(maxsize=8)
def _torchvision_tensors(
    kind: str, root: str, train: bool, download: bool, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision.datasets as tvd

    cls = {"MNIST": tvd.MNIST, "CIFAR10": tvd.CIFAR10}[kind]
    try:
        ds = cls(root, train=train, download=download)
    except RuntimeError as e:
        if "not found" not in str(e).lower():
            raise
        split = "train" if train else "test"
        raise FileNotFoundError(
            f"{kind} {split} split not found under root {root} (torchvision expects {root}/{_LAYOUT[kind]}). "
            f"Pass download=True to fetch it (needs a network), or place the files there."
        ) from None
    if kind == "MNIST":
        x = ds.data.unsqueeze(1).to(torch.float32).div_(255.0)  # (N, 1, 28, 28)
        if normalize:
            x.sub_(MNIST_MEAN).div_(MNIST_STD)
    else:
        x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))).to(torch.float32).div_(255.0)
        if normalize:
            x.sub_(torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)).div_(torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
    y = torch.as_tensor(ds.targets, dtype=torch.long).clone()
    return x, y


def load_mnist(
    root: Optional[PathLike] = None, split: str = "train", download: bool = False, normalize: bool = True
) -> TensorDataset:
    """MNIST ``split`` via ``torchvision.datasets.MNIST`` (60000 train / 10000 test images).

    Args:
        root: the directory holding ``MNIST/raw/`` (torchvision's layout); default
            :func:`default_torchvision_root`.
        split: ``"train"`` or ``"test"``.
        download: passed to torchvision (fetches the files; needs a network).
        normalize: subtract :data:`MNIST_MEAN`, divide by :data:`MNIST_STD` after scaling to [0, 1].

    Returns:
        ``TensorDataset(x, y)``: float32 ``(N, 1, 28, 28)`` and int64 labels ``0..9``.

    Raises:
        FileNotFoundError: the files are not under ``root`` (message names ``root`` and ``download=True``).
    """
    root_path = Path(root).expanduser() if root is not None else default_torchvision_root()
    x, y = _torchvision_tensors("MNIST", str(root_path), _split_flag(split), bool(download), bool(normalize))
    return TensorDataset(x, y)


def load_cifar10(
    root: Optional[PathLike] = None, split: str = "train", download: bool = False, normalize: bool = True
) -> TensorDataset:
    """CIFAR-10 ``split`` via ``torchvision.datasets.CIFAR10`` (50000 train / 10000 test images).

    Args:
        root: the directory holding ``cifar-10-batches-py/`` (torchvision's layout); default
            :func:`default_torchvision_root`.
        split: ``"train"`` or ``"test"``.
        download: passed to torchvision (fetches the archive; needs a network).
        normalize: per-channel :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD` after scaling to [0, 1].

    Returns:
        ``TensorDataset(x, y)``: float32 ``(N, 3, 32, 32)`` (RGB) and int64 labels ``0..9``
        (:data:`CIFAR10_CLASSES`).

    Raises:
        FileNotFoundError: the files are missing or fail torchvision's md5 check (message names
            ``root`` and ``download=True``).
    """
    root_path = Path(root).expanduser() if root is not None else default_torchvision_root()
    x, y = _torchvision_tensors("CIFAR10", str(root_path), _split_flag(split), bool(download), bool(normalize))
    return TensorDataset(x, y)


_NORMALIZERS = {"fashion_mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD), "mnist": (MNIST_MEAN, MNIST_STD)}


@functools.lru_cache(maxsize=4)
def _digits(size: int, normalize: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "load_digits_ood needs scikit-learn (its bundled 8x8 digits); install it with `pip install scikit-learn`"
        ) from None
    d = load_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32)).div_(16.0).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if normalize is not None:
        mean, std = _NORMALIZERS[normalize]
        x.sub_(mean).div_(std)
    return x.contiguous(), torch.from_numpy(np.asarray(d.target, dtype=np.int64))


def load_digits_ood(size: int = 28, normalize: Optional[str] = "fashion_mnist") -> TensorDataset:
    """scikit-learn's 1797 real handwritten 8x8 digits, shaped like Fashion-MNIST input (an OOD set).

    The pixel values ``0..16`` are scaled to [0, 1] (ink bright on a dark background, like
    Fashion-MNIST), upsampled to ``size x size`` bilinearly (``align_corners=False``; values stay
    in [0, 1]) and, with ``normalize="fashion_mnist"`` (or ``"mnist"``), standardised with that
    dataset's mean and standard deviation so a model trained on it can score them.

    Returns:
        ``TensorDataset(x, y)``: float32 ``(1797, 1, size, size)`` and the digit labels ``0..9`` (int64).

    Raises:
        ImportError: scikit-learn is missing (``pip install scikit-learn``).
        ValueError: bad ``size`` or ``normalize``.
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if normalize is not None and normalize not in _NORMALIZERS:
        raise ValueError(f"normalize must be None or one of {sorted(_NORMALIZERS)}, got {normalize!r}")
    x, y = _digits(size, normalize)
    return TensorDataset(x, y)


def clear_vision_cache() -> None:
    """Drop the in-process caches of this module."""
    _torchvision_tensors.cache_clear()
    _digits.cache_clear()
