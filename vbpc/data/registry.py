"""Image datasets by name (``"fashion_mnist:test"``), for the command line and the evaluation report."""

from __future__ import annotations

from typing import Optional

from torch.utils.data import TensorDataset

__all__ = ["DATASETS", "load_dataset"]

#: names accepted by :func:`load_dataset`
DATASETS = ("fashion_mnist", "mnist", "cifar10", "digits")


def load_dataset(spec: str, root: Optional[str] = None) -> TensorDataset:
    """``"<name>[:<split>]"`` with name in :data:`DATASETS` and split ``train``/``test`` (default
    ``test``; ``digits`` has one split).  Images come normalised as the models expect them; the
    digits OOD set is normalised with the Fashion-MNIST statistics."""
    name, _, split = spec.partition(":")
    split = split or "test"
    if split not in ("train", "test"):
        raise ValueError(f"{spec!r}: split must be 'train' or 'test'")
    if name == "fashion_mnist":
        from .fashion_mnist import load_fashion_mnist

        return load_fashion_mnist(split, root=root)
    if name == "mnist":
        from .vision import load_mnist

        return load_mnist(root, split)
    if name == "cifar10":
        from .vision import load_cifar10

        return load_cifar10(root, split)
    if name == "digits":
        if spec.endswith(":train"):
            raise ValueError("'digits:train': sklearn's digits is vbpc's OOD set with one split of 1,797 images; "
                             "there is no separate training split (use 'digits' for OOD evaluation)")
        from .vision import load_digits_ood

        return load_digits_ood()
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS} (optionally ':train' or ':test')")
