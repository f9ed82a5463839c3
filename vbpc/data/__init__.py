"""Datasets read from local files (no network access, no synthetic fallbacks)."""

from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]
