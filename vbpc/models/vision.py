"""Adapt torchvision classifiers to small inputs, other channel counts and class counts.

``adapt_classifier(torchvision.models.resnet18(), num_classes=10, in_channels=1)`` gives a
resnet18 for 28x28 Fashion-MNIST: for the ResNet family the ImageNet stem (7x7 stride-2
convolution + max pooling, a 4x downsampling meant for 224x224 inputs) becomes the CIFAR stem
(3x3 stride 1, no pooling); for other families the first convolution's stride becomes 1.  The
last ``nn.Linear`` becomes a fresh ``num_classes`` head.  Parameter names are torchvision's,
so scopes such as ``select_parameters(model, "last_layer")`` (the new head) work unchanged.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ._checks import check_image_input

__all__ = ["adapt_classifier", "torchvision_classifier"]


class InputCheck:
    """Forward pre-hook that validates image inputs (picklable, unlike a closure)."""

    def __init__(self, name: str, channels: int, min_size: int = 1) -> None:
        self.name, self.channels, self.min_size = name, channels, min_size

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if args:
            check_image_input(self.name, args[0], self.channels, self.min_size)


def _named_module(model: nn.Module, kind: type[nn.Module]) -> tuple[str, nn.Module]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    if not found:
        raise ValueError(f"adapt_classifier: {type(model).__name__} has no {kind.__name__} layer")
    return found[0]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def adapt_classifier(model: nn.Module, num_classes: Optional[int] = None, in_channels: Optional[int] = None,
                     small_inputs: bool = True) -> nn.Module:
    """Adapt a torchvision image classifier in place and return it.

    Args:
        model: e.g. ``torchvision.models.resnet18()`` (pretrained or not).
        num_classes: replace the last ``nn.Linear`` by a fresh one with this many outputs.
        in_channels: replace the first ``nn.Conv2d`` by one taking this many channels; when only the
            channel count changes, pretrained kernels are averaged over the old channels and
            replicated, so a grey image gives the response of the equivalent grey RGB image.
        small_inputs: ResNets get the CIFAR stem (3x3 stride-1 convolution, no max pooling); other
            families get a stride-1 first convolution.

    A forward pre-hook checks that inputs are ``(N, in_channels, H, W)`` and names the mismatch.
    """
    name, conv = _named_module(model, nn.Conv2d)
    assert isinstance(conv, nn.Conv2d)
    c_in = conv.in_channels if in_channels is None else int(in_channels)
    is_resnet = hasattr(model, "conv1") and hasattr(model, "maxpool") and hasattr(model, "fc")
    if small_inputs or c_in != conv.in_channels:
        kernel, stride, padding = conv.kernel_size, conv.stride, conv.padding
        if small_inputs:
            stride = (1, 1)
            if is_resnet:
                kernel, padding = (3, 3), (1, 1)
        new = nn.Conv2d(c_in, conv.out_channels, kernel, stride, padding, conv.dilation, conv.groups,  # type: ignore[arg-type]
                        conv.bias is not None, conv.padding_mode)
        new = new.to(conv.weight.device, conv.weight.dtype)
        if tuple(kernel) == tuple(conv.kernel_size):
            w = conv.weight
            if c_in != conv.in_channels:
                w = w.mean(dim=1, keepdim=True).expand(-1, c_in, -1, -1) * (conv.in_channels / c_in)
            new.weight.copy_(w)
            if conv.bias is not None:
                assert new.bias is not None  # built with bias=conv.bias is not None
                new.bias.copy_(conv.bias)
        _set(model, name, new)
        if small_inputs and is_resnet:
            model.maxpool = nn.Identity()
    if num_classes is not None:
        head_name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not head_name:
            raise ValueError(f"adapt_classifier: {type(model).__name__} has no nn.Linear head")
        old = model.get_submodule(head_name[-1])
        assert isinstance(old, nn.Linear)
        head = nn.Linear(old.in_features, int(num_classes), bias=old.bias is not None)
        _set(model, head_name[-1], head.to(old.weight.device, old.weight.dtype))
    for h in [k for k, v in model._forward_pre_hooks.items() if isinstance(v, InputCheck)]:
        del model._forward_pre_hooks[h]
    model.register_forward_pre_hook(InputCheck(type(model).__name__, c_in))
    return model


def torchvision_classifier(name: str, num_classes: int = 10, in_channels: int = 3, small_inputs: bool = True,
                           weights: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(name, weights=weights)`` adapted by :func:`adapt_classifier`.

    ``weights`` (e.g. ``"DEFAULT"``) downloads on first use unless torch's cache holds them."""
    import torchvision

    model = torchvision.models.get_model(name, weights=weights, **kwargs)
    return adapt_classifier(model, num_classes, in_channels, small_inputs)


def load_local_weights(model: nn.Module, path: Any) -> nn.Module:
    """Load a state dict from a local file into ``model`` (strict): ``.safetensors``, or a
    ``torch.save`` file read with ``weights_only=True`` (tensors only: no code is unpickled)."""
    import os

    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    model.load_state_dict(state, strict=True)
    return model
