"""Helpers shared by the framework integrations."""

from __future__ import annotations

from typing import Any


def unwrap_learner(opt: Any) -> Any:
    """The optimizer inside a framework's wrapper: Lightning's ``LightningOptimizer`` (which forwards
    attribute reads, so ``_vbpc_self`` is the learner itself) or accelerate's ``AcceleratedOptimizer``
    (``.optimizer``); any other object is returned as is."""
    real = getattr(opt, "_vbpc_self", None)
    if real is not None:
        return real
    inner = getattr(opt, "optimizer", None)
    if inner is not None and inner is not opt and hasattr(inner, "step"):
        return unwrap_learner(inner)
    return opt
