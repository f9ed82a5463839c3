"""Model + posterior checkpoints as ``safetensors`` files (no pickle: safe to load from anywhere).

A checkpoint holds the model's ``state_dict``, optionally a posterior's ``state_dict`` (any
family), the model spec ``{"name": ..., "kwargs": ...}`` understood by
:func:`vbpc.models.build_model`, and free-form JSON ``extra`` (metrics, hyperparameters).
Nested states are stored as flat tensors ``"<section>/<path>"`` plus a JSON skeleton in the
safetensors metadata (:func:`flatten_state` / :func:`unflatten_state`); files are written
atomically::

    vbpc.checkpoint.save("lenet.safetensors", model, opt.posterior(model),
                         spec={"name": "lenet", "kwargs": {"num_classes": 10}})
    ck = vbpc.checkpoint.load("lenet.safetensors")        # rebuilds the model from the spec
    ck.model, ck.posterior, ck.spec, ck.extra
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import CorruptCheckpointError, StateDictMismatchError
from .io import atomic_path
from .posterior import GaussianPosterior

__all__ = ["Checkpoint", "FORMAT", "flatten_state", "load", "save", "unflatten_state"]

FORMAT = "vbpc.checkpoint/1"
_TENSOR = "__tensor__"

PathLike = Union[str, "os.PathLike[str]"]


def flatten_state(state: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """JSON skeleton of a nested dict/list state; tensors go to ``tensors[prefix/<path>]`` (contiguous
    CPU clones, so tied or strided tensors serialise)."""
    if isinstance(state, Tensor):
        tensors[prefix] = state.detach().to("cpu").contiguous().clone()
        return {_TENSOR: prefix}
    if isinstance(state, Mapping):
        bad = [k for k in state if not isinstance(k, (str, int))]
        if bad:
            raise TypeError(f"{prefix}: state keys must be str or int, got {type(bad[0]).__name__}")
        return {"__dict__": [[k, flatten_state(v, f"{prefix}/{k}", tensors)] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        return {"__list__": [flatten_state(v, f"{prefix}/{i}", tensors) for i, v in enumerate(state)],
                "tuple": isinstance(state, tuple)}
    if isinstance(state, torch.dtype):
        return {"__dtype__": str(state).removeprefix("torch.")}
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"{prefix}: cannot serialise a {type(state).__name__} in a safetensors checkpoint")


def unflatten_state(skeleton: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if "__dict__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            items = [unflatten_state(v, tensors) for v in skeleton["__list__"]]
            return tuple(items) if skeleton.get("tuple") else items
        if "__dtype__" in skeleton:
            return getattr(torch, skeleton["__dtype__"])
    return skeleton


def _check_fits(path: PathLike, model: nn.Module, weights: Mapping[str, Tensor], strict: bool) -> None:
    """Raise :class:`StateDictMismatchError` naming missing, unexpected and mis-shaped entries."""
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
              if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in weights] if strict else []
    unexpected = [k for k in weights if k not in own] if strict else []
    if shapes or missing or unexpected:
        parts = [f"{label}: {items[:3]}" for label, items in
                 (("shape mismatch (checkpoint vs model)", shapes), ("missing", missing), ("unexpected", unexpected))
                 if items]
        raise StateDictMismatchError(f"{path}: the weights do not fit {type(model).__name__}; " + "; ".join(parts))


@dataclass
class Checkpoint:
    """What :func:`load` returns."""

    model: Optional[nn.Module]
    posterior: Optional[GaussianPosterior]
    spec: Optional[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    prior: Optional[GaussianPosterior] = None  #: the prior the posterior was trained under (if saved)


def save(path: PathLike, model: nn.Module, posterior: Optional[GaussianPosterior] = None, *,
         spec: Optional[Mapping[str, Any]] = None, extra: Optional[Mapping[str, Any]] = None,
         state: Optional[Mapping[str, Any]] = None, prior: Optional[GaussianPosterior] = None) -> None:
    """Write ``model``'s state, ``posterior`` and metadata to ``path`` (safetensors, atomically).

    ``state`` holds further nested tensor states (optimizer, scheduler, RNG: what resuming needs);
    ``prior`` the prior of the posterior (e.g. ``ContinualIVON.prior()``, ``IVON.posterior().prior()``);
    ``extra`` plain JSON."""
    if spec is not None and "name" not in spec:
        raise ValueError("spec must be {'name': <vbpc.models.build_model name>, 'kwargs': {...}}")
    tensors: dict[str, Tensor] = {}
    skeleton = {
        "format": FORMAT,
        "model": flatten_state(model.state_dict(), "model", tensors),
        "posterior": None if posterior is None else flatten_state(posterior.state_dict(), "posterior", tensors),
        "spec": dict(spec) if spec is not None else None,
        "extra": dict(extra or {}),
        "state": flatten_state(dict(state or {}), "state", tensors),
        "prior": None if prior is None else flatten_state(prior.state_dict(), "prior", tensors),
    }
    meta = {"vbpc": json.dumps(skeleton)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load(path: PathLike, model: Optional[nn.Module] = None, *, device: Union[str, torch.device] = "cpu",
         strict: bool = True) -> Checkpoint:
    """Read a checkpoint written by :func:`save`.

    ``model`` receives the weights (``load_state_dict(strict=strict)``); without it the model is
    rebuilt from the stored spec with :func:`vbpc.models.build_model`.  The posterior is bound to
    the model.  Raises :class:`~vbpc.errors.CorruptCheckpointError` for a truncated or corrupt file,
    ``ValueError`` for a file that is not a vbpc checkpoint and
    :class:`~vbpc.errors.StateDictMismatchError` when the weights do not fit the model."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors: dict[str, Tensor] = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors' SafetensorError: truncated, corrupt or not safetensors at all
        raise CorruptCheckpointError(f"{path}: unreadable checkpoint (truncated or corrupt): {exc}") from exc
    if "vbpc" not in meta:
        raise ValueError(f"{path}: not a vbpc checkpoint (no 'vbpc' metadata; written by vbpc.checkpoint.save?)")
    try:
        skeleton = json.loads(meta["vbpc"])
    except json.JSONDecodeError as exc:
        raise CorruptCheckpointError(f"{path}: corrupt vbpc header: {exc}") from exc
    if skeleton.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {skeleton.get('format')!r}; expected {FORMAT!r}")
    spec = skeleton.get("spec")
    if model is None:
        if spec is None:
            raise ValueError(f"{path}: the checkpoint has no model spec; pass the model to load into")
        from .models import build_model

        model = build_model(spec["name"], **spec.get("kwargs", {}))
    model = model.to(device)
    weights = unflatten_state(skeleton["model"], tensors)
    _check_fits(path, model, weights, strict)  # before any write: a mismatch leaves the model untouched
    model.load_state_dict(weights, strict=strict)
    posterior = None
    if skeleton.get("posterior") is not None:
        posterior = GaussianPosterior.from_state_dict(unflatten_state(skeleton["posterior"], tensors), model)
    state = unflatten_state(skeleton["state"], tensors) if skeleton.get("state") is not None else {}
    prior = None
    if skeleton.get("prior") is not None:
        prior = GaussianPosterior.from_state_dict(unflatten_state(skeleton["prior"], tensors))
    return Checkpoint(model, posterior, spec, skeleton.get("extra", {}), state, prior)
