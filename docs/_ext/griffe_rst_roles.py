"""Griffe extension for the documentation build: render the reStructuredText roles of vbpc's
docstrings as Markdown.

vbpc's docstrings use Google-style sections together with Sphinx roles.  This extension rewrites,
before mkdocstrings renders a docstring:

* ``:math:`x``` to inline math ``$x$`` and a ``.. math::`` directive to a display block ``$$ ... $$``
  (rendered by pymdownx.arithmatex and MathJax);
* ``:class:`~vbpc.X```, ``:func:``, ``:meth:``, ``:attr:``, ``:data:``, ``:mod:``, ``:exc:``,
  ``:obj:`` to inline code (``~`` keeps the last dotted component, as in Sphinx);
* a literal-block marker ``::`` at the end of a paragraph to ``:``, the following indented block
  staying a code block;
* in an ``Args:`` section, a wrapped line that is not itself an item (``name: description``) and is
  not indented deeper than the items is indented as a continuation of the item above, so that the
  Google-style parser reads it as part of that item's description.

Only the text that mkdocstrings renders changes; the source files are not touched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|data|mod|exc|obj|const|ref):`(~?)([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")


def _role(m: re.Match[str]) -> str:
    target = m.group(3)
    if "<" in target and target.endswith(">"):  # :ref:`text <target>`
        target = target.split("<", 1)[0].strip()
    if m.group(2) == "~":
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _math_directive(text: str) -> str:
    """``.. math::`` followed by an indented block (or an argument on the same line) -> ``$$...$$``."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)\.\. math::\s*(.*)$", line)
        if not m:
            out.append(line)
            i += 1
            continue
        indent, first = m.group(1), m.group(2)
        body: list[str] = [first] if first.strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            if lines[i].strip().startswith(":label:") or lines[i].strip().startswith(":nowrap:"):
                i += 1
                continue
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        eqs = [b for b in body if b]
        math = "\n".join(eqs)
        if "\\\\" in math and "\\begin" not in math:
            env = "aligned" if "&" in math else "gathered"
            math = f"\\begin{{{env}}}" + math + f"\\end{{{env}}}"
        out += ["", f"{indent}$$", *[indent + e for e in math.split("\n")], f"{indent}$$", ""]
    return "\n".join(out)


_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|Other Parameters):\s*$")
_ITEM = re.compile(r"^\s*\*{0,2}[A-Za-z_]\w*(\s*,\s*\*{0,2}[A-Za-z_]\w*)*(\s*\([^)]*\))?\s*:(\s|$)")


def _wrap_args(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        m = _SECTION.match(lines[i])
        i += 1
        if not m:
            continue
        base = len(m.group(1))
        item_indent = None
        while i < len(lines):
            line = lines[i]
            if not line.strip():
                break  # a blank line ends the section
            indent = len(line) - len(line.lstrip())
            if indent <= base:
                break
            if item_indent is None:
                item_indent = indent
            if indent == item_indent and not _ITEM.match(line):
                line = " " * (item_indent + 4) + line.lstrip()
            out.append(line)
            i += 1
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    text = _wrap_args(text)
    text = _math_directive(text)
    text = _MATH.sub(lambda m: f"${m.group(1)}$", text)
    text = _ROLE.sub(_role, text)
    # "Example::" -> "Example:" (the indented block after it renders as code anyway)
    text = re.sub(r"(\S)::[ \t]*$", r"\1:", text, flags=re.M)
    text = re.sub(r"^[ \t]*::[ \t]*$", "", text, flags=re.M)
    return text


class RstRoles(griffe.Extension):
    """Rewrite reStructuredText roles in every docstring (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
