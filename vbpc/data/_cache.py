"""The vbpc cache directory and atomic writes into it."""

from __future__ import annotations

import os
from pathlib import Path

from ..io import atomic_write_text

__all__ = ["CACHE_ENV", "atomic_write_text", "cache_dir"]

#: Environment variable overriding the cache directory.
CACHE_ENV = "VBPC_CACHE"


def cache_dir() -> Path:
    """The vbpc cache directory: ``$VBPC_CACHE``, else ``$XDG_CACHE_HOME/vbpc``, else ``~/.cache/vbpc``.

    The directory is not created here.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vbpc"
