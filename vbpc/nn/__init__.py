"""Hand-built Bayesian networks: layers that store a diagonal Gaussian (mean + precision).

See :mod:`vbpc.nn.layers` and ALGORITHMS.md §1-2 (eq. 3 for the precision, eq. 5 for samples).
"""

from .layers import (
    BAYES_PRECISION_SUFFIX,
    BayesConv2d,
    BayesEmbedding,
    BayesLinear,
    BayesModule,
    bayesian_layers,
    sampling,
)

__all__ = [
    "BAYES_PRECISION_SUFFIX",
    "BayesModule",
    "BayesLinear",
    "BayesConv2d",
    "BayesEmbedding",
    "bayesian_layers",
    "sampling",
]
