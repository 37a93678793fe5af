"""Print a Derivation as text, LaTeX, Markdown or a standalone .tex document. It never recomputes.

Each step prints its title, one-line explanation, indexed formula, matrix form and explicit entries.
Names come from SymPy's LatexPrinter `symbol_names` setting (dq_{0,1} -> \\mathrm{d}q_{0,1}).
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import sympy
from sympy.printing.latex import LatexPrinter

from . import markdown
from .shorthand import abbreviator
from .notation import (DEFAULT, LINE, Notation, doc_printer, explanation_latex, explanation_markdown, explanation_text,
                       fitted, head_tagged, one_based, tex_escape, visible_width, wrap)

from ..symbolic.tensors import TENSORS, as_matrix

if TYPE_CHECKING:  # type hints only: printing never needs the derivation machinery
    from ..symbolic.derive import Derivation, Step

def printer(d: Derivation, notation: Notation = DEFAULT, max_terms: int | None = None,
            order: str | None = None) -> LatexPrinter:
    """The documents' printer for a derivation (its element symbols named as the notation says)."""
    return doc_printer(d.table, notation, max_terms, order)


def _chosen(notation: Notation, max_entries) -> str | int:
    """The entries setting: an explicit `max_entries` (None = all; the older keyword) wins over the notation."""
    if max_entries is _UNSET:
        return notation.entries
    return "all" if max_entries is None else max_entries


_UNSET = object()


def _entries(step: Step, query: int | None, entries: str | int):
    """(index, value) pairs to show, and how many were left out: the whole row of the query asked for, if any;
    else "sample" shows the first two entries and the last, an int the first N of the first query row, "all"
    everything."""
    array = step.explicit
    indices = list(itertools.product(*(range(n) for n in array.shape)))
    if query is not None and TENSORS[step.tensor].dims[0] == "n_q":  # one query row on purpose: all of it
        return [(ix, array[ix]) for ix in indices if ix[0] == query], 0
    total = len(array)
    if entries == "sample" and len(indices) > 3:
        indices = indices[:2] + indices[-1:]
    elif isinstance(entries, int) and len(indices) > entries:
        first = indices[0][0]
        indices = [ix for ix in indices if ix[0] == first][:entries]
    return [(ix, array[ix]) for ix in indices], total - len(indices)


def _element(d: Derivation, step: Step, index) -> sympy.Symbol:
    return step.symbols[index]


def equation_parts(d: Derivation, step: Step, *, query: int | None = None, max_entries=_UNSET,
                   values: dict | None = None, notation: Notation = DEFAULT):
    """The step's equations as lists of SymPy objects, each list read `a = b = c`.

    Yields (kind, parts) with kind in {"indexed", "matrix", "explicit", "omitted"}; `values` maps element
    symbols to numbers shown as a last `= value`. Indexed forms follow the notation's index base.
    """
    base = one_based if notation.index_base == 1 else (lambda e: e)
    shared = frozenset(s.tensor for s in d.steps if s.is_input)  # a layer's inputs: the same in every head

    short = abbreviator(d, step)  # named norms of the cosine score (render.shorthand); else the identity

    def shift(expr):  # a head's tensors carry the head as a superscript
        return base(head_tagged(short(expr), step.tag, shared))
    if step.indexed is not None:  # with its chain-rule line where it has one: lhs = ... = rhs
        yield "indexed", [shift(step.lhs), *(shift(x) for x in (step.chain or (step.rhs,)))]
    elif step.is_input:
        yield "indexed", [shift(step.lhs)]
    if step.matrix is not None:
        yield "matrix", [head_tagged(side, step.tag, shared) for side in (step.matrix.lhs, step.matrix.rhs)]
    if step.explicit is None:
        return
    if step.is_input:
        yield "explicit", [_input_matrix(d, step, query)]
        return
    shown, omitted = _entries(step, query, _chosen(notation, max_entries))
    for index, value in shown:
        symbol = _element(d, step, index)
        parts = [symbol, short(value)]
        if values is not None and symbol in values:
            parts.append(values[symbol])
        yield "explicit", parts
    if omitted:
        yield "omitted", [omitted]


class _Dots(sympy.Symbol):
    """The entries a long vector's printed form leaves out: named "vdots" (a column: ⋮) or "cdots" (a row: …)."""

    def _latex(self, printer):
        return "\\" + self.name

    def _sympystr(self, printer):
        return "⋮" if self.name == "vdots" else "…"


#: A vector input (a parameter table) longer than this prints its first and last entries with ⋯ between: a
#: 300-entry bias table ran 2900 pt off the PDF page and made a 5617-character text line.
VECTOR_SHOWN = 12


def _input_matrix(d: Derivation, step: Step, query: int | None) -> sympy.Eq:
    """`Q = [q_{0,0} ...]`, or the row of one query; a long vector elided (VECTOR_SHOWN)."""
    tensor = TENSORS[step.tensor]
    matrix = as_matrix(step.symbols)
    if query is not None and tensor.dims[0] == "n_q":
        row = sympy.Symbol(f"{tensor.elem}_{query}")
        return sympy.Eq(row, matrix[query, :], evaluate=False)
    if min(matrix.shape) == 1 and len(matrix) > VECTOR_SHOWN:
        entries = list(matrix)
        kept = entries[:VECTOR_SHOWN - 3] + [_Dots("vdots" if matrix.shape[1] == 1 else "cdots")] + entries[-2:]
        matrix = sympy.Matrix(kept) if matrix.shape[1] == 1 else sympy.Matrix([kept])
    return sympy.Eq(tensor.matrix_symbol(), matrix, evaluate=False)


def _further(count: int) -> str:
    return f"{count} further entr{'y' if count == 1 else 'ies'}"


def _latex_parts(d: Derivation, notation: Notation, kind: str, parts) -> list[str]:
    """Printed pieces of one display line, read `a = b = c`, long sums elided until the line fits."""
    p = printer(d, notation)
    if kind == "omitted":
        return [rf"\text{{({_further(parts[0])} omitted)}}"]
    if kind == "indexed" and len(parts) == 1:
        return [p.doprint(parts[0]) + r" \text{ (input)}"]
    if len(parts) == 1:  # an input matrix, Eq(Q, [...])
        return [p.doprint(parts[0].lhs), p.doprint(parts[0].rhs)]
    if kind == "matrix":  # as written: dP - D 1^T, not -D 1^T + dP
        return [printer(d, notation, order="none").doprint(x) for x in parts]
    if kind != "explicit":  # indexed formulas are printed whole
        return [p.doprint(x) for x in parts]
    return fitted(lambda limit: printer(d, notation, limit), parts)


def step_latex(d: Derivation, step: Step, *, notation: Notation = DEFAULT, **kw) -> list[list[str]]:
    """LaTeX display lines of one step, each a list of pieces joined by `=`."""
    return [_latex_parts(d, notation, kind, parts) for kind, parts in equation_parts(d, step, notation=notation, **kw)]


def _label(d: Derivation, notation: Notation, step: Step) -> str:
    return f"{notation.label or 'eq'}:{step.key}"


def align(lines: list[list[str]], env: str = "align*", label: str | None = None) -> str:
    """An align block, each piece after the first on its own `= ...` line when the row would be too wide;
    with a label, the first row is numbered and labelled and the others are not."""
    rows = []
    for n, parts in enumerate(lines):
        if len(parts) > 1 and sum(map(visible_width, parts)) > LINE:  # one piece per line, long ones wrapped
            pieces = [" &= " + "".join(f" \\\\\n  &\\quad {p}" if k else p for k, p in enumerate(wrap(x, LINE - 8)))
                      for x in parts[1:]]
            row = parts[0] + pieces[0] + "".join(" \\\\\n  " + t for t in pieces[1:])
        else:
            row = parts[0] + (" &= " + " = ".join(parts[1:]) if len(parts) > 1 else " &")
        if label is not None:
            row += f" \\label{{{label}}}" if n == 0 else " \\notag"
        rows.append(row)
    return f"\\begin{{{env}}}\n" + " \\\\\n".join(rows) + f"\n\\end{{{env}}}"


def _number(steps: tuple[Step, ...], step: Step) -> int:
    return steps.index(step) + 1


def _sections(d: Derivation):
    for phase, heading in (("forward", "Forward pass"), ("backward", "Backward pass")):
        steps = [s for s in d.steps if s.phase == phase]
        if steps:
            yield heading, steps


def _step_block(d: Derivation, step: Step, notation: Notation, env: str, **kw) -> str:
    label = _label(d, notation, step) if notation.numbered else None
    return align(step_latex(d, step, notation=notation, **kw), env, label)


def to_latex(d: Derivation, *, query: int | None = None, max_entries=_UNSET, notation: Notation = DEFAULT) -> str:
    """LaTeX body (sections, explanations, align blocks); needs amsmath."""
    out = []
    env = "align" if notation.numbered else "align*"
    for heading, steps in _sections(d):
        out.append(rf"{notation.section()}{{{heading}}}")
        for step in steps:
            number = "" if notation.numbered else f"{_number(d.steps, step)}. "  # numbered sections count themselves
            out.append(rf"{notation.section(1)}{{{number}{explanation_latex(step.title)}}}")
            out.append(explanation_latex(step.explanation))
            out.append(_step_block(d, step, notation, env, query=query, max_entries=max_entries))
    out.append(proofs_latex(d, notation))
    return "\n\n".join(x for x in out if x) + "\n"


def proofs_latex(d: Derivation, notation: Notation = DEFAULT) -> str:
    if not d.proofs:
        return ""
    rows = [rf"{tex_escape(p.step)} & {explanation_latex(p.claim)} & {tex_escape(p.method)} & "
            rf"{'passed' if p.passed else 'FAILED'} \\" for p in d.proofs]
    return (notation.section() + "{Proofs at the chosen sizes}\n\\begin{tabular}{p{0.12\\linewidth}p{0.5\\linewidth}"
            "p{0.2\\linewidth}l}\nstep & claim & method & result \\\\ \\hline\n" + "\n".join(rows) + "\n\\end{tabular}")


def to_tex_document(d: Derivation, *, notation: Notation = DEFAULT, **kw) -> str:
    """A standalone document that compiles with pdflatex, or (notation.standalone False) a fragment for
    \\input in a document that loads amsmath."""
    body = to_latex(d, notation=notation, **kw)
    if not notation.standalone:
        return f"% {tex_escape(d.spec.title)}: generated by symattn; needs \\usepackage{{amsmath}}\n" + body
    return "\n".join([
        r"\documentclass[10pt]{" + ("report" if notation.level == 0 else "article") + "}",
        r"\usepackage[margin=1.5cm]{geometry}",
        r"\usepackage{amsmath,amssymb}",
        r"\allowdisplaybreaks",
        rf"\title{{{tex_escape(d.spec.title)}}}",
        r"\author{generated by symattn}",
        r"\date{}",
        r"\begin{document}",
        r"\maketitle",
        body,
        r"\end{document}",
        "",
    ])


def to_markdown(d: Derivation, *, query: int | None = None, max_entries=_UNSET, notation: Notation = DEFAULT) -> str:
    """Markdown for GitHub and the site: ```math display blocks, inline math as render/markdown.py writes it
    (headings one level per section level)."""
    h = "#" * max(notation.level, 1)
    out = [f"{h} {markdown.text(d.spec.title)}"]
    for heading, steps in _sections(d):
        out.append(f"{h}# {heading}")
        for step in steps:
            out.append(f"{h}## {_number(d.steps, step)}. {explanation_markdown(step.title)}\n\n"
                       f"{explanation_markdown(step.explanation)}")
            lines = step_latex(d, step, query=query, max_entries=max_entries, notation=notation)
            out.append(markdown.display(align(lines, "aligned")))
    if d.proofs:
        rows = [[markdown.text(p.step), explanation_markdown(p.claim), markdown.text(p.method),
                 "passed" if p.passed else "FAILED"]
                for p in d.proofs]
        out.append(f"{h}# Proofs at the chosen sizes\n\n" + markdown.table(["step", "claim", "method", "result"], rows))
    return "\n\n".join(out) + "\n"


def to_text(d: Derivation, *, query: int | None = None, max_entries=_UNSET, notation: Notation = DEFAULT) -> str:
    """Plain text: one line of explanation and the equations of each step (SymPy's names, 0-based)."""
    out = [d.spec.title, "=" * len(d.spec.title)]
    for heading, steps in _sections(d):
        out.append(f"\n{heading}\n{'-' * len(heading)}")
        for step in steps:
            out.append(f"{_number(d.steps, step)}. {explanation_text(step.title)}: {explanation_text(step.explanation)}")
            for kind, parts in equation_parts(d, step, query=query, max_entries=max_entries,
                                              notation=notation.replace(index_base=0)):
                if kind == "omitted":
                    out.append(f"     ({_further(parts[0])} omitted)")
                elif len(parts) == 1 and kind == "indexed":
                    out.append(f"     {kind}: {sympy.sstr(parts[0])} (input)")
                elif len(parts) == 1:
                    out.append(f"     {kind}: {sympy.sstr(parts[0].lhs)} = {sympy.sstr(parts[0].rhs.tolist())}")
                else:  # a matrix form; the upstream step's is the scalar loss L, a definition
                    label = "definition" if kind == "matrix" and isinstance(parts[0], sympy.Symbol) else kind
                    out.append(f"     {label}: " + " = ".join(sympy.sstr(x) for x in parts))
    if d.proofs:
        out.append("\nProofs\n------")
        out.extend(proof_lines(d))
    return "\n".join(out) + "\n"


def proof_lines(d: Derivation) -> list[str]:
    """One line per proof, without its time: a document is the same bytes every time it is made (the times go
    to the progress lines)."""
    return [f"  [{'pass' if p.passed else 'FAIL'}] {p.kind:<9}{p.step:<16} {p.method:<24} {explanation_text(p.claim)}"
            + (f"\n         {p.failure}" if p.failure else "") for p in d.proofs]
