r"""Classification metrics on the predictive :math:`\bar p` (docs/algorithms.md §9, eq. 34).

All metrics compute in float64 from ``pred`` ``(N, C)`` and integer ``labels`` ``(N,)``.
``pred`` holds probabilities by default; ``inputs="log_probs"`` takes :math:`\log\bar p` as
eq. (33) and :func:`vbpc.predictive.predict` give it (the NLL then uses it directly, no
epsilon), ``inputs="logits"`` applies a softmax.

* **accuracy** of :math:`\arg\max_c\bar p_c`, ties to the lowest class index;
* **NLL** :math:`-\frac1n\sum_i\log\bar p(y_i\mid x_i)`, ``inf`` if some :math:`\bar p(y_i)=0`;
* **Brier** :math:`\frac1n\sum_i\sum_c(\bar p_{ic}-\mathbb 1[c=y_i])^2`, summed over classes, in [0, 2];
* **ECE/MCE** (34): top-label confidence :math:`c_i=\max_c\bar p_{ic}`, equal-width bins
  :math:`[k/M,(k+1)/M)` with the last one closed, :math:`b(c)=\min(M-1,\lfloor cM\rfloor)`,

  .. math::
      \mathrm{ECE}=\tfrac1n\textstyle\sum_k\big|\sum_{i\in I_k}(\mathrm{corr}_i-c_i)\big|,\qquad
      \mathrm{MCE}=\max_{I_k\ne\emptyset}\big|\sum_{i\in I_k}(\mathrm{corr}_i-c_i)\big|/|I_k|.

  Unlike torchmetrics (``bucketize(right=True) - 1``), a confidence of exactly 1.0 lands in
  bin :math:`M-1`, not in a hidden bin :math:`M` (§9 corner case: 0.475/0.475 here, 0.525/1.0 there);
* **adaptive ECE**: stable-sort by confidence (ascending), cut into :math:`M` contiguous
  groups whose sizes differ by at most one, the first :math:`n\bmod M` one larger, apply (34);
* **reliability diagram**: per-bin count, accuracy and mean confidence.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ._checks import Inputs, as_enum, check_labels, check_n_bins, to_probs
from .uncertainty import decompose, entropy_of

__all__ = [
    "Binning",
    "CalibrationNorm",
    "ReliabilityDiagram",
    "accuracy",
    "adaptive_ece",
    "argmax_lowest",
    "bin_index",
    "brier",
    "calibration_error",
    "ece",
    "example_stats",
    "mce",
    "nll",
    "nll_from_log_probs",
    "reliability_diagram",
]


class CalibrationNorm(str, enum.Enum):
    """How per-bin gaps are combined: ``"l1"`` (count-weighted mean, ECE) or ``"max"`` (MCE)."""

    L1 = "l1"
    MAX = "max"


class Binning(str, enum.Enum):
    """``"uniform"`` (equal-width bins, eq. 34) or ``"adaptive"`` (equal-mass groups)."""

    UNIFORM = "uniform"
    ADAPTIVE = "adaptive"


# ----------------------------------------------------------------------------- kernels (float64 tensors in)
def argmax_lowest(x: Tensor) -> Tensor:
    """Row-wise argmax over the last dimension, ties resolved to the lowest index (explicitly,
    not relying on the backend's ``argmax`` tie rule)."""
    top = x.max(-1, keepdim=True).values
    idx = torch.arange(x.shape[-1], device=x.device).expand_as(x)
    return torch.where(x == top, idx, x.shape[-1]).min(-1).values


def bin_index(confidence: Tensor, n_bins: int) -> Tensor:
    r"""Equal-width bin of each confidence, :math:`b(c)=\min(M-1,\lfloor cM\rfloor)` (eq. 34)."""
    return torch.clamp((confidence * n_bins).floor(), 0, n_bins - 1).long()


def adaptive_groups(n: int, n_groups: int, device: Union[torch.device, str, None] = None) -> Tensor:
    """Group id of each sorted position ``0..n-1``: ``n_groups`` contiguous groups whose sizes
    differ by at most one, the first ``n mod n_groups`` of size ``n // n_groups + 1``."""
    q, r = divmod(n, n_groups)
    j = torch.arange(n, device=device)
    big = r * (q + 1)
    return torch.where(j < big, j // (q + 1), r + (j - big) // max(q, 1))


def bin_sums(group: Tensor, confidence: Tensor, correct: Tensor, n_bins: int) -> dict[str, Tensor]:
    """Per-bin ``count`` (int64), ``correct`` (int64), ``confidence`` sum and ``gap`` sum
    :math:`\\sum_{I_k}(\\mathrm{corr}_i-c_i)` (float64), each of shape ``(n_bins,)``."""
    z = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device)
    gap = correct.to(torch.float64) - confidence
    return {
        "count": torch.bincount(group, minlength=n_bins),
        "correct": torch.zeros(n_bins, dtype=torch.long, device=group.device).index_add_(0, group, correct.long()),
        "confidence": z.clone().index_add_(0, group, confidence),
        "gap": z.clone().index_add_(0, group, gap),
    }


def ece_from_sums(count: Tensor, gap: Tensor) -> Tensor:
    """ECE (34) from per-bin counts and gap sums; works on ``(..., M)`` batches."""
    return gap.abs().sum(-1) / count.sum(-1).to(torch.float64)


def mce_from_sums(count: Tensor, gap: Tensor) -> Tensor:
    """MCE (34): the largest per-bin mean gap over non-empty bins; works on ``(..., M)`` batches."""
    mean_gap = gap.abs() / count.clamp_min(1).to(torch.float64)
    return torch.where(count > 0, mean_gap, torch.zeros_like(mean_gap)).max(-1).values


def confidence_correct(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence :math:`\\max_c\\bar p_c` and correctness of the lowest-index argmax."""
    return probs.max(-1).values, argmax_lowest(probs) == labels


def brier_per_example(probs: Tensor, labels: Tensor) -> Tensor:
    r""":math:`\sum_c(\bar p_c-\mathbb 1[c=y])^2=\sum_c\bar p_c^2-2\bar p_y+1`, without a one-hot."""
    p_y = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (probs * probs).sum(-1) - 2.0 * p_y + 1.0


def nll_per_example(log_probs: Tensor, labels: Tensor) -> Tensor:
    r""":math:`-\log\bar p(y)` (no epsilon; ``inf`` where :math:`\bar p(y)=0`)."""
    return -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def calibration_from(confidence: Tensor, correct: Tensor, n_bins: int, norm: CalibrationNorm,
                     binning: Binning) -> float:
    """ECE/MCE (34) of confidences and correctness flags under ``binning``."""
    if binning is Binning.UNIFORM:
        group = bin_index(confidence, n_bins)
    else:
        order = torch.sort(confidence, stable=True).indices
        group = torch.empty_like(order)
        group[order] = adaptive_groups(confidence.numel(), n_bins, confidence.device)
    s = bin_sums(group, confidence, correct, n_bins)
    fn = ece_from_sums if norm is CalibrationNorm.L1 else mce_from_sums
    return float(fn(s["count"], s["gap"]))


def prepare(pred: Any, labels: Any, inputs: Any = "probs") -> tuple[Tensor, Tensor, Tensor]:
    """Validated ``(probs, log_probs, labels)``: float64 ``(N, C)`` twice and int64 ``(N,)``."""
    probs, log_probs = to_probs(pred, inputs, as_enum(Inputs, inputs, "inputs").value)
    y = check_labels(labels, probs.shape[0], probs.shape[1]).to(probs.device)
    return probs, log_probs, y


# ----------------------------------------------------------------------------- public functional API
def accuracy(pred: Any, labels: Any, *, inputs: Union[str, Inputs] = "probs") -> float:
    """Fraction of examples whose :math:`\\arg\\max_c\\bar p_c` (ties → lowest index) equals the label (§9)."""
    probs, _, y = prepare(pred, labels, inputs)
    return float((argmax_lowest(probs) == y).double().mean())


def nll(pred: Any, labels: Any, *, inputs: Union[str, Inputs] = "probs") -> float:
    r"""Mean negative log-likelihood :math:`-\frac1n\sum_i\log\bar p(y_i|x_i)` (§9), no epsilon.

    With ``inputs="log_probs"`` the given :math:`\log\bar p` (logsumexp of eq. 33) is used as is.
    """
    _, log_probs, y = prepare(pred, labels, inputs)
    return float(nll_per_example(log_probs, y).mean())


def nll_from_log_probs(log_probs: Any, labels: Any) -> float:
    r"""NLL from :math:`\log\bar p` (eq. 33), i.e. ``nll(log_probs, labels, inputs="log_probs")``."""
    return nll(log_probs, labels, inputs="log_probs")


def brier(pred: Any, labels: Any, *, inputs: Union[str, Inputs] = "probs") -> float:
    r"""Brier score :math:`\frac1n\sum_i\sum_c(\bar p_{ic}-\mathbb 1[c=y_i])^2`, summed over classes (§9)."""
    probs, _, y = prepare(pred, labels, inputs)
    return float(brier_per_example(probs, y).mean())


def calibration_error(pred: Any, labels: Any, n_bins: int = 15, *, norm: Union[str, CalibrationNorm] = "l1",
                      binning: Union[str, Binning] = "uniform", inputs: Union[str, Inputs] = "probs") -> float:
    """Top-label calibration error (eq. 34): ``norm="l1"`` is the ECE, ``"max"`` the MCE;
    ``binning="uniform"`` uses :math:`M` equal-width bins, ``"adaptive"`` equal-mass groups."""
    n_bins = check_n_bins(n_bins)
    norm_e = as_enum(CalibrationNorm, norm, "norm")
    binning_e = as_enum(Binning, binning, "binning")
    probs, _, y = prepare(pred, labels, inputs)
    conf, correct = confidence_correct(probs, y)
    return calibration_from(conf, correct, n_bins, norm_e, binning_e)


def ece(pred: Any, labels: Any, n_bins: int = 15, *, inputs: Union[str, Inputs] = "probs") -> float:
    """Expected calibration error, equal-width bins (eq. 34)."""
    return calibration_error(pred, labels, n_bins, norm="l1", binning="uniform", inputs=inputs)


def mce(pred: Any, labels: Any, n_bins: int = 15, *, inputs: Union[str, Inputs] = "probs") -> float:
    """Maximum calibration error over non-empty equal-width bins (eq. 34)."""
    return calibration_error(pred, labels, n_bins, norm="max", binning="uniform", inputs=inputs)


def adaptive_ece(pred: Any, labels: Any, n_bins: int = 15, *, inputs: Union[str, Inputs] = "probs") -> float:
    """ECE (34) over ``n_bins`` equal-mass groups of the stably sorted confidences (§9)."""
    return calibration_error(pred, labels, n_bins, norm="l1", binning="adaptive", inputs=inputs)


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin data of a reliability diagram (eq. 34 bins): ``edges`` ``(M+1,)``, ``count``
    ``(M,)`` (the confidence histogram), ``accuracy`` and mean ``confidence`` ``(M,)`` (NaN in
    empty bins).  ``ece``/``mce`` are the corresponding scalars."""

    edges: Tensor
    count: Tensor
    accuracy: Tensor
    confidence: Tensor
    ece: float
    mce: float

    @staticmethod
    def from_sums(sums: dict[str, Tensor]) -> ReliabilityDiagram:
        """Build from :func:`bin_sums`-style per-bin sums."""
        count = sums["count"].cpu()
        n_bins = count.numel()
        denom = count.to(torch.float64)
        empty = count == 0
        nan = torch.full((n_bins,), float("nan"), dtype=torch.float64)
        return ReliabilityDiagram(
            edges=torch.arange(n_bins + 1, dtype=torch.float64) / n_bins,
            count=count,
            accuracy=torch.where(empty, nan, sums["correct"].cpu().to(torch.float64) / denom),
            confidence=torch.where(empty, nan, sums["confidence"].cpu() / denom),
            ece=float(ece_from_sums(count, sums["gap"].cpu())),
            mce=float(mce_from_sums(count, sums["gap"].cpu())),
        )


def reliability_diagram(pred: Any, labels: Any, n_bins: int = 15, *,
                        inputs: Union[str, Inputs] = "probs") -> ReliabilityDiagram:
    """Per-bin count, accuracy and mean confidence over equal-width bins (§9, eq. 34)."""
    n_bins = check_n_bins(n_bins)
    probs, _, y = prepare(pred, labels, inputs)
    conf, correct = confidence_correct(probs, y)
    return ReliabilityDiagram.from_sums(bin_sums(bin_index(conf, n_bins), conf, correct, n_bins))


def example_stats(probs: Tensor, log_probs: Tensor, labels: Tensor,
                  sample_probs: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Per-example statistics of validated float64 inputs, each ``(N,)``: ``confidence``,
    ``correct`` (bool), ``nll``, ``brier``, ``entropy`` :math:`\\mathcal H[\\bar p]` and, given the
    per-sample probabilities ``(S, N, C)``, ``aleatoric`` and ``mi`` (eq. 35).  Their means (and the
    bins of ``confidence``/``correct``) are the suite's metrics; bootstraps resample their rows."""
    conf, correct = confidence_correct(probs, labels)
    out = {"confidence": conf, "correct": correct, "nll": nll_per_example(log_probs, labels),
           "brier": brier_per_example(probs, labels), "entropy": entropy_of(probs)}
    if sample_probs is not None:
        u = decompose(sample_probs, probs)
        out["aleatoric"], out["mi"] = u.aleatoric, u.epistemic
    return out
