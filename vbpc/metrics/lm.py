r"""Token-level calibration of language models (docs/algorithms.md §9 "Token-level calibration").

Given predictions ``(B, T, V)`` (``"logits"`` by default, or :math:`\log\bar p` from the running
``logaddexp`` BMA of eq. 33 with ``inputs="log_probs"``) and ``labels`` ``(B, T)``:

1. **causal shift** (``shift=True``): the prediction at position :math:`t` is scored against
   ``labels[:, t+1]``; pass ``shift=False`` for labels already aligned with the predictions;
2. **drop** targets equal to ``ignore_index`` (−100) or whose ``attention_mask`` is 0 (the
   mask of the *target* position);
3. **pool** the remaining tokens as examples: confidence :math:`\max_v\bar p(v\mid\text{context})`
   for ECE/MCE (eq. 34), Brier :math:`\sum_v\bar p_v^2-2\bar p_y+1` (no one-hot), NLL, accuracy, and
   perplexity :math:`=\exp(\text{mean token NLL})`.

Memory: only the kept rows are converted to float64, ``chunk_size`` rows at a time (default
:math:`\lfloor2^{22}/V\rfloor`, about 32 MB per float64 temporary); the input is never copied
whole when it is contiguous.  Per-sequence sums (``sequence_sums``) make the metrics mergeable
and let the bootstrap resample whole sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ._checks import Inputs, as_enum, as_tensor, check_n_bins, to_probs
from .classification import bin_index, brier_per_example, confidence_correct, ece_from_sums, mce_from_sums

__all__ = ["TokenStats", "sequence_sums", "token_metrics", "token_metrics_from_sums", "token_stats"]

#: Columns of a per-sequence sums row before the ``2·n_bins`` per-bin columns (counts, then gaps).
SUM_COLUMNS = ("count", "correct", "nll", "brier")


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of the kept target tokens (float64 ``(K,)`` each; ``correct`` bool),
    ``sequence`` the batch row of each token and ``n_sequences`` the batch size B."""

    confidence: Tensor
    correct: Tensor
    nll: Tensor
    brier: Tensor
    sequence: Tensor
    n_sequences: int


def _check_mask(attention_mask: Any, shape: tuple[int, int]) -> Optional[Tensor]:
    if attention_mask is None:
        return None
    m = as_tensor(attention_mask, "attention_mask")
    if tuple(m.shape) != shape:
        raise ValueError(f"attention_mask has shape {tuple(m.shape)} but the labels have {shape}")
    if not ((m == 0) | (m == 1)).all():
        raise ValueError("attention_mask must contain only 0 and 1")
    return m != 0


def token_stats(pred: Any, labels: Any, attention_mask: Optional[Any] = None, *,
                inputs: Union[str, Inputs] = "logits", ignore_index: int = -100, shift: bool = True,
                chunk_size: Optional[int] = None) -> TokenStats:
    """Per-token confidence, correctness, NLL and Brier of the kept targets (module docstring).

    Raises ValueError for a non-3-D ``pred``, labels/mask of another shape than ``(B, T)``,
    non-integer labels, kept labels outside ``[0, V)``, and NaN/unnormalised kept rows.
    """
    kind = as_enum(Inputs, inputs, "inputs")
    x = as_tensor(pred, "pred")
    if x.dim() != 3:
        raise ValueError(f"pred must have shape (B, T, V), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"pred is empty (shape {tuple(x.shape)})")
    n_seq, n_pos, vocab = x.shape
    y = as_tensor(labels, "labels")
    if y.dtype == torch.bool or y.dtype.is_floating_point or y.dtype.is_complex:
        raise ValueError(f"labels must be integer token ids, got dtype {y.dtype}")
    if tuple(y.shape) != (n_seq, n_pos):
        raise ValueError(f"labels has shape {tuple(y.shape)} but pred needs (B, T) = ({n_seq}, {n_pos})")
    mask = _check_mask(attention_mask, (n_seq, n_pos))
    y = y.long().to(x.device)
    tgt = y[:, 1:] if shift else y
    keep = tgt != ignore_index
    if mask is not None:
        keep &= (mask[:, 1:] if shift else mask).to(x.device)
    seq, pos = keep.nonzero(as_tuple=True)
    targets = tgt[seq, pos]
    if targets.numel() and (targets.min() < 0 or targets.max() >= vocab):
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise ValueError(f"labels out of range: found {bad}, expected token ids in [0, {vocab}) "
                         f"or {ignore_index} (ignore_index)")
    rows = seq * n_pos + pos
    flat = x.reshape(n_seq * n_pos, vocab)
    step = chunk_size if chunk_size is not None else max(1, 2 ** 22 // vocab)
    if step < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    parts: dict[str, list[Tensor]] = {"confidence": [], "correct": [], "nll": [], "brier": []}
    for i in range(0, rows.numel(), step):
        probs, log_probs = to_probs(flat.index_select(0, rows[i:i + step]), kind, "pred (kept target rows)")
        yc = targets[i:i + step].to(probs.device)
        conf, corr = confidence_correct(probs, yc)
        parts["confidence"].append(conf)
        parts["correct"].append(corr)
        parts["nll"].append(-log_probs.gather(1, yc[:, None]).squeeze(1))
        parts["brier"].append(brier_per_example(probs, yc))
    dev = parts["nll"][0].device if parts["nll"] else x.device
    out = {k: (torch.cat(v) if v else torch.zeros(0, dtype=torch.bool if k == "correct" else torch.float64,
                                                  device=dev)) for k, v in parts.items()}
    return TokenStats(**out, sequence=seq.to(dev), n_sequences=n_seq)


def sequence_sums(stats: TokenStats, n_bins: int) -> Tensor:
    """Per-sequence sums ``(B, 4 + 2·n_bins)``: token count, correct count, NLL sum, Brier sum,
    then per-bin token counts and per-bin gap sums :math:`\\sum(\\mathrm{corr}-c)` (eq. 34)."""
    n_bins = check_n_bins(n_bins)
    dev = stats.nll.device
    out = torch.zeros(stats.n_sequences, 4 + 2 * n_bins, dtype=torch.float64, device=dev)
    s = stats.sequence
    out[:, 0].index_add_(0, s, torch.ones_like(stats.nll))
    out[:, 1].index_add_(0, s, stats.correct.to(torch.float64))
    out[:, 2].index_add_(0, s, stats.nll)
    out[:, 3].index_add_(0, s, stats.brier)
    cell = s * n_bins + bin_index(stats.confidence, n_bins)
    flat = torch.zeros(stats.n_sequences * n_bins, dtype=torch.float64, device=dev)
    out[:, 4:4 + n_bins] = flat.clone().index_add_(0, cell, torch.ones_like(stats.nll)).view(-1, n_bins)
    out[:, 4 + n_bins:] = flat.index_add_(0, cell, stats.correct.to(torch.float64) - stats.confidence).view(
        -1, n_bins)
    return out


def token_metrics_from_sums(sums: Tensor, n_bins: int) -> dict[str, Tensor]:
    """``accuracy``, ``nll``, ``perplexity``, ``brier``, ``ece``, ``mce``, ``n_tokens`` from summed
    rows of :func:`sequence_sums` (shape ``(..., 4 + 2·n_bins)``; one value per leading index)."""
    count = sums[..., 0]
    nll = sums[..., 2] / count
    bin_count, bin_gap = sums[..., 4:4 + n_bins], sums[..., 4 + n_bins:]
    return {
        "accuracy": sums[..., 1] / count,
        "nll": nll,
        "perplexity": nll.exp(),
        "brier": sums[..., 3] / count,
        "ece": ece_from_sums(bin_count, bin_gap),
        "mce": torch.where(count > 0, mce_from_sums(bin_count, bin_gap), torch.full_like(count, float("nan"))),
        "n_tokens": count,
    }


def token_metrics(pred: Any, labels: Any, attention_mask: Optional[Any] = None, *,
                  inputs: Union[str, Inputs] = "logits", ignore_index: int = -100, shift: bool = True,
                  n_bins: int = 15) -> dict[str, float]:
    """Token-level ``accuracy``, ``nll``, ``perplexity``, ``brier``, ``ece``, ``mce`` and ``n_tokens``
    (module docstring).  Raises ValueError when no target token is left."""
    n_bins = check_n_bins(n_bins)
    stats = token_stats(pred, labels, attention_mask, inputs=inputs, ignore_index=ignore_index, shift=shift)
    if stats.nll.numel() == 0:
        raise ValueError("no target tokens left after the causal shift, ignore_index and attention_mask")
    total = sequence_sums(stats, n_bins).sum(0)
    return {k: float(v) for k, v in token_metrics_from_sums(total, n_bins).items()}
