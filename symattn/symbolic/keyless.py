"""Queries that see no key, and the masked_rows policy the derivation follows for them.

A mask (a window or prefix with n_q > n_k, a user's mask_mod) can leave query i with no visible key. Its softmax
is then 0/0; the policy decides, as in the numeric API: "zero" gives weights 0 (PyTorch), so o_i = 0 and every
gradient through row i is 0; "uniform" gives 1/n_k over all keys (JAX), weights that do not depend on the scores,
so o_i is the mean of the values, dV gets 1/n_k of do_i from every key and row i's Jacobian, dS and dq_i are 0.
"nan" has no derivation (NaN is not a value to differentiate): such a spec is refused.
"""
from __future__ import annotations

import functools

import sympy

from ..errors import SpecError
from .tensors import SIZES, i, l


#: above this many (query, key) pairs the rows are not looked for (an indexed-only derivation at huge sizes)
LISTED = 1 << 30


def keyless_rows(spec) -> tuple[int, ...] | None:
    """The queries that see no key at the spec's sizes: () without a mask or with the causal one (top-left: every
    query sees key 0); None beyond LISTED pairs (the indexed forms then keep the policy's branch). The mask's
    predicate runs over NumPy index grids, a block of rows at a time (pair by pair for a mod that takes ints only);
    a derivation asks several times, so the answer is kept per spec."""
    try:
        return _keyless_kept(spec)
    except TypeError:  # a spec holding something unhashable
        return _keyless(spec)


def _keyless(spec) -> tuple[int, ...] | None:
    mask = spec.mask_object
    if mask is None or spec.causal:
        return ()
    if spec.n_q * spec.n_k > LISTED:
        return None
    import numpy as np
    rows, block, kv = [], max(1, (1 << 20) // spec.n_k), np.arange(spec.n_k).reshape(1, -1)
    for start in range(0, spec.n_q, block):
        q = np.arange(start, min(spec.n_q, start + block)).reshape(-1, 1)
        try:
            seen = np.broadcast_to(np.asarray(mask.mod(0, 0, q, kv), dtype=bool), (len(q), spec.n_k))
        except Exception:
            seen = np.array([[mask.visible(int(x), y) for y in range(spec.n_k)] for x in q.ravel()], dtype=bool)
        rows.extend(int(x) for x in q.ravel()[~seen.any(axis=1)])
    return tuple(rows)


_keyless_kept = functools.lru_cache(maxsize=32)(_keyless)


def uniform_branch(spec) -> bool:
    """masked_rows='uniform' where a query may see no key: P, the Jacobian and dS take a constant branch."""
    return spec.masked_rows == "uniform" and keyless_rows(spec) != ()


def check_policy(spec) -> None:
    """Refuse masked_rows='nan' where some query sees no key: its rows would be NaN, which no step derives."""
    rows = keyless_rows(spec)
    if rows != () and spec.masked_rows == "nan":
        raise SpecError(f"masked_rows 'nan': under mask {spec.mask_object.text!r} {_sees_none(rows)}, and a NaN row "
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
        where = sympy.Contains(i, _as_set(rows), evaluate=False)
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
    policy = (r"with masked_rows='uniform' (as in JAX) such a query's weights are $1/n_k$ at every key (the first "
              r"branch below). They do not depend on the scores, so its output is the mean of the values, its rows of "
              r"the Jacobian and of $\mathrm{d}S$ are 0 and so is its query gradient; $\mathrm{d}V$ still gets "
              r"$\mathrm{d}o_i / n_k$ at every key." if spec.masked_rows == "uniform" else
              r"with masked_rows='zero' (PyTorch's policy) such a query's weights are 0, so its output and every "
              r"gradient through it are 0.")
    return f" Here {_sees_none(rows)}, and a softmax over no key would be $0/0$: {policy}"


def _runs(rows: tuple[int, ...]) -> list[tuple[int, int]]:
    """Consecutive rows as (first, last) runs."""
    runs = []
    for x in rows:
        if runs and x == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], x)
        else:
            runs.append((x, x))
    return runs


def _as_set(rows: tuple[int, ...]) -> sympy.Set:
    """The rows as a set a reader can take in: runs of three or more as ranges {a, ..., b}."""
    parts = [sympy.Range(a, b + 1) if b - a >= 2 else sympy.FiniteSet(*range(a, b + 1)) for a, b in _runs(rows)]
    return sympy.Union(*parts, evaluate=False) if len(parts) > 1 else parts[0]


def _sees_none(rows: tuple[int, ...] | None) -> str:
    if rows is None:
        return "a query may see no key"
    listed = ", ".join(str(a) if a == b else f"{a} to {b}" for a, b in _runs(rows))
    if len(rows) == 1:
        return f"query {listed} (numbered from 0) sees no key"
    return f"queries {listed} ({f'{len(rows)} of them, ' if len(rows) > 2 else ''}numbered from 0) see no key"
