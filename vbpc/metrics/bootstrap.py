r"""Percentile-bootstrap confidence intervals (docs/algorithms.md §9 "Intervals").

``n_boot=1000`` resamples with replacement, a fixed ``seed`` (a CPU :class:`torch.Generator`),
a ``level=0.95`` interval between the :math:`(1\mp\text{level})/2` quantiles of the resampled
statistic (linear interpolation, as ``numpy.quantile``).  What is resampled:

* classification: examples;
* OOD: in-domain and OOD examples **independently** (their counts stay fixed);
* language models: **whole sequences** (tokens of one sequence are not independent).

Resamples are drawn as index matrices ``(b, n)`` in chunks of about :math:`2^{21}` entries; the
indices of each resample are sorted, so a resample lists the chosen examples in their original
order (order-dependent statistics -- adaptive ECE, AURC with tied confidences -- then break
ties as on the full data).  The suite's statistics are vectorised over the resamples: means by
gathers, bins by ``scatter_add``, sorted statistics by per-row sorts of precomputed stable
ranks, AUROC/AP/FPR by counts over the distinct scores (:func:`~vbpc.metrics.ood.binary_from_counts`).
Resamples on which a statistic is undefined (NaN, e.g. misclassification AUROC without an
error) are left out of the quantiles.  The estimate is the statistic on the full data.
Note that the ECE is biased upward under resampling, so its interval may not contain it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from ._checks import Inputs, as_enum, as_tensor, check_level, check_n_bins, check_stack, to_probs
from .classification import adaptive_groups, bin_index, ece_from_sums, example_stats, mce_from_sums, prepare
from .lm import sequence_sums, token_metrics_from_sums, token_stats
from .ood import OODScore, binary_from_counts, check_scores, score_grid, scores_from

__all__ = [
    "BootstrapCI",
    "bootstrap_ci",
    "bootstrap_classification",
    "bootstrap_example_stats",
    "bootstrap_ood",
    "bootstrap_ood_scores",
    "bootstrap_sequence_sums",
    "bootstrap_tokens",
    "resample_indices",
]

_CHUNK_ENTRIES = 2 ** 21


@dataclass(frozen=True)
class BootstrapCI:
    """A percentile-bootstrap interval: the ``estimate`` on the full data, the interval
    ``[low, high]`` at ``level``, the bootstrap ``std`` (ddof 1) and ``n_boot``; ``n_valid``
    resamples had a defined (non-NaN) value."""

    estimate: float
    low: float
    high: float
    level: float
    n_boot: int
    std: float
    n_valid: int

    def contains(self, value: float) -> bool:
        """``low <= value <= high``."""
        return self.low <= value <= self.high


def _check_boot(n_boot: Any, seed: Any, level: Any) -> tuple[int, int, float]:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1, got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return n_boot, seed, check_level(level)


def _chunk_rows(n: int) -> int:
    return max(1, _CHUNK_ENTRIES // max(n, 1))


def resample_indices(n: int, n_boot: int, generator: torch.Generator,
                     chunk: Optional[int] = None) -> Iterator[Tensor]:
    """Yield ``(b, n)`` int64 index matrices, ``n_boot`` rows in all, each row ``n`` draws with
    replacement from ``0..n-1`` **sorted ascending**.  Deterministic given the generator's state."""
    rows = chunk or _chunk_rows(n)
    done = 0
    while done < n_boot:
        b = min(rows, n_boot - done)
        idx = torch.randint(0, n, (b, n), generator=generator)
        counts = torch.zeros(b, n, dtype=torch.long).scatter_add_(1, idx, torch.ones_like(idx))
        yield torch.repeat_interleave(torch.arange(n).repeat(b), counts.flatten()).view(b, n)
        done += b


def _quantile(sorted_values: Tensor, q: float) -> float:
    """Linear-interpolation quantile (``numpy.quantile``'s default) of sorted values; equal
    neighbours (also ``inf``, e.g. an infinite NLL) are returned as they are, not interpolated."""
    h = (sorted_values.numel() - 1) * q
    lo, hi = math.floor(h), math.ceil(h)
    a, b = float(sorted_values[lo]), float(sorted_values[hi])
    return a if a == b else a + (h - lo) * (b - a)


def percentile_ci(estimate: float, values: Tensor, level: float) -> BootstrapCI:
    """The percentile interval of the bootstrap ``values`` (NaNs dropped)."""
    v = values.to(torch.float64).flatten()
    ok = v[~torch.isnan(v)]
    if ok.numel() == 0:
        low = high = std = math.nan
    else:
        srt = ok.sort().values
        low, high = _quantile(srt, (1 - level) / 2), _quantile(srt, (1 + level) / 2)
        std = float(ok.std()) if ok.numel() > 1 else math.nan
    return BootstrapCI(float(estimate), low, high, level, v.numel(), std, ok.numel())


def bootstrap_ci(metric_fn: Callable[..., Any], *arrays: Any, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, batched: bool = False) -> BootstrapCI:
    """Percentile-bootstrap interval of ``metric_fn(*arrays)``, resampling examples (dim 0).

    Args:
        metric_fn: ``f(*arrays) -> float``; with ``batched=True``, ``f`` receives arrays with a
            leading resample dimension ``(b, n, ...)`` and returns ``b`` values (the estimate is
            then ``f(*(a[None] for a in arrays))[0]``).
        arrays: tensors (or arrays) sharing their first dimension ``n >= 1``; resampled jointly.
        n_boot, seed, level: resamples, the generator's seed, the interval's level.

    Each resample keeps the chosen examples in their original order (sorted indices), and the
    resamples equal those of the suite functions (:func:`bootstrap_classification`) for the same
    ``n``, ``n_boot`` and ``seed``.
    """
    n_boot, seed, level = _check_boot(n_boot, seed, level)
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample")
    ts = [as_tensor(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    if any(t.dim() == 0 for t in ts):
        raise ValueError("arrays must have a first (example) dimension")
    n = ts[0].shape[0]
    if any(t.shape[0] != n for t in ts):
        raise ValueError(f"arrays must share their first dimension, got {[tuple(t.shape) for t in ts]}")
    if n == 0:
        raise ValueError("cannot bootstrap empty arrays")
    gen = torch.Generator().manual_seed(seed)
    values = []
    for idx in resample_indices(n, n_boot, gen):
        idx_d = [idx.to(t.device) for t in ts]
        if batched:
            values.append(torch.as_tensor(metric_fn(*(t[i] for t, i in zip(ts, idx_d))), dtype=torch.float64)
                          .cpu().reshape(-1))
        else:
            values.append(torch.tensor([float(metric_fn(*(t[i[r]] for t, i in zip(ts, idx_d))))
                                        for r in range(idx.shape[0])], dtype=torch.float64))
    estimate = metric_fn(*(t[None] for t in ts))[0] if batched else metric_fn(*ts)
    return percentile_ci(float(estimate), torch.cat(values), level)


# ----------------------------------------------------------------------------- classification suite
class _ExampleContext:
    """Precomputed per-example data for the vectorised statistics of one resample chunk."""

    def __init__(self, stats: dict[str, Tensor], n_bins: int):
        self.stats = {k: v.cpu() for k, v in stats.items()}
        conf = self.stats["confidence"]
        self.n, self.n_bins = conf.numel(), n_bins
        self.correct = self.stats["correct"].to(torch.float64)
        self.gap = self.correct - conf
        self.bins = bin_index(conf, n_bins)
        self._lazy: dict[str, Any] = {}

    def ranks(self, descending: bool) -> tuple[Tensor, Tensor]:
        """(rank of each example, example at each rank) under a stable sort by confidence."""
        key = f"rank{descending}"
        if key not in self._lazy:
            order = torch.sort(self.stats["confidence"], descending=descending, stable=True).indices
            rank = torch.empty_like(order)
            rank[order] = torch.arange(self.n)
            self._lazy[key] = (rank, order)
        return self._lazy[key]

    def grid(self) -> tuple[Tensor, int]:
        if "grid" not in self._lazy:
            grid, (pos,) = score_grid(self.stats["confidence"])
            self._lazy["grid"] = (pos, grid.numel())
        return self._lazy["grid"]


def _mean_of(key: str) -> Callable[[_ExampleContext, Tensor], Tensor]:
    return lambda ctx, idx: (ctx.correct if key == "correct" else ctx.stats[key])[idx].mean(1)


def _binned(ctx: _ExampleContext, idx: Tensor) -> tuple[Tensor, Tensor]:
    b = idx.shape[0]
    bins = ctx.bins[idx]
    count = torch.zeros(b, ctx.n_bins, dtype=torch.float64).scatter_add_(1, bins, torch.ones(bins.shape,
                                                                                            dtype=torch.float64))
    gap = torch.zeros(b, ctx.n_bins, dtype=torch.float64).scatter_add_(1, bins, ctx.gap[idx])
    return count, gap


def _adaptive_ece(ctx: _ExampleContext, idx: Tensor) -> Tensor:
    rank, order = ctx.ranks(descending=False)
    sorted_examples = order[rank[idx].sort(1).values]
    groups = adaptive_groups(ctx.n, ctx.n_bins).expand_as(idx)
    gap = torch.zeros(idx.shape[0], ctx.n_bins, dtype=torch.float64).scatter_add_(1, groups, ctx.gap[sorted_examples])
    return gap.abs().sum(1) / ctx.n


def _aurc(ctx: _ExampleContext, idx: Tensor) -> Tensor:
    rank, order = ctx.ranks(descending=True)
    errors = (1.0 - ctx.correct)[order[rank[idx].sort(1).values]].cumsum(1)
    return (errors / torch.arange(1, ctx.n + 1, dtype=torch.float64)).mean(1)


def _misclassification_auroc(ctx: _ExampleContext, idx: Tensor) -> Tensor:
    pos, u = ctx.grid()
    cells, corr = pos[idx], ctx.correct[idx]
    cp = torch.zeros(idx.shape[0], u, dtype=torch.float64).scatter_add_(1, cells, corr)
    cn = torch.zeros(idx.shape[0], u, dtype=torch.float64).scatter_add_(1, cells, 1.0 - corr)
    return binary_from_counts(cp, cn)["auroc"]


_EXAMPLE_METRICS: dict[str, Callable[[_ExampleContext, Tensor], Tensor]] = {
    "accuracy": _mean_of("correct"),
    "nll": _mean_of("nll"),
    "brier": _mean_of("brier"),
    "ece": lambda ctx, idx: ece_from_sums(*_binned(ctx, idx)),
    "mce": lambda ctx, idx: mce_from_sums(*_binned(ctx, idx)),
    "adaptive_ece": _adaptive_ece,
    "entropy": _mean_of("entropy"),
    "aleatoric": _mean_of("aleatoric"),
    "mi": _mean_of("mi"),
    "aurc": _aurc,
    "misclassification_auroc": _misclassification_auroc,
}


def _select(requested: Optional[Sequence[str]], available: Sequence[str]) -> list[str]:
    if requested is None:
        return list(available)
    bad = [m for m in requested if m not in available]
    if bad:
        raise ValueError(f"unknown or unavailable metrics {bad}; available: {list(available)}")
    return list(requested)


def bootstrap_example_stats(stats: dict[str, Tensor], n_bins: int = 15, *, n_boot: int = 1000, seed: int = 0,
                            level: float = 0.95, metrics: Optional[Sequence[str]] = None) -> dict[str, BootstrapCI]:
    """Bootstrap intervals of the classification suite from per-example statistics
    (:func:`~vbpc.metrics.classification.example_stats`), resampling examples."""
    n_boot, seed, level = _check_boot(n_boot, seed, level)
    n_bins = check_n_bins(n_bins)
    ctx = _ExampleContext(stats, n_bins)
    if ctx.n == 0:
        raise ValueError("cannot bootstrap zero examples")
    available = [m for m in _EXAMPLE_METRICS if m not in ("aleatoric", "mi") or m in ctx.stats]
    names = _select(metrics, available)
    full = torch.arange(ctx.n)[None]
    estimates = {m: float(_EXAMPLE_METRICS[m](ctx, full)[0]) for m in names}
    values: dict[str, list[Tensor]] = {m: [] for m in names}
    for idx in resample_indices(ctx.n, n_boot, torch.Generator().manual_seed(seed)):
        for m in names:
            values[m].append(_EXAMPLE_METRICS[m](ctx, idx))
    return {m: percentile_ci(estimates[m], torch.cat(values[m]), level) for m in names}


def bootstrap_classification(pred: Any, labels: Any, *, inputs: Union[str, Inputs] = "probs",
                             sample_stack: Optional[Any] = None, n_bins: int = 15, n_boot: int = 1000,
                             seed: int = 0, level: float = 0.95,
                             metrics: Optional[Sequence[str]] = None) -> dict[str, BootstrapCI]:
    """Bootstrap intervals (resampling examples) of ``accuracy``, ``nll``, ``brier``, ``ece``,
    ``mce``, ``adaptive_ece``, ``entropy``, ``aurc``, ``misclassification_auroc`` and, with a sample
    stack ``(S, N, C)``, ``aleatoric`` and ``mi``; ``metrics`` picks a subset."""
    probs, log_probs, y = prepare(pred, labels, inputs)
    stack = None if sample_stack is None else check_stack(sample_stack, inputs, *probs.shape).to(probs.device)
    return bootstrap_example_stats(example_stats(probs, log_probs, y, stack), n_bins, n_boot=n_boot, seed=seed,
                                   level=level, metrics=metrics)


# ----------------------------------------------------------------------------- OOD
def bootstrap_ood_scores(scores_in: Any, scores_out: Any, *, n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> dict[str, BootstrapCI]:
    """Intervals of ``auroc``, ``aupr_in``, ``aupr_out``, ``fpr95`` (eq. 36), resampling the
    in-domain and the OOD scores independently (one generator: in-chunk, then out-chunk)."""
    n_boot, seed, level = _check_boot(n_boot, seed, level)
    s_in, s_out = check_scores(scores_in, "scores_in").cpu(), check_scores(scores_out, "scores_out").cpu()
    grid, (p_in, p_out) = score_grid(s_in, s_out)
    u = grid.numel()
    names = {"auroc": "auroc", "aupr_in": "ap", "aupr_out": "ap_rev", "fpr95": "fpr"}

    def counts(pos: Tensor, idx: Tensor) -> Tensor:
        return torch.zeros(idx.shape[0], u, dtype=torch.float64).scatter_add_(
            1, pos[idx], torch.ones(idx.shape, dtype=torch.float64))

    est = binary_from_counts(counts(p_in, torch.arange(s_in.numel())[None]),
                             counts(p_out, torch.arange(s_out.numel())[None]))
    gen = torch.Generator().manual_seed(seed)
    rows = _chunk_rows(s_in.numel() + s_out.numel() + u)
    values: dict[str, list[Tensor]] = {k: [] for k in names}
    it_in = resample_indices(s_in.numel(), n_boot, gen, rows)
    it_out = resample_indices(s_out.numel(), n_boot, gen, rows)
    for idx_in in it_in:  # interleaved: in-chunk, out-chunk, ... from one generator
        idx_out = next(it_out)
        m = binary_from_counts(counts(p_in, idx_in), counts(p_out, idx_out))
        for k, v in names.items():
            values[k].append(m[v])
    return {k: percentile_ci(float(est[v][0]), torch.cat(values[k]), level) for k, v in names.items()}


def bootstrap_ood(pred_in: Any, pred_out: Any, *, score: Union[str, OODScore] = "max_prob",
                  sample_stack_in: Optional[Any] = None, sample_stack_out: Optional[Any] = None,
                  inputs: Union[str, Inputs] = "probs", n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, BootstrapCI]:
    """:func:`bootstrap_ood_scores` of the ``score`` of in-domain and OOD predictives."""
    score_e = as_enum(OODScore, score, "score")

    def scores(pred: Any, stack: Optional[Any], side: str) -> Tensor:
        probs, _ = to_probs(pred, inputs, f"pred_{side}")
        n, n_classes = probs.shape
        st = None if stack is None else check_stack(stack, inputs, n, n_classes, what=f"sample_stack_{side}")
        return scores_from(probs, None if st is None else st.to(probs.device), score_e)

    s_in, s_out = scores(pred_in, sample_stack_in, "in"), scores(pred_out, sample_stack_out, "out")
    return bootstrap_ood_scores(s_in, s_out, n_boot=n_boot, seed=seed, level=level)


# ----------------------------------------------------------------------------- language models
def bootstrap_sequence_sums(sums: Tensor, n_bins: int = 15, *, n_boot: int = 1000, seed: int = 0,
                            level: float = 0.95) -> dict[str, BootstrapCI]:
    """Intervals of the token metrics from per-sequence sums ``(n_seq, 4 + 2·n_bins)``
    (:func:`~vbpc.metrics.lm.sequence_sums`), resampling whole sequences: each resample's sums
    are ``W @ sums`` with ``W`` the resample's per-sequence counts."""
    n_boot, seed, level = _check_boot(n_boot, seed, level)
    n_bins = check_n_bins(n_bins)
    sums = sums.to(torch.float64).cpu()
    n_seq = sums.shape[0]
    if n_seq == 0 or sums[:, 0].sum() == 0:
        raise ValueError("cannot bootstrap: no target tokens")
    est = token_metrics_from_sums(sums.sum(0), n_bins)
    names = [k for k in est if k != "n_tokens"]
    values: dict[str, list[Tensor]] = {k: [] for k in names}
    for idx in resample_indices(n_seq, n_boot, torch.Generator().manual_seed(seed)):
        w = torch.zeros(idx.shape[0], n_seq, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(idx.shape, dtype=torch.float64))
        m = token_metrics_from_sums(w @ sums, n_bins)
        for k in names:
            values[k].append(m[k])
    return {k: percentile_ci(float(est[k]), torch.cat(values[k]), level) for k in names}


def bootstrap_tokens(pred: Any, labels: Any, attention_mask: Optional[Any] = None, *,
                     inputs: Union[str, Inputs] = "logits", ignore_index: int = -100, shift: bool = True,
                     n_bins: int = 15, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict[str, BootstrapCI]:
    """Intervals of the token-level metrics (:func:`~vbpc.metrics.lm.token_metrics`), resampling
    whole sequences (rows of ``pred``)."""
    n_bins = check_n_bins(n_bins)
    stats = token_stats(pred, labels, attention_mask, inputs=inputs, ignore_index=ignore_index, shift=shift)
    return bootstrap_sequence_sums(sequence_sums(stats, n_bins), n_bins, n_boot=n_boot, seed=seed, level=level)
