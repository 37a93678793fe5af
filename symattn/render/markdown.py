"""Markdown that reads the same on GitHub (cmark-gfm) and in the site (MyST): mathematics written GitHub's way.

Display math goes in ```` ```math ```` fenced blocks: any Markdown parser keeps a fence's text verbatim (no `\\\\`
eaten, no `_` read as emphasis), GitHub typesets it, and the site reads it with MyST's `fence_as_directive`.
Inline math is `$...$` where its TeX holds nothing Markdown would read (see `inert`), else GitHub's
$`...`$ form, whose TeX sits in a code span that no Markdown parser touches (the site's extension turns it back
into `$...$` for MyST). Prose around it is escaped (`text`). tests/test_markdown_gfm.py renders symattn's
Markdown with cmark-gfm and checks that every formula comes out as it was written.
"""
from __future__ import annotations

import re
import string

#: What Markdown reads inside inline `$...$`: a backslash before ASCII punctuation (an escape: \\, \{, \,), a `_`
#: that could open emphasis (one not after a letter or digit), `*`, `~` (strikethrough), `<` (HTML), `&`
#: (entities), `|` (table cells), brackets (links), a backtick or a `$`.
_ACTIVE = re.compile(r"\\[" + re.escape(string.punctuation) + r"]|(?<![A-Za-z0-9])_|[*~<&|`$\[\]]")
#: Characters escaped in literal text.
_SPECIAL = re.compile(r"([\\`*_\[\]<>$|#~{}])")


def inert(tex: str) -> bool:
    """True when Markdown leaves `tex` alone between `$` signs (nothing in it is Markdown syntax)."""
    return not _ACTIVE.search(tex)


def math(tex: str) -> str:
    """Inline math: `$tex$` where that survives Markdown, else GitHub's $`tex`$ (a code span keeps it verbatim).
    No space right inside the delimiters (GitHub's rule)."""
    tex = tex.strip()
    return f"${tex}$" if inert(tex) else f"$`{tex}`$"


def display(tex: str) -> str:
    """Display math as a ```math fenced block."""
    return f"```math\n{tex.strip()}\n```"


def text(plain: str) -> str:
    """Literal text (a token, a title, a claim): Markdown's special characters escaped."""
    return _SPECIAL.sub(r"\\\1", plain)


def cell(markdown: str) -> str:
    """Markdown inside a table cell: a `|` (also in a code span) must be escaped or it ends the cell."""
    return re.sub(r"(?<!\\)\|", r"\\|", markdown)


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A GFM table of Markdown cells; `align` one of l, r per column (default all left)."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in (align or "l" * len(header)))
    lines = ["| " + " | ".join(cell(c) for c in header) + " |", rule]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
