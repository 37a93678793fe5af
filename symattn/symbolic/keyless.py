"""Queries that see no key, and the masked_rows policy the derivation follows for them.

A mask (a window or prefix with n_q > n_k, a user's mask_mod) can leave query i with no visible key. Its softmax
is then 0/0; the policy decides, as in the numeric API: "zero" gives weights 0 (PyTorch), so o_i = 0 and every
gradient through row i is 0; "uniform" gives 1/n_k over all keys (JAX), weights that do not depend on the scores,
so o_i is the mean of the values, dV gets 1/n_k of do_i from every key and row i's Jacobian, dS and dq_i are 0.
"nan" has no derivation (NaN is not a value to differentiate): such a spec is refused.
"""
from __future__ import annotations

import sympy

from ..errors import SpecError
from .tensors import SIZES, i, l


#: above this many (query, key) pairs the rows are not listed one by one (an indexed-only derivation at large sizes)
LISTED = 1 << 16


def keyless_rows(spec) -> tuple[int, ...] | None:
    """The queries that see no key at the spec's sizes: () without a mask or with the causal one (top-left: every
    query sees key 0); None when there are too many pairs to look (the indexed forms then keep the policy's branch)."""
    if spec.mask_object is None or spec.causal:
        return ()
    if spec.n_q * spec.n_k > LISTED:
        return None
    return tuple(x for x in range(spec.n_q) if not any(spec.visible(x, y) for y in range(spec.n_k)))


def check_policy(spec) -> None:
    """Refuse masked_rows='nan' where some query sees no key: its rows would be NaN, which no step derives."""
    rows = keyless_rows(spec)
    if rows != () and spec.masked_rows == "nan":
        raise SpecError(f"AttentionSpec.masked_rows 'nan': under mask {spec.mask!r} {_sees_none(rows)}, and a NaN row "
                        f"has no derivation; derive with masked_rows 'zero' or 'uniform' (the numeric API takes "
                        f"masked_rows='nan')")


def constant_rows(expr: sympy.Expr, spec, value) -> sympy.Expr:
    """`expr` with `value` where query i sees no key, under masked_rows='uniform' (p_ij = 1/n_k there; its Jacobian
    and dS are 0): i in the listed rows, or (too many pairs to list) no visible key among the n_k."""
    rows = keyless_rows(spec)
    if spec.masked_rows != "uniform" or rows == ():
        return expr
    if rows is None:
        keys = sympy.Sum(sympy.Piecewise((1, spec.mask_object.condition(i, l)), (0, True)), (l, 0, SIZES["n_k"] - 1))
        where = sympy.Eq(keys, 0)
    else:
        where = sympy.Contains(i, sympy.FiniteSet(*rows), evaluate=False)
    branches = expr.args if isinstance(expr, sympy.Piecewise) else ((expr, True),)
    return sympy.Piecewise((value, where), *branches)


def uniform_rows(spec) -> tuple[int, ...]:
    """The queries with the constant weights 1/n_k (masked_rows='uniform', no visible key), at explicit sizes."""
    return (keyless_rows(spec) or ()) if spec.masked_rows == "uniform" else ()


def policy_text(spec) -> str:
    """One sentence for the softmax step when some query sees no key; '' otherwise."""
    rows = keyless_rows(spec)
    if rows == ():
        return ""
    if spec.masked_rows == "uniform":
        return (f" Here {_sees_none(rows)}, so its softmax would be $0/0$: with masked_rows='uniform' (as in JAX) "
                f"such a query's weights are $1/n_k$ at every key (the first branch below). They "
                f"do not depend on the scores, so its output is the mean of the values, its rows of the Jacobian and "
                f"of $\\mathrm{{d}}S$ are 0 and so is its query gradient; $\\mathrm{{d}}V$ still gets "
                f"$\\mathrm{{d}}o_i / n_k$ at every key.")
    return (f" Here {_sees_none(rows)}, so its softmax would be $0/0$: with masked_rows='zero' (PyTorch's policy) "
            f"such a query's weights are 0, so its output and every gradient through it are 0.")


def _sees_none(rows: tuple[int, ...] | None) -> str:
    if rows is None:
        return "a query may see no key"
    listed = ", ".join(map(str, rows))
    return f"query {listed} sees no key" if len(rows) == 1 else f"queries {listed} see no key"
