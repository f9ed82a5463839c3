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
from .io import atomic_path, check_regular_file
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


#: deepest nesting of a stored state (optimizer states are ~6 levels deep)
MAX_DEPTH = 64


def _dtype(name: Any) -> torch.dtype:
    """The ``torch.dtype`` called ``name``; anything else (``"nn"``, ``"load"``) is refused."""
    dtype = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"unknown dtype {name!r} in the checkpoint header")
    return dtype


def unflatten_state(skeleton: Any, tensors: Mapping[str, Tensor], _depth: int = 0) -> Any:
    """Inverse of :func:`flatten_state`.  A malformed skeleton (a crafted header: unknown tensor
    names, non-pair dict entries, a non-dtype ``__dtype__``, nesting deeper than :data:`MAX_DEPTH`)
    raises :class:`~vbpc.errors.CorruptCheckpointError`."""
    if _depth > MAX_DEPTH:
        raise CorruptCheckpointError(f"checkpoint header nested deeper than {MAX_DEPTH} levels")
    if isinstance(skeleton, list):  # plain JSON lists are values (e.g. a scheduler's base_lrs)
        return [unflatten_state(v, tensors, _depth + 1) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if _TENSOR in skeleton:
        name = skeleton[_TENSOR]
        if not isinstance(name, str) or name not in tensors:
            raise CorruptCheckpointError(f"the checkpoint header names a tensor {name!r} the file does not hold")
        return tensors[name]
    if "__dict__" in skeleton:
        items = skeleton["__dict__"]
        if not isinstance(items, list) or not all(isinstance(kv, list) and len(kv) == 2 and
                                                   isinstance(kv[0], (str, int)) for kv in items):
            raise CorruptCheckpointError("malformed '__dict__' entry in the checkpoint header")
        return {k: unflatten_state(v, tensors, _depth + 1) for k, v in items}
    if "__list__" in skeleton:
        if not isinstance(skeleton["__list__"], list):
            raise CorruptCheckpointError("malformed '__list__' entry in the checkpoint header")
        out = [unflatten_state(v, tensors, _depth + 1) for v in skeleton["__list__"]]
        return tuple(out) if skeleton.get("tuple") else out
    if "__dtype__" in skeleton:
        return _dtype(skeleton["__dtype__"])
    return {k: unflatten_state(v, tensors, _depth + 1) for k, v in skeleton.items()}


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
    check_regular_file(path, "checkpoint")  # a FIFO would block the read forever; a directory is not one
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
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{path}: corrupt vbpc header: {type(exc).__name__}") from None
    if not isinstance(skeleton, dict):
        raise CorruptCheckpointError(f"{path}: corrupt vbpc header (a JSON {type(skeleton).__name__}, not an object)")
    if skeleton.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {skeleton.get('format')!r}; expected {FORMAT!r}")
    try:
        parts = {k: None if skeleton.get(k) is None else unflatten_state(skeleton[k], tensors)
                 for k in ("model", "posterior", "state", "prior")}
        spec, extra = _spec(skeleton.get("spec")), skeleton.get("extra", {})
        if not isinstance(parts["model"], dict) or not isinstance(extra, dict):
            raise CorruptCheckpointError("the model weights and 'extra' must be mappings")
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{path}: {exc}") from None
    if model is None:
        if spec is None:
            raise ValueError(f"{path}: the checkpoint has no model spec; pass the model to load into")
        from .models import build_model

        model = build_model(spec["name"], **spec["kwargs"])
    model = model.to(device)
    weights = parts["model"]
    _check_fits(path, model, weights, strict)  # before any write: a mismatch leaves the model untouched
    try:
        posterior = None if parts["posterior"] is None else GaussianPosterior.from_state_dict(parts["posterior"], model)
        prior = None if parts["prior"] is None else GaussianPosterior.from_state_dict(parts["prior"])
    except (KeyError, TypeError, AttributeError) as exc:  # a crafted posterior section
        raise CorruptCheckpointError(f"{path}: malformed posterior state ({type(exc).__name__}: {exc})") from None
    model.load_state_dict(weights, strict=strict)
    return Checkpoint(model, posterior, spec, extra, parts["state"] or {}, prior)


def _spec(spec: Any) -> Optional[dict[str, Any]]:
    """A stored model spec checked: ``{"name": str, "kwargs": dict}``.  Rebuilding from it never
    downloads or reads weight files: the checkpoint holds the weights, so a ``weights`` entry (the
    pretrained start of a run) is dropped."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) \
            or not isinstance(spec.get("kwargs", {}), dict):
        raise CorruptCheckpointError(f"malformed model spec {spec!r}: expected {{'name': str, 'kwargs': dict}}")
    kwargs = {k: v for k, v in spec.get("kwargs", {}).items() if k != "weights"}
    return {"name": spec["name"], "kwargs": kwargs}
