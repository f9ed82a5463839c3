"""Uncertainty evaluation: one-call reports (metrics with bootstrap CIs, table, plots)."""

from .plots import plot_ood_scores, plot_reliability, plot_risk_coverage, save_figure
from .report import UncertaintyReport, evaluate_uncertainty, markdown_table, write_report
from .shift import evaluate_shift, mean_over_shift, plot_shift

__all__ = [
    "UncertaintyReport",
    "evaluate_shift",
    "evaluate_uncertainty",
    "mean_over_shift",
    "markdown_table",
    "plot_ood_scores",
    "plot_reliability",
    "plot_risk_coverage",
    "plot_shift",
    "save_figure",
    "write_report",
]
