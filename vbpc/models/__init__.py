"""Small reference networks."""

from .mlp import MLP

__all__ = ["MLP"]
