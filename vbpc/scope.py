"""Which parameters of a network carry a Gaussian posterior.

A *scope* picks named parameters of any :class:`torch.nn.Module`.  Out-of-scope and
frozen (``requires_grad=False``) parameters are never perturbed, decayed or given
optimizer state (docs/algorithms.md §2.2, fix 4).  Options are string enums in the style of
laplace-torch::

    select_parameters(model)                                  # all trainable (default)
    select_parameters(model, "last_layer")                    # last leaf module with params
    select_parameters(model, "lora")                          # names containing ``lora_``
    select_parameters(model, module_types=(nn.Linear, Conv1D))
    select_parameters(model, include=r"attn\\.", exclude=r"bias$")

Tied parameters (e.g. GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) appear
once, under the name ``model.named_parameters()`` gives them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Union

import torch
from torch import nn

__all__ = ["Scope", "select_parameters", "named_trainable", "parameter_names", "outside_scope", "warn_outside_scope"]


class Scope(str, Enum):
    """String-enum of the built-in scopes."""

    ALL = "all"
    TRAINABLE = "trainable"
    LAST_LAYER = "last_layer"
    LORA = "lora"


Patterns = Union[None, str, Sequence[str]]


def _compile(patterns: Patterns) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    return [re.compile(p) for p in patterns]


def named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """All parameters with ``requires_grad=True``, deduplicated, in registration order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _last_layer_ids(model: nn.Module) -> set[int]:
    """Parameters owned by the last module (``model.modules()`` order) owning a trainable one.

    For models with tied output embeddings (GPT-2's ``lm_head``) this is the tied matrix,
    reported under its first name (``transformer.wte.weight``)."""
    last: nn.Module | None = None
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            last = module
    if last is None:
        return set()
    return {id(p) for p in last.parameters(recurse=False)}


def select_parameters(
    model: nn.Module,
    scope: Union[str, Scope] = Scope.ALL,
    *,
    module_types: Union[type, Sequence[type], None] = None,
    include: Patterns = None,
    exclude: Patterns = None,
) -> list[tuple[str, nn.Parameter]]:
    """Return the ``(name, parameter)`` pairs in scope, in ``named_parameters`` order.

    Args:
        model: any module (torchvision, HF ``transformers``, hand-built).
        scope: ``"all"`` (default) or its synonym ``"trainable"`` (every parameter with
            ``requires_grad``: with PEFT, the adapters *and* the ``modules_to_save`` head),
            ``"last_layer"`` (the parameters owned directly by the last module, in
            ``model.modules()`` order, that owns any) or ``"lora"`` (names containing ``lora_``,
            the PEFT adapters, plus PEFT's ``modules_to_save`` copies, e.g. the classifier
            that ``task_type="SEQ_CLS"`` trains in full).
        module_types: keep only parameters owned directly by modules of these types.
        include: regular expression(s); keep names matching any (``re.search``).
        exclude: regular expression(s); drop names matching any.

    Frozen parameters are always excluded.  Raises ``ValueError`` for an unknown scope
    and when nothing is selected, so a typo never silently trains a deterministic net.
    Warns (:func:`warn_outside_scope`) when trainable parameters are left out by ``"lora"``:
    nothing will update them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"select_parameters expects an nn.Module, got {type(model).__name__}")
    try:
        scope = Scope(scope.lower() if isinstance(scope, str) and not isinstance(scope, Scope) else scope)
    except ValueError:
        valid = ", ".join(repr(s.value) for s in Scope)
        raise ValueError(f"unknown scope {scope!r}; expected one of {valid}") from None

    pairs = named_trainable(model)
    if scope is Scope.LAST_LAYER:
        ids = _last_layer_ids(model)
        pairs = [(n, p) for n, p in pairs if id(p) in ids]
    elif scope is Scope.LORA:  # the adapters and PEFT's fully trained modules (modules_to_save: the SEQ_CLS head)
        pairs = [(n, p) for n, p in pairs if "lora_" in n or "modules_to_save." in n]

    if module_types is not None:
        types = tuple(module_types) if isinstance(module_types, (list, tuple, set)) else (module_types,)
        if not all(isinstance(t, type) for t in types):
            raise TypeError(f"module_types must be a type or a sequence of types, got {module_types!r}")
        type_ids: set[int] = set()
        for module in model.modules():
            if isinstance(module, types):
                type_ids.update(id(p) for p in module.parameters(recurse=False))
        pairs = [(n, p) for n, p in pairs if id(p) in type_ids]

    inc, exc = _compile(include), _compile(exclude)
    if inc:
        pairs = [(n, p) for n, p in pairs if any(r.search(n) for r in inc)]
    if exc:
        pairs = [(n, p) for n, p in pairs if not any(r.search(n) for r in exc)]

    if not pairs:
        raise ValueError(
            f"scope {scope.value!r} (module_types={module_types}, include={include}, "
            f"exclude={exclude}) selects no trainable parameter of {type(model).__name__}"
        )
    if scope is Scope.LORA and module_types is None and not inc and not exc:
        warn_outside_scope(model, [p for _, p in pairs], 'select_parameters(model, "lora")', stacklevel=3)
    return pairs


def outside_scope(model: nn.Module, params: Iterable[torch.Tensor]) -> list[str]:
    """Names of ``model``'s trainable parameters that are not among ``params``."""
    ids = {id(p) for p in params}
    return [n for n, p in named_trainable(model) if id(p) not in ids]


def warn_outside_scope(model: nn.Module, params: Iterable[torch.Tensor], who: str, stacklevel: int = 2) -> None:
    """Warn, naming them, when trainable parameters of ``model`` are not in ``params``: they
    require grad but no optimizer updates them (they stay at their initial values)."""
    left = outside_scope(model, params)
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        warnings.warn(f"{who}: {len(left)} trainable parameter(s) of {type(model).__name__} are outside the "
                      f"learner's scope and will not be updated by it: {', '.join(left[:3])}{more}. Use "
                      "scope='trainable' to include them, give them to another optimizer, or set "
                      "requires_grad=False on what should stay fixed",
                      UserWarning, stacklevel=stacklevel)


def parameter_names(model: nn.Module, params: Iterable[torch.Tensor]) -> list[str]:
    """Names of ``params`` inside ``model`` (raises ``KeyError`` naming a stranger)."""
    lookup: dict[int, str] = {}
    for n, q in model.named_parameters(remove_duplicate=False):
        lookup.setdefault(id(q), n)
    names = []
    for i, p in enumerate(params):
        if id(p) not in lookup:
            raise KeyError(f"parameter #{i} (shape {tuple(p.shape)}) is not a parameter of the model")
        names.append(lookup[id(p)])
    return names
