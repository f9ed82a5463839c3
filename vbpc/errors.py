"""Exception types raised by vbpc.  Each message names the problem and the object involved."""

from __future__ import annotations

__all__ = ["NonFiniteError", "SamplingError", "StateDictMismatchError", "CorruptCheckpointError", "RunLockedError"]


class NonFiniteError(FloatingPointError):
    """A loss, gradient or statistic is NaN or infinite; no state was changed."""


class SamplingError(RuntimeError):
    """Misuse of a weight-sampling context (nested use, ``step`` without samples, ...)."""


class StateDictMismatchError(ValueError):
    """A state dict or checkpoint does not match the object it is loaded into."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt or not a safetensors file; nothing was loaded."""


class RunLockedError(OSError):
    """A run directory is in use by another live process (its PID is in the message)."""
