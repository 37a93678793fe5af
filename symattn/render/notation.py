"""The documents' notation: one LaTeX printer for every page, and `symattn.latex(obj)`.

`Notation` holds the reader-facing choices (0- or 1-based indices, symbol names, numbered equations with labels,
the section level, a fragment or a standalone document, how many explicit entries to show). `DocPrinter` is
SymPy's `LatexPrinter` with the tensors' names (S̃ as \\tilde{S}, dS as \\mathrm{d}S) and long sums elided
(`t_1 + t_2 + \\cdots + t_n`) so display lines fit the page.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import sympy
from sympy.printing.latex import LatexPrinter

from ..errors import SpecError
from ..symbolic.chains import ONE
from ..symbolic.tensors import SIZES, TENSORS, superscripted
from . import markdown
from .texnames import check_names

#: Section commands by level: 0 = \chapter (book/report), 1 = \section, 2 = \subsection, 3 = \subsubsection.
SECTIONS = ("chapter", "section", "subsection", "subsubsection", "paragraph")
#: Width of a display line in "visible characters" (about 5 pt each at 10 pt: 1.5 cm margins leave ~510 pt).
LINE = 76


@dataclass(frozen=True)
class Notation:
    """How derivations are printed.

    index_base: 0 (q_{0,0}, sums from 0 to n-1; the code's convention) or 1 (q_{1,1}, sums from 1 to n).
    names: tensor name -> LaTeX, overriding the defaults (e.g. {"Q": "X", "St": r"\\hat{S}"}).
    numbered: numbered equations with \\label{<label>:<step>} (align instead of align*).
    label: prefix of the labels (default: the spec's file tag).
    level: section level of the forward/backward headings (1 = \\section; steps one level below).
    standalone: a whole document (True) or a fragment for \\input (False); .tex files only.
    entries: "sample" (a few explicit entries per step), "all", or a whole number (the first N of query row 0).
    """

    index_base: int = 0
    names: dict = field(default_factory=dict)
    numbered: bool = False
    label: str | None = None
    level: int = 1
    standalone: bool = True
    entries: str | int = "sample"

    def __post_init__(self):
        if self.index_base not in (0, 1) or isinstance(self.index_base, bool):
            raise SpecError(f"index base must be 0 or 1, got {self.index_base!r}")
        if isinstance(self.level, bool) or self.level not in range(len(SECTIONS) - 1):
            raise SpecError(f"section level must be 0 (chapter) .. {len(SECTIONS) - 2}, got {self.level!r}")
        if not (self.entries in ("sample", "all") or (isinstance(self.entries, int) and not isinstance(
                self.entries, bool) and self.entries >= 1)):
            raise SpecError(f"entries must be 'sample', 'all' or a whole number >= 1, got {self.entries!r}")
        check_names(self.names)
        if self.label is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9:_-]{0,40}", self.label):
            raise SpecError(f"label must be letters, digits, ':', '_' or '-' (at most 41), got {self.label!r}")

    def section(self, depth: int = 0) -> str:
        """The sectioning command `depth` levels below the headings, starred unless numbered."""
        return "\\" + SECTIONS[min(self.level + depth, len(SECTIONS) - 1)] + ("" if self.numbered else "*")

    def replace(self, **changes) -> "Notation":
        return dataclasses.replace(self, **changes)


DEFAULT = Notation()


class DocPrinter(LatexPrinter):
    """LatexPrinter with the documents' names; `max_terms` elides sums of more terms to their first ones,
    \\cdots and the last."""

    _default_settings = {**LatexPrinter._default_settings, "max_terms": None}

    def _print_Mul(self, expr):
        """A factor 1/√m (SymPy writes √2/4 for 1/√8) prints as a division by √m, as the scale reads."""
        factor, rest = expr.as_independent(*expr.free_symbols, as_Add=False)
        if rest != 1 and factor.is_positive and factor.is_irrational:
            inverse = 1 / factor**2
            if inverse.is_Integer:
                return r"\frac{%s}{\sqrt{%s}}" % (self._print(rest), inverse)
        return super()._print_Mul(expr)

    def _print_OneMatrix(self, expr):  # the layer's column of ones (1 b^T adds a bias to every row)
        return r"\mathbf{1}"

    def _print_DiagMatrix(self, expr):
        return r"\operatorname{diag}\left(%s\right)" % self._print(expr.args[0])

    def _print_Derivative(self, expr):
        """∂f/∂x as a fraction (SymPy prints ∂/∂x f, ambiguous inside a product)."""
        if len(expr.variables) != 1:
            return super()._print_Derivative(expr)
        f = self._print(expr.expr)
        f = r"\left(%s\right)" % f if isinstance(expr.expr, sympy.Add) else f
        return r"\frac{\partial %s}{\partial %s}" % (f, self._print(expr.variables[0]))

    def _print_Add(self, expr, order=None):
        limit = self._settings["max_terms"]
        terms = self._as_ordered_terms(expr, order=order)
        if terms[0].could_extract_minus_sign():  # a - b, not -b + a
            first = next((n for n, t in enumerate(terms) if not t.could_extract_minus_sign()), 0)
            terms = [terms[first]] + terms[:first] + terms[first + 1:]
        if limit is None or len(terms) <= max(limit + 1, 3):  # short sums (n - 1, i + 2) stay whole
            return self._terms(terms)
        return self._terms(terms[:limit] + [None, terms[-1]])

    def _terms(self, terms: list) -> str:
        """Terms joined by + and − as _print_Add joins them; None prints as \\cdots."""
        tex = ""
        for n, term in enumerate(terms):
            if term is None:
                tex += (" + " if n else "") + r"\cdots"
                continue
            negative = term.could_extract_minus_sign()
            tex += (" - " if negative else " + ") if n else ("-" if negative else "")
            term = -term if negative else term
            text = self._print(term)
            tex += r"\left(%s\right)" % text if self._needs_add_brackets(term) else text
        return tex


_NAMES: dict = {}  # (table, sizes of the registries, notation) -> (table, names): built once per document


def symbol_names(table, notation: Notation) -> dict:
    """Symbol -> LaTeX for tensors (matrix symbols and indexed bases) and, given a table, element symbols.
    Built once per table and notation (a document makes a printer per line; the names are thousands)."""
    key = (id(table), len(TENSORS), 0 if table is None else len(table.latex_names), notation.index_base,
           tuple(sorted(notation.names.items())))
    cached = _NAMES.get(key)
    if cached is not None and cached[0] is table:
        return cached[1]
    if len(_NAMES) >= 16:
        _NAMES.clear()
    names = _names(table, notation)
    _NAMES[key] = (table, names)
    return names


def _names(table, notation: Notation) -> dict:
    names = {ONE: r"\mathbf{1}"}
    for t in TENSORS.values():
        tex = notation.names.get(t.name, t.latex)
        names[t.label] = tex
        if len(t.dims) <= 2:
            names[t.matrix_symbol()] = tex
    if table is not None:
        names.update(table.latex_names)
        names.update(_tagged_names(notation, table.children))
        if notation.index_base == 1:
            for symbol, (tensor, index, tag) in table._where.items():
                names[symbol] = f"{TENSORS[tensor].tagged_elem(tag)}_{{{','.join(str(k + 1) for k in index)}}}"
    return names


def head_tagged(expr, tag: str, shared=frozenset()):
    """The formula of head `tag`: every tensor T printed T^{(tag)} (indexed bases and matrix symbols), except the
    `shared` ones (a layer's parameters θ, the same for every head)."""
    if not tag or not isinstance(expr, sympy.Basic):
        return expr
    bases = {b: sympy.IndexedBase(sympy.Symbol(f"{b.label}^({tag})")) for b in expr.atoms(sympy.IndexedBase)
             if b.label.name in TENSORS and b.label.name not in shared}
    mats = {m: sympy.MatrixSymbol(f"{m.name}^({tag})", *m.shape) for m in expr.atoms(sympy.MatrixSymbol)
            if m.name in TENSORS and m.name not in shared}
    return expr.xreplace({**bases, **mats})


def _tagged_names(notation: Notation, tags) -> dict:
    names = {}
    for tag in tags:
        for t in TENSORS.values():
            tex = superscripted(notation.names.get(t.name, t.latex), f"({tag})")  # \nu^{q}: no double superscript
            names[sympy.Symbol(f"{t.name}^({tag})")] = tex
            if len(t.dims) <= 2:
                names[sympy.MatrixSymbol(f"{t.name}^({tag})", *t.matrix_symbol().shape)] = tex
    return names


def doc_printer(table=None, notation: Notation = DEFAULT, max_terms: int | None = None,
                order: str | None = None) -> DocPrinter:
    return DocPrinter({"symbol_names": symbol_names(table, notation), "mat_str": "bmatrix", "mat_delim": "",
                       "max_terms": max_terms, "order": order})


# -- 1-based indices ------------------------------------------------------------------------------------------
_SIZES = frozenset(SIZES.values())


def _shift_sums(node):
    if isinstance(node, sympy.Sum):
        function, limits = _shift_sums(node.function), []
        for x, lo, hi in node.limits:
            function = function.xreplace({x: x - 1})
            limits.append((x, lo + 1, hi + 1))
        return sympy.Sum(function, *limits)
    if node.args and not isinstance(node, sympy.Indexed):
        return node.func(*(_shift_sums(arg) for arg in node.args))
    return node


def one_based(expr):
    """The same formula read with indices from 1: every index x of the 0-based formula is x − 1 of the new one,
    so sums run 1..n, Q[i, a] stays Q_{i,a}, and index arithmetic (a bias table's offset, a prefix length)
    shifts where it must."""
    if not isinstance(expr, sympy.Basic) or isinstance(expr, sympy.MatrixExpr) or not expr.free_symbols:
        return expr
    if isinstance(expr, sympy.Eq):
        return sympy.Eq(one_based(expr.lhs), one_based(expr.rhs), evaluate=False)
    e = _shift_sums(expr)
    free = {s for s in e.free_symbols if isinstance(s, sympy.Symbol) and s.is_integer and s not in _SIZES}
    e = e.xreplace({s: s - 1 for s in free})
    e = e.replace(lambda x: isinstance(x, sympy.Indexed), lambda x: x.base[tuple(k + 1 for k in x.indices)])
    e = e.replace(lambda x: isinstance(x, sympy.KroneckerDelta), lambda x: sympy.KroneckerDelta(*(a + 1 for a in x.args)))
    return e.replace(lambda x: isinstance(x, sympy.core.relational.Relational), lambda x: x.func(x.lhs + 1, x.rhs + 1))


def visible_width(tex: str) -> float:
    """A rough width of printed LaTeX in characters: commands count as one glyph, sub/superscripts as 0.7."""
    tex = re.sub(r"\\(left|right|mathrm|operatorname|displaystyle|text|frac)\b", "", tex)
    tex = re.sub(r"\\(tanh|sinh|cosh)\b", "xxxx", tex)
    tex = re.sub(r"\\(exp|log|max|min|sin|cos|cdots|sqrt)\b", "xxx", tex)
    tex = re.sub(r"\\[A-Za-z]+", "x", tex)
    small = sum(len(m) for m in re.findall(r"[_^]\{([^{}]*)\}", tex))
    bare = re.sub(r"[{}\s_^]", "", tex)
    return len(bare) - 0.3 * small


def fitted(printer_for, parts: list, width: float = LINE) -> list[str]:
    """Print `parts` (read a = b = c) eliding long sums until the line fits `width` (5, 3, 2, 1 terms kept)."""
    for limit in (None, 5, 3, 2, 1, 0):
        p = printer_for(limit)
        texts = [p.doprint(x) for x in parts]
        if sum(visible_width(t) for t in texts) + 2 * len(texts) <= width or limit == 0:
            return texts
    return texts  # pragma: no cover


def wrap(tex: str, width: float = LINE) -> list[str]:
    """A long printed expression cut at its top-level + and − (outside braces, \\left ... \\right and
    environments) into pieces of at most `width` where the terms allow; each piece after the first starts with
    its sign."""
    cuts, depth, n = [0], 0, 0
    while n < len(tex):
        if tex.startswith((r"\left", r"\begin"), n):
            depth, n = depth + 1, n + 5
            continue
        if tex.startswith(r"\end", n):
            depth, n = depth - 1, n + 4
            continue
        if tex.startswith(r"\right", n):
            depth, n = depth - 1, n + 6
            continue
        c = tex[n]
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth == 0 and tex.startswith((" + ", " - "), n) and n > 0:
            cuts.append(n)
        n += 1
    terms = [tex[a:b].strip() for a, b in zip(cuts, cuts[1:] + [len(tex)])]
    pieces = [terms[0]]
    for term in terms[1:]:
        if visible_width(pieces[-1] + term) > width:
            pieces.append(term)
        else:
            pieces[-1] += " " + term
    return pieces


def latex(obj, notation: Notation | None = None, *, table=None) -> str:
    """LaTeX of a step, an equation, an expression or a derivation, in the documents' notation.

    A Step prints its indexed formula (and matrix form, on a second line); a Derivation its LaTeX body;
    anything SymPy prints goes through the same printer (S̃ as \\tilde{S}, dS as \\mathrm{d}S)."""
    notation = notation or DEFAULT
    if hasattr(obj, "steps") and hasattr(obj, "to_latex"):  # a Derivation (duck-typed: render never imports derive)
        return obj.to_latex(notation=notation)
    shift = one_based if notation.index_base == 1 else (lambda e: e)
    p = doc_printer(table, notation)
    if all(hasattr(obj, name) for name in ("lhs", "rhs", "indexed", "matrix", "tag")):  # a Step
        lines = []
        if obj.indexed is not None:
            chain = getattr(obj, "chain", ()) or (obj.rhs,)  # the chain-rule line ends in the formula
            lines.append(" = ".join(p.doprint(shift(head_tagged(x, obj.tag))) for x in (obj.lhs, *chain)))
        if obj.matrix is not None:
            lines.append(f"{p.doprint(head_tagged(obj.matrix.lhs, obj.tag))} = "
                         f"{p.doprint(head_tagged(obj.matrix.rhs, obj.tag))}")
        return " \\\\\n".join(lines) if lines else p.doprint(shift(obj.lhs))
    if isinstance(obj, sympy.Eq):
        return f"{p.doprint(shift(obj.lhs))} = {p.doprint(shift(obj.rhs))}"
    if isinstance(obj, (sympy.Basic, sympy.MatrixBase, int, float)):
        return p.doprint(shift(obj) if isinstance(obj, sympy.Basic) else obj)
    raise TypeError(f"symattn.latex prints a Step, a Derivation, an equation or a SymPy expression, "
                    f"got {type(obj).__name__}")


# -- explanations: prose with $...$ mathematics ----------------------------------------------------------------
_UNICODE = [(r"\mathrm{d}", "d"), (r"\sqrt", "√"), (r"\sum", "Σ"), (r"\odot", "∘"), (r"\circ", "∘"),
            (r"\cdot", "·"), (r"\cdots", "⋯"), (r"\ldots", "…"), (r"\top", "ᵀ"), (r"\infty", "∞"), (r"\tau", "τ"),
            (r"\delta", "δ"), (r"\theta", "θ"), (r"\partial", "∂"), (r"\leq", "≤"), (r"\geq", "≥"), (r"\neq", "≠"),
            (r"\to", "→"),
            (r"\in", "∈"), (r"\times", "×"), (r"\tanh", "tanh"), (r"\exp", "exp"), (r"\log", "log"),
            (r"\operatorname{softmax}", "softmax"), (r"\operatorname{diag}", "diag"), (r"\operatorname{Concat}", "Concat"),
            (r"\operatorname{rowsum}", "rowsum"), (r"\mathbf{1}", "1"), (r"\quad", " "), (r"\,", " "), ("-", "−"),
            (r"\epsilon", "ε"), (r"\lVert", "‖"), (r"\rVert", "‖"), (r"\bar{S}", "S̄"), (r"\circ", "∘"),
            (r"\ell", "ℓ"), (r"\wedge", "∧"), (r"\vee", "∨"), (r"\neg", "¬"), (r"\eta", "η"), (r"\nu", "ν"),
            (r"\lfloor", "⌊"), (r"\rfloor", "⌋"), (r"\lceil", "⌈"), (r"\rceil", "⌉"), (r"\max", "max"),
            (r"\min", "min"), (r"\bmod", "mod")]
_ACCENTS = {"hat": "\u0302", "tilde": "\u0303", "bar": "\u0304"}


def tex_to_unicode(tex: str) -> str:
    """Inline LaTeX of an explanation as Unicode text (for the plain-text format and the terminal):
    \\hat{Q} -> Q̂, ^\\top -> ᵀ, \\sqrt{d_k} -> √d_k, \\frac{a}{b} -> a/b, \\left( -> (."""
    out = re.sub(r"\\(hat|tilde|bar)\{(\w)\}", lambda m: m.group(2) + _ACCENTS[m.group(1)], tex)
    out = re.sub(r"\\left\b|\s*\\right\b", "", out)  # \left( -> (, "x \right)" -> "x)"
    out = re.sub(r"\\sqrt\{([^{}]*)\}", r"√\1", out)
    out = re.sub(r"\\mathrm\{d\}", "d", out)
    out = re.sub(r"\|\{([^{}|]*)\}\|", r"|\1|", out)  # |{i - j}| (an absolute value) -> |i - j|
    out = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", out)
    out = re.sub(r"\^\{([^{}]*[\s+\-/][^{}]*)\}", r"^(\1)", out)  # 2^{-8(h+1)/H} -> 2^(-8(h+1)/H)
    out = re.sub(r"\(([\w√]+)\)/", r"\1/", out)
    out = re.sub(r"/\(([\w√]+)\)", r"/\1", out)
    for a, b in _UNICODE:
        out = out.replace(a, b)
    out = re.sub(r"\^\{?(T|ᵀ)\}?", "ᵀ", out)
    out = re.sub(r"\\mathrm\{(\w+)\}|\\text\{([^{}]*)\}", lambda m: m.group(1) or m.group(2), out)
    return out.replace("{", "").replace("}", "").replace("\\", "")


def explanation_parts(text: str) -> list[tuple[bool, str]]:
    """(is_math, piece) of an explanation; math is written between $ signs."""
    pieces = text.split("$")
    if len(pieces) % 2 == 0:  # an odd number of $ (a user's mask description): all prose
        return [(False, text)]
    return [(n % 2 == 1, piece) for n, piece in enumerate(pieces) if piece]


_TEX_SPECIALS = {"\\": r"\textbackslash{}", "_": r"\_", "^": r"\^{}", "&": r"\&", "%": r"\%",
                 "$": r"\$", "#": r"\#", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}


def tex_escape(text: str) -> str:
    """Plain text -> LaTeX text mode."""
    return "".join(_TEX_SPECIALS.get(c, c) for c in text)


def explanation_latex(text: str) -> str:
    return "".join(f"${p}$" if math else tex_escape(p) for math, p in explanation_parts(text))


def explanation_markdown(text: str) -> str:
    """Markdown: math as GitHub and MyST read it ($...$, or $`...`$ where Markdown would touch the TeX), prose
    escaped (render/markdown.py)."""
    return "".join(markdown.math(p) if math else markdown.text(p) for math, p in explanation_parts(text))


def explanation_text(text: str) -> str:
    return "".join(tex_to_unicode(p) if math else p for math, p in explanation_parts(text))
