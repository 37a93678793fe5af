"""A user's mask_mod(b, h, q_idx, kv_idx) traced (masks.traced makes it a Mask): its condition from SymPy symbols,
checked against the function on an index grid (a term tracing lost, such as b == 1 on symbols, shows there), its
comparisons cleared of fractions so that the kernels and the check compare integers exactly, and described in
mathematics.
"""
from __future__ import annotations

import itertools

import numpy as np

from ..errors import SpecError


def trace(mod, name: str | None = None) -> tuple[str, str]:
    """(text, description) of a user's mask_mod (masks.traced makes the Mask): its condition, traced with SymPy
    symbols and checked against the function, names it (a short hash) and is described in mathematics."""
    import hashlib

    import sympy
    b, h, q, kv = sympy.symbols("b h q_idx kv_idx", integer=True)
    try:
        condition = mod(b, h, q, kv)
        if not isinstance(condition, (sympy.logic.boolalg.Boolean, bool)):
            raise TypeError(f"it returned {type(condition).__name__}, not a condition")
    except Exception as e:  # whatever the function does with symbols it cannot
        raise SpecError(f"cannot trace mask_mod {getattr(mod, '__name__', mod)!r} with symbolic indices: {e}; "
                        f"write it with comparisons (<, <=, ==, ...), &, | and ~ on its arguments") from None
    wrong = _disagreement(mod, condition, (b, h, q, kv))
    if wrong is not None:
        raise SpecError(f"mask_mod {getattr(mod, '__name__', mod)!r} traces to {condition}, which disagrees with "
                        f"its value at (b, h, q_idx, kv_idx) = {wrong}; with symbols, == compares expressions: "
                        f"write symattn.mods.ops.eq(a, b) (or ops.ne) for (in)equality")
    text = name or "user_" + hashlib.sha256(sympy.srepr(condition).encode()).hexdigest()[:8]
    return text, _user_description(condition, q, kv)


#: Where a traced mask is checked against its function: b < 8, h < 64, q_idx, kv_idx < 16 (a condition on b or h
#: that tracing lost, such as b == 1 or h == 5, shows there; the kernels read only the traced condition). 131072
#: points: about 1 ms with NumPy.
CHECK_GRID = (8, 64, 16, 16)


def integer_relation(rel):
    """`rel` with its rational coefficients cleared, when both sides are sums of rational multiples of integer
    terms (indices, floor, Mod): each side times the least common denominator (positive, so the relation holds).
    SymPy writes floor((i - j)/5) >= -1 as i/5 - j/5 >= -1; cleared, i - j >= -5 compares integers, exactly (the
    kernels and the trace check). None where there is nothing to clear or a term is not of that form."""
    import sympy
    if not isinstance(rel, sympy.core.relational.Relational):
        return None
    diff = sympy.expand(rel.lhs - rel.rhs)
    if diff.is_integer or not diff.free_symbols or not all(x.is_integer for x in diff.free_symbols):
        return None
    terms = sympy.Add.make_args(diff)
    m = sympy.ilcm(*(sympy.fraction(t.as_coeff_Mul()[0])[1] for t in terms))
    if m == 1 or not all((m * t).is_integer for t in terms):
        return None
    return rel.func(sympy.expand(m * rel.lhs), sympy.expand(m * rel.rhs))


def _cleared(condition):
    """`condition` with every comparison's coefficients cleared (integer_relation)."""
    import sympy
    return sympy.sympify(condition).replace(lambda e: integer_relation(e) is not None, integer_relation)


def _disagreement(mod, condition, symbols) -> tuple | None:
    """The first (b, h, q_idx, kv_idx) of CHECK_GRID where the traced condition and the function differ, or None:
    both evaluated on NumPy index grids (the function as the reference evaluates it); a function that takes no
    arrays is checked at b = h = 0 with ints."""
    import sympy

    from .usermods import lambdified
    grids = np.ix_(*(np.arange(n) for n in CHECK_GRID))
    try:
        want = np.broadcast_to(np.asarray(mod(*grids), dtype=bool), CHECK_GRID)
        got = np.broadcast_to(np.asarray(lambdified(symbols, _cleared(condition))(*grids), dtype=bool),
                              CHECK_GRID)  # integers compared and divided as integers, exactly
    except Exception:  # noqa: BLE001  (a function of ints only, or a condition NumPy cannot evaluate)
        expr = sympy.sympify(condition)
        for qi, kj in itertools.product(range(CHECK_GRID[2]), repeat=2):
            ints = (np.int64(0), np.int64(0), np.int64(qi), np.int64(kj))  # (~ on Python ints: ~True is -2)
            if bool(expr.subs(dict(zip(symbols, (0, 0, qi, kj))))) != bool(mod(*ints)):
                return 0, 0, qi, kj
        return None
    wrong = np.argwhere(want != got)
    return tuple(int(x) for x in wrong[0]) if len(wrong) else None


def _user_description(condition, q, kv) -> str:
    """The condition as mathematics, the query index written i and the key index j as the derivation writes them;
    its text, outside math, when SymPy cannot print it (symbolic/mathtext.py)."""
    import sympy

    from .mathtext import inline_math, prose
    i, j = sympy.symbols("i j", integer=True)
    tex = inline_math(sympy.sympify(condition).xreplace({q: i, kv: j}), {})
    return f"user mask, key $j$ visible to query $i$ where ${tex}$" if tex else f"user mask: {prose(condition)}"
