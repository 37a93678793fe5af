"""Print a Derivation as text, LaTeX, Markdown or a standalone .tex document. It never recomputes.

Each step prints its title, one-line explanation, indexed formula, matrix form and explicit entries.
Names come from SymPy's LatexPrinter `symbol_names` setting (dq_{0,1} -> \\mathrm{d}q_{0,1}).
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import sympy
from sympy.printing.latex import LatexPrinter

from ..symbolic.tensors import TENSORS

if TYPE_CHECKING:  # type hints only: printing never needs the derivation machinery
    from ..symbolic.derive import Derivation, Step

#: Steps with more explicit entries than this print only query row `0` unless asked otherwise.
MAX_ENTRIES = 64

_TEX_SPECIALS = {"\\": r"\textbackslash{}", "_": r"\_", "^": r"\^{}", "&": r"\&", "%": r"\%",
                 "$": r"\$", "#": r"\#", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "<": r"\textless{}", ">": r"\textgreater{}"}


def tex_escape(text: str) -> str:
    """Plain text -> LaTeX text mode."""
    return "".join(_TEX_SPECIALS.get(c, c) for c in text)


def printer(d: Derivation) -> LatexPrinter:
    names = {t.label: t.latex for t in TENSORS.values()}
    names.update({t.matrix_symbol(): t.latex for t in TENSORS.values() if len(t.dims) <= 2})  # matrix forms
    if d.table is not None:
        names.update(d.table.latex_names)
    return LatexPrinter({"symbol_names": names, "mat_str": "bmatrix", "mat_delim": ""})


def _entries(step: Step, query: int | None, max_entries: int | None):
    """(index, value) pairs to show, and how many were left out."""
    array = step.explicit
    indices = list(itertools.product(*(range(n) for n in array.shape)))
    by_query = TENSORS[step.tensor].dims[0] == "n_q"
    if query is not None and by_query:  # one query row on purpose: nothing counts as omitted
        return [(ix, array[ix]) for ix in indices if ix[0] == query], 0
    elif max_entries is not None and len(indices) > max_entries:
        first = indices[0][0]
        indices = [ix for ix in indices if ix[0] == first][:max_entries]
    return [(ix, array[ix]) for ix in indices], len(array) - len(indices)


def _element(d: Derivation, step: Step, index) -> sympy.Symbol:
    return step.symbols[index]


def equation_parts(d: Derivation, step: Step, *, query: int | None = None,
                   max_entries: int | None = MAX_ENTRIES, values: dict | None = None):
    """The step's equations as lists of SymPy objects, each list read `a = b = c`.

    Yields (kind, parts) with kind in {"indexed", "matrix", "explicit", "omitted"}; `values` maps element
    symbols to numbers shown as a last `= value`.
    """
    if step.indexed is not None:
        yield "indexed", [step.lhs, step.rhs]
    elif step.is_input:
        yield "indexed", [step.lhs]
    if step.matrix is not None:
        yield "matrix", [step.matrix.lhs, step.matrix.rhs]
    if step.explicit is None:
        return
    if step.is_input:
        yield "explicit", [_input_matrix(d, step, query)]
        return
    shown, omitted = _entries(step, query, max_entries)
    for index, value in shown:
        symbol = _element(d, step, index)
        parts = [symbol, value]
        if values is not None and symbol in values:
            parts.append(values[symbol])
        yield "explicit", parts
    if omitted:
        yield "omitted", [omitted]


def _input_matrix(d: Derivation, step: Step, query: int | None) -> sympy.Eq:
    """`Q = [q_{0,0} ...]`, or the row of one query."""
    tensor = TENSORS[step.tensor]
    matrix = _as_matrix(step.symbols)
    if query is not None and tensor.dims[0] == "n_q":
        row = sympy.Symbol(f"{tensor.elem}_{query}")
        return sympy.Eq(row, matrix[query, :], evaluate=False)
    return sympy.Eq(tensor.matrix_symbol(), matrix, evaluate=False)


def _as_matrix(array) -> sympy.ImmutableMatrix:
    return sympy.ImmutableMatrix(array.tolist() if array.rank() == 2 else [[x] for x in array])


def _latex_parts(p: LatexPrinter, kind: str, parts) -> list[str]:
    """Printed pieces of one display line, read `a = b = c`."""
    if kind == "omitted":
        return [rf"\text{{({parts[0]} further entries omitted)}}"]
    if kind == "indexed" and len(parts) == 1:
        return [p.doprint(parts[0]) + r" \text{ (input)}"]
    if len(parts) == 1:  # an input matrix, Eq(Q, [...])
        return [p.doprint(parts[0].lhs), p.doprint(parts[0].rhs)]
    return [p.doprint(x) for x in parts]


def step_latex(d: Derivation, step: Step, **kw) -> list[list[str]]:
    """LaTeX display lines of one step, each a list of pieces joined by `=`."""
    p = printer(d)
    return [_latex_parts(p, kind, parts) for kind, parts in equation_parts(d, step, **kw)]


def _align(lines: list[list[str]], env: str = "align*") -> str:
    rows = [parts[0] + (" &= " + " = ".join(parts[1:]) if len(parts) > 1 else " &") for parts in lines]
    return f"\\begin{{{env}}}\n" + " \\\\\n".join(rows) + f"\n\\end{{{env}}}"


def _number(steps: tuple[Step, ...], step: Step) -> int:
    return steps.index(step) + 1


def _sections(d: Derivation):
    for phase, heading in (("forward", "Forward pass"), ("backward", "Backward pass")):
        steps = [s for s in d.steps if s.phase == phase]
        if steps:
            yield heading, steps


def to_latex(d: Derivation, *, query: int | None = None, max_entries: int | None = MAX_ENTRIES) -> str:
    """LaTeX body (sections, explanations, align* blocks); needs amsmath."""
    out = []
    for heading, steps in _sections(d):
        out.append(rf"\section*{{{heading}}}")
        for step in steps:
            out.append(rf"\subsection*{{{_number(d.steps, step)}. {tex_escape(step.title)}}}")
            out.append(tex_escape(step.explanation))
            out.append(_align(step_latex(d, step, query=query, max_entries=max_entries)))
    out.append(proofs_latex(d))
    return "\n\n".join(x for x in out if x) + "\n"


def proofs_latex(d: Derivation) -> str:
    if not d.proofs:
        return ""
    rows = [rf"{tex_escape(p.step)} & {tex_escape(p.claim)} & {tex_escape(p.method)} & "
            rf"{'passed' if p.passed else 'FAILED'} \\" for p in d.proofs]
    return ("\\section*{Proofs at the chosen sizes}\n\\begin{tabular}{p{0.12\\linewidth}p{0.5\\linewidth}"
            "p{0.2\\linewidth}l}\nstep & claim & method & result \\\\ \\hline\n" + "\n".join(rows) + "\n\\end{tabular}")


def to_tex_document(d: Derivation, **kw) -> str:
    """A standalone document that compiles with pdflatex."""
    return "\n".join([
        r"\documentclass[10pt]{article}",
        r"\usepackage[margin=1.5cm]{geometry}",
        r"\usepackage{amsmath,amssymb}",
        r"\allowdisplaybreaks",
        rf"\title{{{tex_escape(d.spec.title)}}}",
        r"\author{generated by symattn}",
        r"\date{}",
        r"\begin{document}",
        r"\maketitle",
        to_latex(d, **kw),
        r"\end{document}",
        "",
    ])


def to_markdown(d: Derivation, *, query: int | None = None, max_entries: int | None = MAX_ENTRIES) -> str:
    """Markdown with $$...$$ display math, for documentation pages."""
    out = [f"# {d.spec.title}"]
    for heading, steps in _sections(d):
        out.append(f"## {heading}")
        for step in steps:
            out.append(f"### {_number(d.steps, step)}. {step.title}\n\n{step.explanation}")
            out.append(f"$$\n{_align(step_latex(d, step, query=query, max_entries=max_entries), 'aligned')}\n$$")
    if d.proofs:
        out.append("## Proofs at the chosen sizes\n\n| step | claim | method | result |\n|---|---|---|---|\n" + "\n".join(
            f"| {p.step} | {p.claim} | {p.method} | {'passed' if p.passed else 'FAILED'} |" for p in d.proofs))
    return "\n\n".join(out) + "\n"


def to_text(d: Derivation, *, query: int | None = None, max_entries: int | None = MAX_ENTRIES) -> str:
    """Plain text: one line of explanation and the equations of each step."""
    out = [d.spec.title, "=" * len(d.spec.title)]
    for heading, steps in _sections(d):
        out.append(f"\n{heading}\n{'-' * len(heading)}")
        for step in steps:
            out.append(f"{_number(d.steps, step)}. {step.title}: {step.explanation}")
            for kind, parts in equation_parts(d, step, query=query, max_entries=max_entries):
                if kind == "omitted":
                    out.append(f"     ({parts[0]} further entries omitted)")
                elif len(parts) == 1 and kind == "indexed":
                    out.append(f"     {kind}: {sympy.sstr(parts[0])} (input)")
                elif len(parts) == 1:
                    out.append(f"     {kind}: {sympy.sstr(parts[0].lhs)} = {sympy.sstr(parts[0].rhs.tolist())}")
                else:
                    out.append(f"     {kind}: " + " = ".join(sympy.sstr(x) for x in parts))
    if d.proofs:
        out.append("\nProofs\n------")
        out.extend(proof_lines(d))
    return "\n".join(out) + "\n"


def proof_lines(d: Derivation) -> list[str]:
    return [f"  [{'pass' if p.passed else 'FAIL'}] {p.kind:<9}{p.step:<16} {p.method:<24} {p.seconds:6.2f} s  {p.claim}"
            + (f"\n         {p.failure}" if p.failure else "") for p in d.proofs]
