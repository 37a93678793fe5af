"""Descriptions written as mathematics: a traced expression as inline `$...$` LaTeX for an explanation (typeset in
LaTeX and Markdown, Unicode in text by render/notation.py), guarded so that an expression SymPy cannot print
still gives a description (its text, as prose), never a traceback. Only traced SymPy expressions are printed;
user text is never parsed."""
from __future__ import annotations

import sympy
from sympy.printing.latex import LatexPrinter


class InlinePrinter(LatexPrinter):
    """LaTeX that reads on one line of prose: a choice as (a if c, else b), not a cases environment; a table
    entry as T[k]."""

    def _print_Piecewise(self, expr):
        branches = [rf"{self._print(e)}\text{{ if }}{self._print(c)}" for e, c in expr.args if c is not sympy.true]
        last, condition = expr.args[-1]
        otherwise = [rf"\text{{else }}{self._print(last)}"] if condition is sympy.true else []
        return r"\left(" + r"\text{, }".join(branches + otherwise) + r"\right)"

    def _print_Indexed(self, expr):
        return f"{self._print(expr.base)}[{', '.join(self._print(k) for k in expr.indices)}]"


def inline_math(expr, names: dict) -> str | None:
    """`expr` as LaTeX for `$...$`, symbols printed by `names` (symbol -> LaTeX); None when SymPy's printer
    refuses it or its LaTeX would not stay between two $ signs."""
    try:
        tex = InlinePrinter({"symbol_names": names}).doprint(expr)
    except Exception:  # noqa: BLE001 - any printer failure: the caller falls back to prose
        return None
    return tex if tex and "$" not in tex else None


def prose(obj) -> str:
    """Text shown outside mathematics: str(obj) without $ (which would open math), or a placeholder."""
    try:
        return str(obj).replace("$", "")
    except Exception:  # noqa: BLE001
        return "an expression symattn cannot print"


def user_mod_description(expr, symbols, tables, label: str) -> str:
    """A traced score mod's description: `f(s) = <its LaTeX>` in the derivation's letters (s the score, i the query
    index, j the key index, a table t as θ_t), or its text outside math when SymPy cannot print it."""
    score, _, _, q_idx, kv_idx = symbols
    names = {score: "s", q_idx: "i", kv_idx: "j",
             **{sympy.Symbol(f"table_{t.name}"): rf"\theta_{{\mathrm{{{t.name}}}}}" for t in tables}}
    tex = inline_math(expr, names)
    formula = f"$f(s) = {tex}$" if tex else f"f(score) = {prose(expr)}"
    return f"the user's score_mod {prose(label)}, {formula}"
