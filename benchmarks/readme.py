"""Regenerate the README's benchmark tables from the result files.

Every table in the README that a benchmark produces sits between two markers naming its file
under ``benchmarks/results/``::

    <!-- results:lm.md -->
    ... replaced by the contents of benchmarks/results/lm.md ...
    <!-- /results:lm.md -->

``python -m benchmarks readme`` (and every ``run`` without ``--quick``) rewrites those blocks,
atomically; a block whose file does not exist is left as it is and reported.
"""

from __future__ import annotations

import re
from pathlib import Path

from vbpc.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
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


def main() -> int:
    updated, missing = update_readme()
    print(f"README: {len(updated)} table(s) regenerated" + (f" ({', '.join(updated)})" if updated else ""))
    for name in missing:
        print(f"README: no result file for marker {name!r}; block left unchanged")
    return 0
