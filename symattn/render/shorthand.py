"""Named sub-expressions in print: what a reader follows instead of one expansion repeated in every term.

The additive score's tanh argument b_r + (q_i W_a)_r + (k_j U_a)_r is elided to "⋯ + q_{0,1} w_{1,0}" in long
entries, hiding the key it depends on; in print it is η_{i,j,r}, defined in the score's explanation.

The cosine score divides by clamped norms, and SymPy's derivatives repeat max(1/10^12, sqrt(Σ_a q_ia²)) six times
per term of dq. In print (never in the derivation, whose proofs use the full expressions) the norms get names:
r^q_i = ‖q_i‖, ν^q_i = max(ε, r^q_i), likewise r^k_j and ν^k_j, and ε = 10^-12; the cosine score's explanation
defines them. `abbreviate` only renames: substituting the definitions back gives the expression it was given.
"""
from __future__ import annotations

import functools
from typing import Callable

import sympy

from ..symbolic.score import NORM_EPS
from ..symbolic.tensors import TENSORS

EPSILON = sympy.Symbol("epsilon", positive=True)
_NORMS = {"Q": ("r_q", "nu_q"), "K": ("r_k", "nu_k")}  # rows of q and k -> their norm r and clamped norm ν


def abbreviator(d, step) -> Callable[[sympy.Basic], sympy.Basic]:
    """The renaming of `step`'s expressions: the cosine score's norms, the additive score's pre-activations; the
    identity for other scores. Explicit entries are renamed by exact substitution tables (built once per symbol
    table), indexed formulas by pattern, then the constants."""
    spec = getattr(d.spec, "head", d.spec)
    rules = _RULES.get(spec.score)
    if rules is None:
        return lambda expr: expr
    tables, patterns, constants = rules
    substitutions = tables(d.table_for(step)) if d.table is not None else ()

    def abbreviate(expr):
        if not isinstance(expr, sympy.Basic):
            return expr
        for table in substitutions:  # in order: a later table names what an earlier one made
            expr = expr.xreplace(table)
        for match, name in patterns:
            expr = expr.replace(match, name)
        return expr.xreplace(constants) if constants else expr
    return abbreviate


@functools.lru_cache(maxsize=8)
def _explicit_preactivations(table) -> tuple[dict]:
    """b_r + Σ_a q_{x,a} w_{a,r} + Σ_a k_{y,a} u_{a,r} -> η_{x,y,r} for every query x, key y and hidden unit r."""
    Q, K, W, U, b, eta = (table[n] for n in ("Q", "K", "Wa", "Ua", "ba", "eta"))
    n_q, n_k, d_a = eta.shape
    return ({b[r] + sum(Q[x, a] * W[a, r] + K[y, a] * U[a, r] for a in range(Q.shape[1])): eta[x, y, r]
             for x in range(n_q) for y in range(n_k) for r in range(d_a)},)


def _indexed_preactivation(e) -> bool:
    """b_a[r] + Σ K[j, ·] U_a[·, r] + Σ Q[i, ·] W_a[·, r]: three terms, whatever the summation indices' names."""
    if not isinstance(e, sympy.Add) or len(e.args) != 3:
        return False
    names = set()
    for term in e.args:
        inner = term.function if isinstance(term, sympy.Sum) else term
        names |= {x.base.label.name for x in inner.atoms(sympy.Indexed)}
    return names == {"ba", "K", "Ua", "Q", "Wa"}


def _preactivation_name(e):
    b = next(x for x in e.args if isinstance(x, sympy.Indexed))
    q = next(x for x in e.atoms(sympy.Indexed) if x.base.label.name == "Q")
    k = next(x for x in e.atoms(sympy.Indexed) if x.base.label.name == "K")
    return TENSORS["eta"].base[q.indices[0], k.indices[0], b.indices[0]]


@functools.lru_cache(maxsize=8)
def _explicit_norms(table) -> tuple[dict, dict]:
    """sqrt(q_{x,0}² + ...) -> r^q_x, then max(1/10^12, r^q_x) -> ν^q_x, for every row x of Q and of K."""
    norms, clamped = {}, {}
    for tensor, (r, nu) in _NORMS.items():
        X, R, N = table[tensor], table[r], table[nu]
        for x in range(X.shape[0]):
            squares = sum(X[x, a] ** 2 for a in range(X.shape[1]))
            norms[sympy.sqrt(squares)], norms[1 / sympy.sqrt(squares)] = R[x], 1 / R[x]
            clamped[sympy.Max(R[x], NORM_EPS)] = N[x]
    return norms, clamped


def _indexed_norm(e) -> bool:
    """sqrt(Σ_a X[row, a]²) (or its reciprocal) for X = Q or K, summed over its feature index."""
    if not (e.is_Pow and e.exp in (sympy.S.Half, -sympy.S.Half) and isinstance(e.base, sympy.Sum) and len(e.base.limits) == 1):
        return False
    term, (var, *_) = e.base.function, e.base.limits[0]
    return (term.is_Pow and term.exp == 2 and isinstance(term.base, sympy.Indexed)
            and term.base.base.label.name in _NORMS and term.base.indices[-1] == var)


def _indexed_name(e):
    X = e.base.function.base
    return TENSORS[_NORMS[X.base.label.name][0]].base[X.indices[0]] ** (2 * e.exp)


def _clamped(e) -> bool:
    """max(1/10^12, r[row]) of an indexed norm r already named."""
    return (isinstance(e, sympy.Max) and len(e.args) == 2 and NORM_EPS in e.args
            and any(isinstance(x, sympy.Indexed) and x.base.label.name in ("r_q", "r_k") for x in e.args))


def _clamped_name(e):
    r = next(x for x in e.args if isinstance(x, sympy.Indexed))
    return TENSORS["nu_q" if r.base.label.name == "r_q" else "nu_k"].base[r.indices[0]]


#: score -> (substitution tables of a symbol table's explicit entries, (pattern, name) rules of indexed
#: formulas, constants)
_RULES = {
    "additive": (_explicit_preactivations, ((_indexed_preactivation, _preactivation_name),), {}),
    "cosine": (_explicit_norms, ((_indexed_norm, _indexed_name), (_clamped, _clamped_name)), {NORM_EPS: EPSILON}),
}
