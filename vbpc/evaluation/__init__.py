"""Uncertainty evaluation: one-call reports (metrics with bootstrap CIs, table, plots)."""

from .plots import plot_ood_scores, plot_reliability, plot_risk_coverage, save_figure
from .report import UncertaintyReport, evaluate_uncertainty, markdown_table, write_report

__all__ = [
    "UncertaintyReport",
    "evaluate_uncertainty",
    "markdown_table",
    "plot_ood_scores",
    "plot_reliability",
    "plot_risk_coverage",
    "save_figure",
    "write_report",
]
