"""Build architectures by name, so a checkpoint can record ``{"name": ..., "kwargs": ...}`` and be
rebuilt without pickled code (the safetensors checkpoints of :mod:`vbpc.checkpoint`)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

__all__ = ["build_model", "register_model", "MODEL_BUILDERS"]


def _torchvision(**kw: Any) -> nn.Module:
    """``build_model("torchvision", name=..., weights=<local file or None>)``: a named builder never
    downloads, so ``weights`` must be a local state-dict file (safetensors, or a tensors-only
    ``torch.save`` file) or ``None``."""
    import os

    from .vision import torchvision_classifier

    weights = kw.pop("weights", None)
    if weights is not None and not (isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights)):
        raise ValueError(f"torchvision weights={weights!r}: build_model only loads local weight files (no downloads); "
                         "download them once and pass weights=<path to the .safetensors/.pth file>")
    model = torchvision_classifier(**kw)
    if weights is not None:
        from .vision import load_local_weights

        load_local_weights(model, weights)
    return model


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


#: the largest model (parameters and buffers) :func:`build_model` allocates; env ``VBPC_MAX_PARAMS`` overrides
DEFAULT_MAX_PARAMS = 2_000_000_000


def max_params() -> int:
    """The allocation limit of :func:`build_model` (``VBPC_MAX_PARAMS`` or :data:`DEFAULT_MAX_PARAMS`)."""
    import os

    raw = os.environ.get("VBPC_MAX_PARAMS")
    if raw is None:
        return DEFAULT_MAX_PARAMS
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"VBPC_MAX_PARAMS={raw!r} is not a number") from None
    if value < 1:
        raise ValueError(f"VBPC_MAX_PARAMS={raw!r} must be >= 1")
    return value


def _count_on_meta(builder: Callable[..., nn.Module], kwargs: dict[str, Any]) -> Optional[int]:
    """Parameters + buffers of ``builder(**kwargs)`` built on the meta device (no memory), or ``None``
    where the builder cannot run there (e.g. it loads pretrained files)."""
    import torch

    try:
        with torch.device("meta"):
            model = builder(**kwargs)
    except (TypeError, ValueError):
        raise
    except Exception:
        return None
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


def build_model(name: str, /, **kwargs: Any) -> nn.Module:
    """``mlp``, ``lenet``, ``resnet20``, ``torchvision`` (``name=`` the torchvision model), ``char_gpt2``,
    ``minilm_classifier``, or anything registered; ``kwargs`` go to the constructor.

    The model is first built on the meta device (no memory) and refused if it would hold more than
    :func:`max_params` values (``VBPC_MAX_PARAMS``), so a spec such as ``hidden: [200000, 200000]``
    fails before any allocation.  Bad ``kwargs`` give a ``ValueError`` naming the model."""
    if not MODEL_BUILDERS:
        MODEL_BUILDERS.update({k: v for k, v in _builders().items() if k not in MODEL_BUILDERS})
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_BUILDERS)} (register_model adds more)")
    builder = MODEL_BUILDERS[name]
    meta_kwargs = {k: v for k, v in kwargs.items() if k != "weights"}
    try:
        n = _count_on_meta(builder, meta_kwargs)
    except TypeError as exc:
        raise ValueError(f"model {name!r}: {exc}") from None
    limit = max_params()
    if n is not None and n > limit:
        raise ValueError(f"model {name!r} with {kwargs} would hold {n:,} values, above the limit of {limit:,} "
                         "(set VBPC_MAX_PARAMS to allow it)")
    return builder(**kwargs)
