"""Lowering the indexed derivation's sums to loop code, for the element kernels (element.py).

Loop-invariant hoisting: every maximal sub-expression of the score holding a sum that depends on the query side only
(i) or the key side only (j) becomes an array computed once per row or key (`hoist`); pair sums that are bilinear in
hoisted rows go to BLAS blocks (`bilinear`). `Emitter` turns what is left into straight-line code with loops, one
CSE block per loop body; `emit_accumulations` writes target[w] += expr updates grouped by loop nest.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy

from ..symbolic.tensors import SIZES, i, j
from .printer import NumbaPrinter


@dataclass
class Hoisted:
    """An array computed once per row (side 'q', index i) or key (side 'k', index j): name[row, *outer]."""

    name: str
    side: str
    outer: tuple  # (symbol, dim name) of the enclosing sums' indices it depends on
    definition: sympy.Expr

    @property
    def base(self) -> sympy.IndexedBase:
        return sympy.IndexedBase(sympy.Symbol(self.name))

    def element(self) -> sympy.Indexed:
        return self.base[(i if self.side == "q" else j,) + tuple(x for x, _ in self.outer)]


def _dim_of(upper: sympy.Expr) -> str:
    """The size name of a sum's upper limit (size - 1)."""
    for name, size in SIZES.items():
        if sympy.simplify(upper - (size - 1)) == 0:
            return name
    raise ValueError(f"sum limit {upper} is not a size minus one")


def fresh_dummies(expr: sympy.Expr) -> sympy.Expr:
    """Rename every sum index to a plain identifier (primed letters are not code): a -> a0, r' -> r1, ..."""
    counter = itertools.count()

    def visit(node):
        if isinstance(node, sympy.Sum):
            body, limits = node.function, []
            for x, lo, hi in node.limits:
                new = sympy.Symbol(f"{x.name.rstrip(chr(39))}{next(counter)}", integer=True, nonnegative=True)
                body = body.xreplace({x: new})
                limits.append((new, lo, hi))
            return sympy.Sum(visit(body), *limits)
        return node.func(*(visit(a) for a in node.args)) if node.args else node
    return visit(expr)


def hoist(expr: sympy.Expr) -> tuple[sympy.Expr, list[Hoisted]]:
    """g and the hoisted arrays: maximal sub-expressions with a sum that depend on i or j, not both."""
    found: list[Hoisted] = []

    def visit(node, scope: tuple):
        free = node.free_symbols
        if node.args and node.has(sympy.Sum) and (i in free) != (j in free):
            outer = tuple((x, dim) for x, dim in scope if x in free)
            h = Hoisted(f"h{'q' if i in free else 'k'}{len(found)}", "q" if i in free else "k", outer, node)
            found.append(h)
            return h.element()
        if isinstance(node, sympy.Sum):
            inner = scope + tuple((x, _dim_of(hi)) for x, _, hi in node.limits)
            return sympy.Sum(visit(node.function, inner), *node.limits)
        return node.func(*(visit(a, scope) for a in node.args)) if node.args else node
    return visit(expr, ()), found


@dataclass(frozen=True)
class Bilinear:
    """A pair sum Σ_a X[i, a] Y[j, a] (X a query-side array, Y a key-side one): one BLAS product M = X Yᵀ per
    block of rows; its gradient flows back as dX += C Y and dY += Cᵀ X, C = dL/dM."""

    symbol: sympy.Symbol
    X: str  # indexed base name of the query-side array (Q or a hoisted hq)
    Y: str


def bilinear(g: sympy.Expr, hoisted: dict[str, Hoisted]) -> tuple[sympy.Expr, list[Bilinear]]:
    """g with its outer sums of the form Σ_a X[i, a] Y[j, a] replaced by symbols m0, m1, ..."""
    side = {"Q": "q", "K": "k", **{h.name: h.side for h in hoisted.values() if len(h.outer) == 1}}
    found, names = [], {}
    for s in _outer_sums(g):
        factors = sympy.Mul.make_args(s.function)
        if len(s.limits) != 1 or len(factors) != 2 or not all(isinstance(x, sympy.Indexed) for x in factors):
            continue
        x = s.limits[0][0]
        sides = {side.get(f.base.label.name): f for f in factors}
        A, B = sides.get("q"), sides.get("k")
        if A is None or B is None or A.indices != (i, x) or B.indices != (j, x):
            continue
        names[s] = sympy.Symbol(f"m{len(found)}")
        found.append(Bilinear(names[s], A.base.label.name, B.base.label.name))
    return g.xreplace(names), found


# -- lowering: sums -> loops, one CSE per block ---------------------------------------------------------------

class Emitter:
    """Straight-line code with loops, as lines; sums become accumulators. Sums lowered at the emitter's top
    level are remembered and reused by later blocks of the same scope (the backward's score and gradients)."""

    def __init__(self, printer: NumbaPrinter):
        self.printer, self.lines = printer, []
        self._names = (f"t{n}" for n in itertools.count())
        self._known: dict[sympy.Sum, sympy.Symbol] = {}

    def line(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def values(self, exprs: list[sympy.Expr], depth: int) -> list[str]:
        """Emit what `exprs` need at `depth` (their sums as loops, then one CSE block); their printed values."""
        exprs = [self.lower(e, depth) for e in exprs]
        replacements, reduced = sympy.cse(exprs, symbols=(sympy.Symbol(n) for n in self._names))
        for lhs, rhs in replacements:
            self.line(depth, f"{lhs} = {self.printer.doprint(rhs)}")
        return [self.printer.doprint(e) for e in reduced]

    def lower(self, expr: sympy.Expr, depth: int, keep: bool = False) -> sympy.Expr:
        """`expr` with its outer sums emitted as loops at `depth` and replaced by their accumulators (`keep`:
        remember them for later blocks; always at depth 0)."""
        names = {}
        for s in _outer_sums(expr):
            if s in self._known:
                names[s] = self._known[s]
            else:
                names[s] = self._sum(s, depth)
                if keep or depth == 0:
                    self._known[s] = names[s]
        return expr.xreplace(names)

    def _sum(self, s: sympy.Sum, depth: int) -> sympy.Symbol:
        """Emit Σ as a loop (sums of its body that do not depend on its index first, outside it)."""
        (x, lo, hi), rest = s.limits[0], s.limits[1:]
        body = sympy.Sum(s.function, *rest) if rest else s.function
        invariant = {t: self._sum(t, depth) for t in _outer_sums(body) if x not in t.free_symbols}
        body = body.xreplace(invariant)
        name = sympy.Symbol(next(self._names))
        self.line(depth, f"{name} = _cast(Q, 0.0)")
        self.line(depth, f"for {x} in range({self.printer.doprint(lo)}, {self.printer.doprint(hi + 1)}):")
        value, = self.values([body], depth + 1)
        self.line(depth + 1, f"{name} += {value}")
        return name


def _outer_sums(expr: sympy.Expr) -> list[sympy.Sum]:
    """The sums of `expr` not nested in another sum, in a deterministic order."""
    if isinstance(expr, sympy.Sum):
        return [expr]
    out = []
    for arg in expr.args:
        out += [s for s in _outer_sums(arg) if s not in out]
    return out


@dataclass
class Accumulation:
    """target[w] += expr for every w in the ranges of its dims (no w: one scalar update)."""

    target: sympy.Expr  # Indexed (with the loop symbols w) the code adds into
    loops: tuple  # (symbol, dim name)
    expr: sympy.Expr


def emit_accumulations(emitter: Emitter, items: list[Accumulation], depth: int) -> None:
    """Group accumulations by their loop dims, one loop nest (and one CSE block) per group; sums that do not
    depend on the loop indices are computed once, before the nest."""
    groups: dict[tuple, list] = {}
    for item in items:
        if item.expr != 0:
            groups.setdefault(tuple(dim for _, dim in item.loops), []).append(item)
    for dims, group in groups.items():
        w = [sympy.Symbol(f"w{n}_{dim}", integer=True, nonnegative=True) for n, dim in enumerate(dims)]
        rename = [{old: new for (old, _), new in zip(item.loops, w)} for item in group]
        exprs = [item.expr.xreplace(r) for item, r in zip(group, rename)]
        invariant = {s for e in exprs for s in _outer_sums(e) if not s.free_symbols & set(w)}
        lowered = {s: emitter.lower(s, depth) for s in sorted(invariant, key=sympy.default_sort_key)}
        exprs = [e.xreplace(lowered) for e in exprs]
        for n, (x, dim) in enumerate(zip(w, dims)):
            emitter.line(depth + n, f"for {x} in range({dim}):")
        inner = depth + len(dims)
        values = emitter.values(exprs, inner)
        for item, r, value in zip(group, rename, values):
            emitter.line(inner, f"{emitter.printer.doprint(item.target.xreplace(r))} += {value}")


def tidy(expr: sympy.Expr) -> sympy.Expr:
    """Drop sums of zero (left by differentiating a sum its variable does not enter)."""
    return expr.replace(lambda x: isinstance(x, sympy.Sum) and x.function == 0, lambda x: sympy.S.Zero)
