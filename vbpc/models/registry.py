"""Build architectures by name, so a checkpoint can record ``{"name": ..., "kwargs": ...}`` and be
rebuilt without pickled code (the safetensors checkpoints of :mod:`vbpc.checkpoint`)."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

__all__ = ["build_model", "register_model", "MODEL_BUILDERS"]


def _torchvision(**kw: Any) -> nn.Module:
    from .vision import torchvision_classifier

    return torchvision_classifier(**kw)


def _builders() -> dict[str, Callable[..., nn.Module]]:
    from .lenet import LeNet5
    from .mlp import MLP
    from .resnet import ResNet20
    from .text import char_gpt2, minilm_classifier

    return {"mlp": MLP, "lenet": LeNet5, "resnet20": ResNet20, "torchvision": _torchvision, "char_gpt2": char_gpt2,
            "minilm_classifier": minilm_classifier}


#: name -> constructor; extend with :func:`register_model`.
MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``build_model(name, **kwargs)`` call ``builder(**kwargs)`` (e.g. for your own architectures)."""
    MODEL_BUILDERS[name] = builder


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """``mlp``, ``lenet``, ``resnet20``, ``torchvision`` (``name=`` the torchvision model), ``char_gpt2``,
    ``minilm_classifier``, or anything registered; ``kwargs`` go to the constructor."""
    if not MODEL_BUILDERS:
        MODEL_BUILDERS.update({k: v for k, v in _builders().items() if k not in MODEL_BUILDERS})
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_BUILDERS)} (register_model adds more)")
    return MODEL_BUILDERS[name](**kwargs)
