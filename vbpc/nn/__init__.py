"""Hand-built Bayesian networks: layers that store a diagonal Gaussian (mean + precision).

See :mod:`vbpc.nn.layers` and docs/algorithms.md §1-2 (eq. 3 for the precision, eq. 5 for samples).
"""

from . import layers, norm
from .layers import *  # noqa: F403
from .norm import *  # noqa: F403

__all__ = list(layers.__all__) + list(norm.__all__)
