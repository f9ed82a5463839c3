"""Matplotlib figures for the evaluation report, saved as PNG atomically (docs/algorithms.md §9).

* :func:`plot_reliability`: per-bin accuracy vs confidence (eq. 34 bins) over a confidence histogram;
* :func:`plot_ood_scores`: histograms of the OOD score for in-domain and OOD inputs;
* :func:`plot_risk_coverage`: selective-prediction risk vs coverage.

Every function takes one or several labelled results so methods can be compared in one figure,
returns the ``Figure`` and, with ``path``, writes it (Agg backend, no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from ..reporting import log_yaxis, save_figure  # noqa: E402,F401 (re-exported)

__all__ = ["log_yaxis", "plot_ood_scores", "plot_reliability", "plot_risk_coverage", "save_figure"]

PathLike = Union[str, "os.PathLike[str]"]


def plot_reliability(diagrams: Mapping[str, Any], path: Optional[PathLike] = None, title: str = "") -> Any:
    """Reliability diagrams (one panel per method): bars of per-bin accuracy, the diagonal, the
    gap, and the confidence histogram underneath.  ``diagrams`` maps a label to a
    :class:`vbpc.metrics.ReliabilityDiagram` (``edges``, ``count``, ``accuracy``, ``confidence``, ``ece``)."""
    if not diagrams:
        raise ValueError("plot_reliability: no diagram given")
    n = len(diagrams)
    fig, axes = plt.subplots(2, n, figsize=(4 * n, 5), squeeze=False, gridspec_kw={"height_ratios": [3, 1]},
                             sharex=True)
    for j, (label, d) in enumerate(diagrams.items()):
        edges = torch.as_tensor(d.edges, dtype=torch.float64)
        width = float(edges[1] - edges[0])
        centers = (edges[:-1] + width / 2).numpy()
        acc = torch.nan_to_num(torch.as_tensor(d.accuracy, dtype=torch.float64), nan=0.0).numpy()
        conf = torch.as_tensor(d.confidence, dtype=torch.float64)
        ax = axes[0, j]
        ax.bar(centers, acc, width=width * 0.95, color="tab:blue", edgecolor="black", linewidth=0.4, label="accuracy")
        filled = ~torch.isnan(conf)
        gap_c = conf[filled].numpy()
        ax.bar(centers[filled.numpy()], gap_c - acc[filled.numpy()], bottom=acc[filled.numpy()], width=width * 0.95,
               color="tab:red", alpha=0.3, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{label}  (ECE {float(d.ece):.4f})")
        ax.set_ylabel("accuracy")
        if j == 0:
            ax.legend(loc="upper left", fontsize=8)
        hist = axes[1, j]
        counts = torch.as_tensor(d.count, dtype=torch.float64)
        hist.bar(centers, (counts / counts.sum().clamp_min(1)).numpy(), width=width * 0.95, color="gray")
        hist.set_xlabel("confidence")
        hist.set_ylabel("fraction")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_ood_scores(scores: Mapping[str, tuple[Tensor, Tensor]], path: Optional[PathLike] = None,
                    score_name: str = "max probability", bins: int = 40) -> Any:
    """Histograms of the OOD score, in-domain vs OOD, one panel per method (``label -> (s_in, s_out)``)."""
    if not scores:
        raise ValueError("plot_ood_scores: no scores given")
    n = len(scores)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3), squeeze=False)
    for j, (label, (s_in, s_out)) in enumerate(scores.items()):
        a, b = torch.as_tensor(s_in).double(), torch.as_tensor(s_out).double()
        lo, hi = float(torch.minimum(a.min(), b.min())), float(torch.maximum(a.max(), b.max()))
        edges = torch.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1).numpy()
        ax = axes[0, j]
        ax.hist(a.numpy(), bins=edges, alpha=0.6, density=True, label="in-domain")
        ax.hist(b.numpy(), bins=edges, alpha=0.6, density=True, label="OOD")
        ax.set_title(label)
        ax.set_xlabel(score_name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_risk_coverage(curves: Mapping[str, tuple[Tensor, Tensor]], path: Optional[PathLike] = None,
                       aurc: Optional[Mapping[str, float]] = None) -> Any:
    """Selective risk vs coverage, one line per method (``label -> (coverage, risk)``)."""
    if not curves:
        raise ValueError("plot_risk_coverage: no curve given")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, (cov, risk) in curves.items():
        extra = f" (AURC {aurc[label]:.4f})" if aurc and label in aurc else ""
        ax.plot(torch.as_tensor(cov).numpy(), torch.as_tensor(risk).numpy(), label=f"{label}{extra}")
    ax.set_xlabel("coverage")
    ax.set_ylabel("risk (error rate)")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig
