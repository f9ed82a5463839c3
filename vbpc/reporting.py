"""Tables, JSON/JSONL files and figures of the workflows and benchmarks, in one place.

* :func:`mean_std`, :func:`pm`: the mean ± sample std over seeds and its table cell;
* :func:`markdown_table`: a markdown table (a caption line, a header, rows of cells);
* :func:`write_json`, :class:`JsonlLog`, :func:`read_jsonl`: results files, written atomically
  (JSON) or line by line and flushed (JSONL: a run killed mid-write leaves a readable log);
* :func:`subplots`, :func:`save_figure`, :func:`log_yaxis`, :func:`plot_curves`: matplotlib figures
  on the Agg backend (no display), saved as PNG atomically.

The module itself needs neither torch nor matplotlib (matplotlib loads on the first figure).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from .io import atomic_path, atomic_write_text

__all__ = ["JsonlLog", "log_yaxis", "markdown_table", "mean_std", "plot_curves", "pm", "read_jsonl", "save_figure",
           "subplots", "write_json"]

PathLike = Union[str, "os.PathLike[str]"]


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value) of ``xs``."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("mean_std of no values")
    mu = sum(xs) / len(xs)
    return mu, (math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def pm(ms: Union[tuple[float, float], Sequence[float]], digits: int = 4) -> str:
    """``"0.1234 ± 0.0012"`` from ``(mean, std)``; a sequence of values is summarised first."""
    mu, sd = ms if isinstance(ms, tuple) and len(ms) == 2 else mean_std(ms)  # type: ignore[arg-type]
    return f"{mu:.{digits}f} ± {sd:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], caption: Optional[str] = None) -> str:
    """A markdown table; ``caption`` (if any) is a line above it.  Cells are ``str()``'d."""
    header = [str(h) for h in header]
    lines = [caption, ""] if caption else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"a row of {len(cells)} cells under a header of {len(header)}: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON at ``path``, atomically (non-JSON values as ``str``)."""
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))
    return Path(path)


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """The rows of a JSONL file; blank and torn lines (a kill mid-write) are skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class JsonlLog:
    """A JSONL log, truncated on open (``append=False``), one flushed line per :meth:`write`::

        with JsonlLog(out / "metrics.jsonl") as log:
            log.write({"step": 1, "loss": 0.3})
    """

    def __init__(self, path: PathLike, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(dict(row), default=str) + "\n")
        self._f.flush()

    __call__ = write

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def subplots(*args: Any, **kwargs: Any) -> Any:
    """``matplotlib.pyplot.subplots`` on the Agg backend."""
    return _plt().subplots(*args, **kwargs)


def save_figure(fig: Any, path: PathLike, dpi: int = 120) -> None:
    """``fig.savefig`` to ``path`` atomically (PNG) and close the figure."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    _plt().close(fig)


def log_yaxis(ax: Any) -> None:
    """A log-scale y axis whose major and minor ticks read as plain numbers (``12``, not ``1.2\\times10^1``)."""
    from matplotlib.ticker import FormatStrFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))


def plot_curves(panels: Sequence[tuple[Mapping[str, tuple[Sequence[float], Sequence[float]]], str, str]],
                path: PathLike, *, marker: Optional[str] = None, title: Optional[str] = None) -> None:
    """One panel per ``(curves, xlabel, ylabel)``, ``curves`` mapping a label to ``(xs, ys)``; a legend
    where a panel has more than one curve.  Panels without curves are dropped (none: nothing written)."""
    panels = [p for p in panels if p[0]]
    if not panels:
        return
    fig, axes = subplots(1, len(panels), figsize=(4.5 * len(panels) + 0.5, 3.2), squeeze=False)
    for ax, (curves, xlabel, ylabel) in zip(axes[0], panels):
        for label, (xs, ys) in curves.items():
            ax.plot(list(xs), list(ys), label=label, marker=marker, alpha=0.85)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
