r"""Uncertainty and calibration metrics for Bayesian predictives (docs/algorithms.md §9).

Functional metrics take the predictive :math:`\bar p` ``(N, C)`` (``inputs="probs"``, the
default; ``"log_probs"`` for eq. 33's logsumexp output; ``"logits"``) and integer labels
``(N,)`` and compute in float64:

* :mod:`~vbpc.metrics.classification` -- accuracy, NLL, Brier, ECE/MCE (eq. 34), adaptive ECE,
  reliability diagrams;
* :mod:`~vbpc.metrics.uncertainty` -- entropy and the aleatoric/epistemic decomposition (eq. 35)
  of a sample-first stack ``(S, N, C)``;
* :mod:`~vbpc.metrics.ood` -- OOD AUROC/AUPR-in/AUPR-out/FPR95 (eq. 36) and misclassification AUROC;
* :mod:`~vbpc.metrics.selective` -- risk–coverage curve and AURC;
* :mod:`~vbpc.metrics.lm` -- token-level LM calibration (causal shift, ``ignore_index``, mask);
* :mod:`~vbpc.metrics.streaming` -- mergeable, distributed-syncable accumulators;
* :mod:`~vbpc.metrics.bootstrap` -- percentile-bootstrap intervals.

Bad input (unnormalised or non-finite probabilities, out-of-range or non-integer labels,
empty or mismatched shapes, ``n_bins < 1``) raises :class:`ValueError` naming the problem.
"""

from __future__ import annotations

from ._checks import Inputs
from .bootstrap import (
    BootstrapCI,
    bootstrap_ci,
    bootstrap_classification,
    bootstrap_ood,
    bootstrap_ood_scores,
    bootstrap_tokens,
)
from .classification import (
    Binning,
    CalibrationNorm,
    ReliabilityDiagram,
    accuracy,
    adaptive_ece,
    brier,
    calibration_error,
    ece,
    mce,
    nll,
    nll_from_log_probs,
    reliability_diagram,
)
from .lm import TokenStats, token_metrics, token_stats
from .ood import (
    OODScore,
    auroc,
    average_precision,
    fpr_at_tpr,
    misclassification_auroc,
    ood_metrics,
    ood_metrics_from_scores,
    ood_score,
)
from .selective import aurc, risk_coverage_curve
from .streaming import ClassificationMetrics, OODMetrics, TokenMetrics, classification_metrics
from .uncertainty import Uncertainty, entropy, uncertainty_decomposition

__all__ = [
    # options
    "Inputs",
    "Binning",
    "CalibrationNorm",
    "OODScore",
    # classification
    "accuracy",
    "nll",
    "nll_from_log_probs",
    "brier",
    "calibration_error",
    "ece",
    "mce",
    "adaptive_ece",
    "reliability_diagram",
    "ReliabilityDiagram",
    "classification_metrics",
    # uncertainty
    "entropy",
    "uncertainty_decomposition",
    "Uncertainty",
    # OOD and misclassification detection
    "auroc",
    "average_precision",
    "fpr_at_tpr",
    "ood_score",
    "ood_metrics",
    "ood_metrics_from_scores",
    "misclassification_auroc",
    # selective prediction
    "risk_coverage_curve",
    "aurc",
    # language models
    "token_metrics",
    "token_stats",
    "TokenStats",
    # streaming
    "ClassificationMetrics",
    "OODMetrics",
    "TokenMetrics",
    # bootstrap
    "BootstrapCI",
    "bootstrap_ci",
    "bootstrap_classification",
    "bootstrap_ood",
    "bootstrap_ood_scores",
    "bootstrap_tokens",
]
