"""Uncertainty under dataset shift: metrics against corruption intensity, and their figure.

:func:`evaluate_shift` runs a predictor over the corruption families of :mod:`vbpc.data.shift` at
every level and returns, per family, the curves of accuracy, NLL, ECE (15 bins) and mean predictive
entropy against intensity (level 0, the clean images, first).  :func:`plot_shift` draws one metric
for several methods, one panel per family, with a band of ±1 standard deviation over seeds when
several runs are given per method.  See ``docs/evaluation.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..data.shift import SHIFT_LEVELS, corrupt
from ..metrics import accuracy, ece, nll
from ..metrics.uncertainty import entropy_of

__all__ = ["METRICS", "evaluate_shift", "plot_shift", "mean_over_shift"]

#: the metrics of each curve point
METRICS = ("accuracy", "nll", "ece", "entropy")
_CLEAN = {"rotation": 0.0, "gaussian_noise": 0.0, "contrast": 1.0, "blur": 0.0}


def evaluate_shift(predict: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, *,
                   families: Optional[Sequence[str]] = None, seed: int = 0,
                   transform: Optional[Callable[[Tensor], Tensor]] = None,
                   batch_size: int = 1000) -> dict[str, dict[str, list[float]]]:
    """Curves of :data:`METRICS` for ``predict`` (corrupted, ``transform``-ed images → class probabilities)
    on ``images`` (pixels in [0, 1]) and ``labels``, for each family in ``families`` (default: all).

    Returns ``{family: {"level": [...], "accuracy": [...], ...}}``, the clean images first (level 0, or
    contrast 1).  The noise of ``gaussian_noise`` is drawn from a generator seeded with ``seed``, so
    every method sees the same corrupted images."""
    families = list(SHIFT_LEVELS) if families is None else list(families)
    out: dict[str, dict[str, list[float]]] = {}
    for fam in families:
        levels = (_CLEAN.get(fam, 0.0), *SHIFT_LEVELS.get(fam, ()))
        curve: dict[str, list[float]] = {"level": [], **{m: [] for m in METRICS}}
        for lv in levels:
            x = corrupt(images, fam, lv, generator=torch.Generator().manual_seed(seed))
            if transform is not None:
                x = transform(x)
            probs = torch.cat([predict(x[i:i + batch_size]).detach().double().cpu()
                               for i in range(0, len(x), batch_size)])
            curve["level"].append(float(lv))
            curve["accuracy"].append(accuracy(probs, labels))
            curve["nll"].append(nll(probs, labels))
            curve["ece"].append(ece(probs, labels))
            curve["entropy"].append(float(entropy_of(probs).mean()))
        out[fam] = curve
    return out


def mean_over_shift(curves: Mapping[str, Mapping[str, Sequence[float]]], metric: str = "ece") -> float:
    """``metric`` averaged over every shifted point of every family (the clean level excluded)."""
    vals = [v for c in curves.values() for v in list(c[metric])[1:]]
    if not vals:
        raise ValueError("mean_over_shift: no shifted level in the curves")
    return sum(vals) / len(vals)


def plot_shift(runs: Mapping[str, Sequence[Mapping[str, Mapping[str, Sequence[float]]]]], metric: str,
               path: Optional[Any] = None, title: str = "") -> Any:
    """``metric`` against intensity, one panel per family, one line per method (``runs``: method →
    a list of :func:`evaluate_shift` results, one per seed), with a ±1 std band over seeds."""
    from .plots import plt, save_figure

    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: one of {METRICS}")
    if not runs:
        raise ValueError("plot_shift: no run given")
    families = list(next(iter(runs.values()))[0])
    fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.4), squeeze=False)
    for ax, fam in zip(axes[0], families):
        for method, seeds in runs.items():
            lv = list(seeds[0][fam]["level"])
            ys = torch.tensor([list(s[fam][metric]) for s in seeds], dtype=torch.float64)
            m = ys.mean(0)
            line = ax.plot(lv, m.numpy(), marker="o", ms=3, label=method)[0]
            if len(seeds) > 1:
                sd = ys.std(0)
                ax.fill_between(lv, (m - sd).numpy(), (m + sd).numpy(), color=line.get_color(), alpha=0.2)
        ax.set_title(fam.replace("_", " "))
        ax.set_xlabel("contrast kept" if fam == "contrast" else "intensity")
        if fam == "contrast":
            ax.invert_xaxis()
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.92 if title else 1))
    if path is not None:
        save_figure(fig, path)
    return fig

