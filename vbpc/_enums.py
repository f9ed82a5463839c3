"""String-enum options (laplace-torch style): one parser with one error message for all of vbpc."""

from __future__ import annotations

import enum
from typing import Any, TypeVar

__all__ = ["parse_enum"]

E = TypeVar("E", bound=enum.Enum)


def parse_enum(cls: type[E], value: Any, what: str) -> E:
    """``cls(value)`` (case-insensitive for strings) or a ``ValueError`` naming ``what`` and the options."""
    try:
        return cls(value.lower() if isinstance(value, str) else value)
    except ValueError:
        raise ValueError(f"invalid {what}={value!r}; expected one of {[m.value for m in cls]}") from None
