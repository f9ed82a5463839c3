r"""Out-of-distribution detection and misclassification detection (docs/algorithms.md §9, eq. 36).

In-domain examples are the **positives**; the score :math:`s` grows with in-domain-ness:
``"max_prob"`` :math:`\max_c\bar p_c` (default), ``"entropy"`` :math:`-\mathcal H[\bar p]`,
``"mi"`` :math:`-\mathrm{MI}` (eq. 35, needs the sample stack).

* **AUROC** :math:`=\frac1{n_{in}n_{out}}\sum_{i,j}(\mathbb 1[s_i>s_j]+\frac12\mathbb 1[s_i=s_j])`;
* **AUPR-in**: average precision :math:`\sum_k(R_k-R_{k-1})P_k` over the distinct thresholds
  (step-wise, as scikit-learn's ``average_precision_score``), in-domain positive, score :math:`s`;
  **AUPR-out**: OOD positive, score :math:`-s`;
* **FPR@95%TPR** (36): :math:`k=\lceil0.95\,n_{in}\rceil`, :math:`\tau^*` the :math:`k`-th largest
  in-domain score, :math:`\mathrm{FPR95}=\#\{j\in\mathrm{OOD}:s_j\ge\tau^*\}/n_{out}` -- the FPR
  at the largest threshold with TPR ≥ 0.95 (not the average over thresholds with TPR ≤ 0.95
  that a boolean-mask comparison in public evaluation code computes).

All four come from one pass over the distinct scores in descending order: per distinct
score, the number of positives and negatives there (:func:`binary_from_counts`); with integer
counts the AUROC and FPR are exact, and bootstrap resamples are rows of counts.

**Misclassification detection** (:func:`misclassification_auroc`) -- AUROC of correct vs
incorrect in-domain predictions scored by the max probability -- is a separate metric.
"""

from __future__ import annotations

import enum
import math
from fractions import Fraction
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ._checks import Inputs, as_enum, as_tensor, check_stack, f64, to_probs
from .classification import confidence_correct, prepare
from .uncertainty import decompose, entropy_of

__all__ = [
    "OODScore",
    "auroc",
    "average_precision",
    "fpr_at_tpr",
    "misclassification_auroc",
    "ood_metrics",
    "ood_metrics_from_scores",
    "ood_score",
]


class OODScore(str, enum.Enum):
    """In-domain-ness score: ``"max_prob"`` (default), ``"entropy"`` (:math:`-\\mathcal H[\\bar p]`),
    ``"mi"`` (:math:`-\\mathrm{MI}`, eq. 35; needs a sample stack)."""

    MAX_PROB = "max_prob"
    ENTROPY = "entropy"
    MI = "mi"


# ----------------------------------------------------------------------------- kernels
def check_scores(scores: Any, what: str) -> Tensor:
    """1-D, non-empty, NaN-free float64 scores."""
    s = as_tensor(scores, what)
    if s.dim() != 1:
        raise ValueError(f"{what} must be 1-D (one score per example), got shape {tuple(s.shape)}")
    if s.numel() == 0:
        raise ValueError(f"{what} is empty")
    if s.dtype == torch.bool or s.dtype.is_complex:
        raise ValueError(f"{what} must be real numbers, got {s.dtype}")
    s = f64(s)
    if torch.isnan(s).any():
        raise ValueError(f"{what} contains NaN")
    return s


def check_tpr(tpr: Any) -> Fraction:
    """The target TPR as an exact fraction (``0.95`` → 19/20, so that ``ceil(tpr·n)`` is exact)."""
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float, Fraction)) or not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    return Fraction(str(tpr)) if isinstance(tpr, float) else Fraction(tpr)


def score_grid(*score_sets: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The distinct values of all ``score_sets`` in **descending** order, and each set's
    positions in that grid (equal scores share a position: exact ties)."""
    grid = torch.unique(torch.cat(score_sets))  # ascending
    last = grid.numel() - 1
    return grid.flip(0), [last - torch.searchsorted(grid, s) for s in score_sets]


def binary_from_counts(pos: Tensor, neg: Tensor, tpr: Fraction = Fraction(19, 20)) -> dict[str, Tensor]:
    """Binary-detection metrics from counts of positives/negatives per distinct score.

    Args:
        pos, neg: ``(b, U)`` float64 counts (integers) over the distinct scores in descending
            order, one row per (re)sample.
        tpr: target TPR for ``fpr`` (eq. 36).

    Returns ``(b,)`` tensors: ``auroc`` (ties ½), ``ap`` (positives, score s), ``ap_rev``
    (negatives as positives, score −s) and ``fpr`` (FPR at TPR ≥ ``tpr``).  Rows without
    positives or negatives give NaN.
    """
    tp, fp = pos.cumsum(1), neg.cumsum(1)
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    # AUROC: each positive at grid point u beats the negatives below u, ties count 1/2.
    auroc = (pos * (n_neg[:, None] - fp + 0.5 * neg)).sum(1) / (n_pos * n_neg)
    # Average precision: sum_u (positives at u)/P * precision at threshold u.
    ap = (pos * torch.where(pos > 0, tp / (tp + fp).clamp_min(1.0), 0.0)).sum(1) / n_pos
    tp_r, fp_r = neg.flip(1).cumsum(1), pos.flip(1).cumsum(1)
    ap_rev = (neg.flip(1) * torch.where(neg.flip(1) > 0, tp_r / (tp_r + fp_r).clamp_min(1.0), 0.0)).sum(1) / n_neg
    # FPR at the largest threshold with TPR >= tpr: k = ceil(tpr * P), tau* = k-th largest positive.
    k = (n_pos * tpr.numerator + (tpr.denominator - 1)).div(tpr.denominator, rounding_mode="floor")
    u_star = torch.searchsorted(tp.contiguous(), k[:, None].contiguous()).clamp_max(tp.shape[1] - 1)
    fpr = fp.gather(1, u_star).squeeze(1) / n_neg
    fpr = torch.where(n_pos > 0, fpr, torch.full_like(fpr, math.nan))
    return {"auroc": auroc, "ap": ap, "ap_rev": ap_rev, "fpr": fpr}


def binary_metrics(positive: Tensor, negative: Tensor, tpr: Fraction = Fraction(19, 20)) -> dict[str, float]:
    """:func:`binary_from_counts` for one sample of validated float64 scores."""
    _, (p_pos, n_pos) = score_grid(positive, negative)
    u = int(max(p_pos.max(), n_pos.max())) + 1
    cp = torch.bincount(p_pos, minlength=u).to(torch.float64)[None]
    cn = torch.bincount(n_pos, minlength=u).to(torch.float64)[None]
    return {k: float(v[0]) for k, v in binary_from_counts(cp, cn, tpr).items()}


# ----------------------------------------------------------------------------- public API
def auroc(positive: Any, negative: Any) -> float:
    """Area under the ROC curve: probability that a positive scores above a negative, ties ½ (§9).
    ``positive``/``negative`` are 1-D scores (for OOD: in-domain and OOD scores)."""
    return binary_metrics(check_scores(positive, "positive"), check_scores(negative, "negative"))["auroc"]


def average_precision(positive: Any, negative: Any) -> float:
    """Average precision :math:`\\sum_k(R_k-R_{k-1})P_k` over distinct thresholds, high scores
    predicting positive (scikit-learn's ``average_precision_score``, step-wise, no interpolation)."""
    return binary_metrics(check_scores(positive, "positive"), check_scores(negative, "negative"))["ap"]


def fpr_at_tpr(positive: Any, negative: Any, tpr: float = 0.95) -> float:
    r"""FPR at the largest threshold with TPR ≥ ``tpr`` (eq. 36): with :math:`k=\lceil\mathrm{tpr}\cdot n_+\rceil`
    and :math:`\tau^*` the :math:`k`-th largest positive score, :math:`\#\{\text{negatives}\ge\tau^*\}/n_-`."""
    frac = check_tpr(tpr)
    return binary_metrics(check_scores(positive, "positive"), check_scores(negative, "negative"), frac)["fpr"]


def scores_from(probs: Tensor, stack: Optional[Tensor], score: OODScore) -> Tensor:
    """In-domain-ness scores of validated float64 predictions (``stack``: per-sample probabilities)."""
    if score is OODScore.MAX_PROB:
        return probs.max(-1).values
    if score is OODScore.ENTROPY:
        return -entropy_of(probs)
    if stack is None:
        raise ValueError("score='mi' needs the per-sample stack (S, N, C): pass sample_stack=")
    return -decompose(stack, probs).epistemic


def ood_score(pred: Any, *, score: Union[str, OODScore] = "max_prob", sample_stack: Optional[Any] = None,
              inputs: Union[str, Inputs] = "probs") -> Tensor:
    """Per-example in-domain-ness score ``(N,)`` (float64) of the predictive ``pred`` ``(N, C)``;
    ``sample_stack`` ``(S, N, C)`` (same ``inputs`` kind) is needed for ``score="mi"``."""
    score_e = as_enum(OODScore, score, "score")
    probs, _ = to_probs(pred, inputs, "pred")
    stack = None if sample_stack is None else check_stack(sample_stack, inputs, *probs.shape).to(probs.device)
    return scores_from(probs, stack, score_e)


def ood_metrics_from_scores(scores_in: Any, scores_out: Any) -> dict[str, float]:
    """``auroc``, ``aupr_in``, ``aupr_out`` and ``fpr95`` (eq. 36) from in-domain and OOD scores
    (higher = more in-domain)."""
    m = binary_metrics(check_scores(scores_in, "scores_in"), check_scores(scores_out, "scores_out"))
    return {"auroc": m["auroc"], "aupr_in": m["ap"], "aupr_out": m["ap_rev"], "fpr95": m["fpr"]}


def ood_metrics(pred_in: Any, pred_out: Any, *, score: Union[str, OODScore] = "max_prob",
                sample_stack_in: Optional[Any] = None, sample_stack_out: Optional[Any] = None,
                inputs: Union[str, Inputs] = "probs") -> dict[str, float]:
    """OOD detection metrics (§9) of the predictives on in-domain ``pred_in`` ``(N_in, C)`` and
    OOD ``pred_out`` ``(N_out, C)``; see :func:`ood_metrics_from_scores`."""
    s_in = ood_score(pred_in, score=score, sample_stack=sample_stack_in, inputs=inputs)
    s_out = ood_score(pred_out, score=score, sample_stack=sample_stack_out, inputs=inputs)
    return ood_metrics_from_scores(s_in, s_out)


def misclassification_auroc(pred: Any, labels: Any, *, inputs: Union[str, Inputs] = "probs") -> float:
    """AUROC of separating correct from incorrect predictions by the max probability (§9), ties ½.
    Not an OOD metric.  NaN when all predictions are correct or all wrong (undefined)."""
    probs, _, y = prepare(pred, labels, inputs)
    conf, correct = confidence_correct(probs, y)
    if correct.all() or not correct.any():
        return math.nan
    return binary_metrics(conf[correct], conf[~correct])["auroc"]
