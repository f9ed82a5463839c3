r"""One-call uncertainty evaluation: predictive, metric suite with bootstrap CIs, table and plots.

:func:`evaluate_uncertainty` runs the predictive of eq. (33) (:func:`vbpc.predictive.predict`,
``n_samples`` draws, or the mean weights) over an in-domain loader and, optionally, an OOD
loader, and computes (docs/algorithms.md §9) accuracy, NLL, Brier, ECE/MCE/adaptive ECE (15 bins),
entropy, aleatoric/epistemic (MI) uncertainty, AURC and misclassification AUROC, and OOD
AUROC / AUPR-in / AUPR-out / FPR@95 — each with a percentile-bootstrap interval.
:func:`write_report` writes, for one or several methods, ``report.json`` (everything),
``report.md`` (a table) and ``reliability.png``, ``ood_scores.png``, ``risk_coverage.png``
atomically.  ``vbpc evaluate CHECKPOINT --data fashion_mnist:test --ood digits`` is the same on
a :mod:`vbpc.checkpoint` file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..io import atomic_write_text
from ..metrics import (
    bootstrap_classification,
    bootstrap_ood,
    ood_score,
    reliability_diagram,
    risk_coverage_curve,
)
from ..posterior import GaussianPosterior
from ..predictive import Predictions, predict

__all__ = ["UncertaintyReport", "evaluate_uncertainty", "markdown_table", "write_report"]

PathLike = Union[str, "os.PathLike[str]"]

#: columns of the markdown table: (metric key, header, lower is better)
TABLE = (("accuracy", "accuracy", False), ("nll", "NLL", True), ("ece", "ECE", True), ("brier", "Brier", True),
         ("ood_auroc", "OOD AUROC", False), ("ood_fpr95", "FPR@95", True), ("mi", "mean MI", None))


@dataclass
class UncertaintyReport:
    """Metrics of one model (``metrics[name] = {"value", "low", "high"}``) plus the data for plots."""

    label: str
    n_samples: int
    metrics: dict[str, dict[str, float]]
    settings: dict[str, Any] = field(default_factory=dict)
    reliability: Any = None
    risk_coverage: Optional[tuple[Tensor, Tensor]] = None
    ood_scores: Optional[tuple[Tensor, Tensor]] = None

    def value(self, name: str) -> float:
        return self.metrics[name]["value"]

    def to_json(self) -> dict[str, Any]:
        rel = self.reliability
        return {"label": self.label, "n_samples": self.n_samples, "settings": self.settings, "metrics": self.metrics,
                "reliability": None if rel is None else {
                    "edges": rel.edges.tolist(), "count": rel.count.tolist(),
                    "accuracy": [None if math.isnan(v) else v for v in rel.accuracy.tolist()],
                    "confidence": [None if math.isnan(v) else v for v in rel.confidence.tolist()]}}


def _ci(d: Mapping[str, Any], prefix: str = "") -> dict[str, dict[str, float]]:
    return {f"{prefix}{k}": {"value": v.estimate, "low": v.low, "high": v.high} for k, v in d.items()}


def evaluate_uncertainty(
    model: nn.Module,
    data: Iterable[Any],
    posterior: Optional[GaussianPosterior] = None,
    n_samples: int = 32,
    *,
    ood_data: Optional[Iterable[Any]] = None,
    label: str = "model",
    score: str = "max_prob",
    n_bins: int = 15,
    n_boot: int = 1000,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
) -> UncertaintyReport:
    """Predict on ``data`` (and ``ood_data``) and compute the §9 suite with bootstrap intervals.

    Without a posterior (e.g. an AdamW model) or with ``n_samples=0`` the mean weights are
    scored and the MI is absent.  ``score`` ranks in-domain-ness for OOD detection: ``"max_prob"``,
    ``"entropy"`` or ``"mi"``.  ``seed`` fixes the bootstrap; ``generator`` the weight draws."""
    s = n_samples if posterior is not None else 0
    if generator is None and s:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    pin: Predictions = predict(model, data, posterior, s, generator=generator, keep_samples=s > 0,
                               progress=progress, desc=f"{label}: in-domain")
    if pin.labels is None:
        raise ValueError("evaluate_uncertainty: the in-domain data must yield labels")
    metrics = _ci(bootstrap_classification(pin.log_probs, pin.labels, inputs="log_probs",
                                           sample_stack=pin.sample_log_probs, n_bins=n_bins, n_boot=n_boot,
                                           seed=seed))
    report = UncertaintyReport(label, s, metrics, {"score": score, "n_bins": n_bins, "n_boot": n_boot, "seed": seed,
                                                   "n_in": len(pin)},
                               reliability_diagram(pin.log_probs, pin.labels, n_bins, inputs="log_probs"),
                               risk_coverage_curve(pin.log_probs, pin.labels, inputs="log_probs"))
    if ood_data is not None:
        pout = predict(model, ood_data, posterior, s, generator=generator, keep_samples=s > 0, progress=progress,
                       desc=f"{label}: OOD")
        stack_in, stack_out = pin.sample_log_probs, pout.sample_log_probs
        metrics.update(_ci(bootstrap_ood(pin.log_probs, pout.log_probs, score=score, sample_stack_in=stack_in,
                                         sample_stack_out=stack_out, inputs="log_probs", n_boot=n_boot, seed=seed),
                           "ood_"))
        report.ood_scores = (ood_score(pin.log_probs, score=score, sample_stack=stack_in, inputs="log_probs"),
                             ood_score(pout.log_probs, score=score, sample_stack=stack_out, inputs="log_probs"))
        report.settings["n_out"] = len(pout)
    return report


def _fmt(m: Optional[Mapping[str, float]]) -> str:
    if m is None:
        return "—"
    v, lo, hi = m["value"], m["low"], m["high"]
    if any(math.isnan(x) for x in (v, lo, hi)):
        return f"{v:.4f}"
    return f"{v:.4f} [{lo:.4f}, {hi:.4f}]"


def markdown_table(reports: Iterable[UncertaintyReport]) -> str:
    """One row per report: accuracy, NLL, ECE, Brier, OOD AUROC, FPR@95, mean MI, with 95% CIs."""
    reports = list(reports)
    head = "| method | S | " + " | ".join(h for _, h, _ in TABLE) + " |"
    sep = "|---|---:|" + "---:|" * len(TABLE)
    rows = [f"| {r.label} | {r.n_samples} | " + " | ".join(_fmt(r.metrics.get(k)) for k, _, _ in TABLE) + " |"
            for r in reports]
    return "\n".join([head, sep, *rows]) + "\n"


def write_report(reports: Union[UncertaintyReport, Iterable[UncertaintyReport]], out_dir: PathLike) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``reliability.png`` and (where available)
    ``ood_scores.png`` and ``risk_coverage.png`` into ``out_dir``; returns the paths."""
    from .plots import plot_ood_scores, plot_reliability, plot_risk_coverage

    reports = [reports] if isinstance(reports, UncertaintyReport) else list(reports)
    if not reports:
        raise ValueError("write_report: no report given")
    labels = [r.label for r in reports]
    if len(set(labels)) != len(labels):
        raise ValueError(f"write_report: duplicate labels {labels}")
    out = Path(out_dir)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "reliability": out / "reliability.png"}
    atomic_write_text(paths["json"], json.dumps({"reports": [r.to_json() for r in reports]}, indent=1,
                                                allow_nan=True))
    atomic_write_text(paths["markdown"], markdown_table(reports))
    plot_reliability({r.label: r.reliability for r in reports}, paths["reliability"])
    with_ood = {r.label: r.ood_scores for r in reports if r.ood_scores is not None}
    if with_ood:
        paths["ood_scores"] = out / "ood_scores.png"
        plot_ood_scores(with_ood, paths["ood_scores"], score_name=reports[0].settings.get("score", "score"))
    curves = {r.label: r.risk_coverage for r in reports if r.risk_coverage is not None}
    if curves:
        paths["risk_coverage"] = out / "risk_coverage.png"
        plot_risk_coverage(curves, paths["risk_coverage"],
                           {r.label: r.value("aurc") for r in reports if "aurc" in r.metrics})
    return paths
