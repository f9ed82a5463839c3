"""Regenerate the benchmark tables of the README and of the documentation from the result files.

Every table that a benchmark produces sits between two markers naming its file under
``benchmarks/results/``::

    <!-- results:lm.md -->
    ... replaced by the contents of benchmarks/results/lm.md ...
    <!-- /results:lm.md -->

``python -m benchmarks readme`` (and every ``run`` without ``--quick``) rewrites those blocks in
``README.md`` (a few headline tables) and in ``docs/benchmarks.md`` (every result table),
atomically; a block whose file does not exist is left as it is and reported.  It also copies every
figure of ``benchmarks/results/`` (``*.png``, outside ``quick/`` and the ``*_runs/`` folders) to
``docs/figures/`` under the same relative path, so that the documentation site can show them, and
fills the ``<!-- figures -->`` block of ``docs/benchmarks.md`` with a link to each.  Files are
written only when their content changes, so a second run changes nothing.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (no import of ``vbpc``, so the
    pages can be regenerated whatever state the package is in)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FIGURES_MARKER = re.compile(r"(<!-- figures -->\n)(?P<body>.*?)(<!-- /figures -->)", re.S)
MARKER = re.compile(r"(<!-- results:(?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def blocks(text: str) -> list[str]:
    """The result files named by the markers of ``text``, in order."""
    return [m["name"] for m in MARKER.finditer(text)]


def update_readme(readme: Path = ROOT / "README.md", results: Path = ROOT / "benchmarks" / "results",
                  ) -> tuple[list[str], list[str]]:
    """Replace every marked block of ``readme`` by its result file; returns ``(updated, missing)``.
    Raises ValueError for a name that leaves the results folder."""
    text = readme.read_text(encoding="utf-8")
    updated: list[str] = []
    missing: list[str] = []

    def fill(m: re.Match[str]) -> str:
        name = m["name"]
        path = (results / name).resolve()
        if not path.is_relative_to(results.resolve()):
            raise ValueError(f"README marker {name!r} points outside {results}")
        if not path.is_file():
            missing.append(name)
            return m.group(0)
        body = path.read_text(encoding="utf-8").rstrip("\n") + "\n"
        if body != m["body"]:
            updated.append(name)
        return m.group(1) + body + m.group(4)

    new = MARKER.sub(fill, text)
    if new != text:
        atomic_write_text(readme, new)
    return updated, missing


def result_files(results: Path = ROOT / "benchmarks" / "results", suffix: str = ".md") -> list[str]:
    """The result files (``suffix``) under ``results``, relative and sorted, without the ``--quick``
    results and the per-run folders (``*_runs/``)."""
    out = []
    for path in sorted(results.rglob(f"*{suffix}")):
        rel = path.relative_to(results)
        if rel.parts[0] == "quick" or any(part.endswith("_runs") for part in rel.parts[:-1]):
            continue
        out.append(rel.as_posix())
    return out


def copy_figures(results: Path = ROOT / "benchmarks" / "results", dest: Path = DOCS / "figures") -> list[str]:
    """Copy every figure of ``results`` to ``dest`` (same relative path) unless an identical copy is
    already there; returns the figures that were (re)written."""
    written = []
    for rel in result_files(results, ".png"):
        src, dst = results / rel, dest / rel
        if dst.is_file() and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
        written.append(rel)
    return written


def figures_block(results: Path = ROOT / "benchmarks" / "results") -> str:
    """The body of the ``<!-- figures -->`` block: one link per figure, grouped by folder."""
    lines = []
    for rel in result_files(results, ".png"):
        lines.append(f"* [{rel}](figures/{rel})")
    return "\n".join(lines) + "\n"


def update_docs(page: Path = DOCS / "benchmarks.md", results: Path = ROOT / "benchmarks" / "results",
                figures: Path = DOCS / "figures") -> tuple[list[str], list[str], list[str]]:
    """Fill the result blocks and the figure list of the documentation's benchmarks page and copy
    the figures; returns ``(updated tables, missing result files, result files not on the page)``."""
    copy_figures(results, figures)
    updated, missing = update_readme(page, results)
    text = page.read_text(encoding="utf-8")
    new = FIGURES_MARKER.sub(lambda m: m.group(1) + figures_block(results) + m.group(3), text)
    if new != text:
        atomic_write_text(page, new)
    absent = sorted(set(result_files(results)) - set(blocks(new)))
    return updated, missing, absent


def main() -> int:
    updated, missing = update_readme()
    print(f"README: {len(updated)} table(s) regenerated" + (f" ({', '.join(updated)})" if updated else ""))
    for name in missing:
        print(f"README: no result file for marker {name!r}; block left unchanged")
    page = DOCS / "benchmarks.md"
    if page.is_file():
        updated, missing, absent = update_docs(page)
        print(f"docs/benchmarks.md: {len(updated)} table(s) regenerated"
              + (f" ({', '.join(updated)})" if updated else ""))
        for name in missing:
            print(f"docs/benchmarks.md: no result file for marker {name!r}; block left unchanged")
        for name in absent:
            print(f"docs/benchmarks.md: result file {name!r} has no block on the page")
    return 0
