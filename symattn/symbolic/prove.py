"""Proofs at the chosen sizes.

1. Each indexed formula instantiated at the sizes equals the explicit array (exact).
   Each printed matrix form (dV = Pᵀ dO, dQ = τ dS K W_aᵀ, Q̂ = x W_Q + 1 b_Qᵀ, ...), evaluated with the matrices
   of element symbols at the sizes, equals the explicit array (exact; element symbols replaced by their entries
   one level at a time until the difference expands to 0).
2. Each closed-form gradient equals plain symbolic differentiation (SymEngine) of the expanded forward.
   exp is kept opaque as E(x) (SymEngine would merge exp(a)exp(b) into exp(a+b)); after differentiating,
   the rule E'(x) = E(x) is applied and each E(S_ij) is replaced by an independent positive symbol e_ij: both sides are
   then rational functions of (inputs, e), and an identity in independent e_ij implies it at e_ij = exp(S_ij).
   The identity is shown by exact simplification to zero (SymPy `cancel`) when the sizes are small, else by
   exact rational evaluation at several random points (Schwartz-Zippel: a nonzero rational function of degree
   d vanishes at a random point of a grid of N values with probability at most d/N; N ~ 10^6 here).
"""
from __future__ import annotations

import itertools
import random
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import symengine as se
import sympy

from .chains import ONE
from .tensors import SIZES, TENSORS, as_matrix, flat, shape_of

if TYPE_CHECKING:  # type hints only: derive() runs the proofs, so prove must not import derive
    from .derive import Derivation, Progress

#: Exact simplification when n_q·n_k·(d_k+d_v) is at most this; random rational points above.
EXACT_LIMIT = 16
POINTS = 3

E = se.Function("E")  # opaque exp: E'(x) = E(x), applied after differentiation by _exp_rule


@dataclass(frozen=True)
class Proof:
    """Outcome of one proof: which step, what was claimed, how it was shown."""

    step: str
    kind: str  # "indexed" | "matrix" | "jacobian" | "gradient"
    claim: str
    method: str  # "exact simplification" | "random rational points"
    detail: str
    passed: bool
    checked: int  # entries compared
    seconds: float
    failure: str = ""


def _opaque_exp(expr: sympy.Expr):
    """SymPy expression -> SymEngine, with exp(x) written as the opaque E(x), max and min as the Piecewise they
    are and |x|, sign(x) as sqrt(x²), x/sqrt(x²) (SymEngine differentiates those, not a Max or an Abs)."""
    expr = expr.replace(lambda e: isinstance(e, (sympy.Max, sympy.Min)), _as_branches)
    out = se.sympify(expr.replace(sympy.exp, sympy.Function("E")))
    magnitudes = {a: se.sqrt(a.args[0] ** 2) for a in out.atoms(se.Abs)}  # SymEngine keeps sqrt(x²) as it is
    magnitudes |= {g: g.args[0] / se.sqrt(g.args[0] ** 2) for g in out.atoms(se.sign)}
    return out.xreplace(magnitudes) if magnitudes else out


def _as_branches(e: sympy.Expr) -> sympy.Expr:
    first, *rest = e.args
    other = _as_branches(e.func(*rest)) if len(rest) > 1 else rest[0]
    return sympy.Piecewise((first, first >= other if isinstance(e, sympy.Max) else first <= other), (other, True))


def _has_branches(d: Derivation) -> bool:
    """True when some step holds a max, min, |x|, sign or Piecewise: shown at random points, not by cancel."""
    kinds = (sympy.Max, sympy.Min, sympy.Abs, sympy.sign, sympy.Piecewise)
    return any(s.explicit is not None and not s.is_input and any(x.has(*kinds) for x in flat(s.explicit))
               for s in d.steps)


def _settle(expr):
    """`expr` with its Piecewise nodes on numbers decided (by SymPy's exact comparison, square roots included),
    innermost first; nodes that still hold symbols are left as they are."""
    while True:
        nodes = [p for p in expr.atoms(se.Piecewise) if not p.free_symbols
                 and not any(a.atoms(se.Piecewise) for a in p.args)]
        if not nodes:
            return expr
        expr = expr.xreplace({p: _branch_taken(p) for p in nodes})


def _branch_taken(p):
    args = p.args
    for value, condition in zip(args[::2], args[1::2]):
        if sympy.sympify(condition) == sympy.true:
            return value
    raise ValueError(f"no branch of {p} holds")  # a Piecewise of the derivation always ends in (x, True)


def _exp_nodes(S_ij) -> list:
    """E(S_ij) and the derivative node SymEngine writes for E'(S_ij); both mean exp(S_ij) (E' = E)."""
    variable = sorted(S_ij.free_symbols, key=str)[0]
    derivative = se.diff(E(S_ij), variable)
    nodes = [n for n in derivative.atoms(se.Subs) | derivative.atoms(se.Derivative) if n.atoms(se.Subs) or
             n.args[0] == E(S_ij)]
    return [E(S_ij), *nodes]


def _exp_substitution(S: list, e: list) -> dict:
    """One xreplace rule taking E(S_ij) and its derivative nodes to e_ij."""
    return {node: e_ij for S_ij, e_ij in zip(S, e) for node in _exp_nodes(S_ij)}


class _Chain:
    """The derivation's explicit steps as SymEngine expressions, composed or evaluated in order."""

    def __init__(self, d: Derivation):
        self.d, self.table = d, d.table
        self.entries = {s.key: [(sym, _opaque_exp(expr)) for sym, expr in
                                zip(flat(s.symbols), flat(s.explicit))] for s in d.steps if not s.is_input}
        # every softmax argument (one S per head in a multi-head layer)
        self.S = [se.sympify(x) for s in d.steps if s.tensor == "S" for x in flat(s.symbols)]
        self.tensor_symbols = {}
        for s in d.steps:
            self.tensor_symbols.setdefault(s.tensor, flat(s.symbols))

    def leaves(self, *tensors) -> list[se.Symbol]:
        return [se.sympify(x) for t in tensors for x in self.tensor_symbols.get(t) or flat(self.table[t])]

    def compose(self, keys, values=None) -> dict:
        """Element symbol -> expression after substituting the steps `keys` in order."""
        values = dict(values or {})
        for key in keys:
            for sym, expr in self.entries[key]:
                values[se.sympify(sym)] = expr.xreplace(values) if values else expr
        return values

    def evaluate(self, leaves: set[str], stop: str, point: dict, e_values: dict) -> dict:
        """Exact values of every step up to `stop`, leaf tensors taken from `point`, exp(s_ij) -> e_ij."""
        values = dict(point)
        exp_s = {E(s): e_values[k] for k, s in enumerate(self.S)}
        for step in self.d.steps:
            if step.is_input or step.tensor in leaves:
                continue
            for sym, expr in self.entries[step.key]:
                values[se.sympify(sym)] = _settle(expr.xreplace(exp_s).xreplace(values))
            if step.key == stop:
                return values
        raise KeyError(stop)


def _is_zero(expr, exact: bool) -> bool:
    if exact:
        return sympy.cancel(sympy.sympify(expr)) == 0
    return se.expand(expr) == 0


def _points(d: Derivation, symbols, count: int, e_count: int):
    rng = random.Random(zlib.crc32(d.spec.name.encode()))
    for _ in range(count):
        point = {x: se.Rational(rng.randint(-10**6, 10**6), rng.randint(1, 10**6)) for x in symbols}
        yield point, [se.Rational(rng.randint(1, 10**6), rng.randint(1, 10**6)) for _ in range(e_count)]


def _gradient(chain: _Chain, key: str, target: str, leaves: tuple[str, ...], forward: tuple[str, ...],
              exact: bool, output: str = "O", upstream: str = "dO") -> Proof:
    """Closed form of step `key` (dL/d target) against SymEngine's diff of L = Σ upstream∘output(leaves)."""
    start = time.perf_counter()
    spec = chain.d.spec
    values = chain.compose(forward, {})
    O = [values[x] for x in chain.leaves(output)]
    L = sum((do * o for do, o in zip(chain.leaves(upstream), O)), se.Integer(0))
    S_composed = [values.get(s, s) for s in chain.S]
    e_syms = [se.Symbol(f"e_{k}") for k in range(len(S_composed))]
    e_of = _exp_substitution(S_composed, e_syms)
    variables = chain.leaves(*leaves)
    wrt = chain.leaves(target)
    plain = [se.diff(L, x).xreplace(e_of) for x in wrt]
    closed_syms = [se.sympify(x) for x in flat(chain.d.step(key).symbols)]
    checked, failure = 0, ""
    if exact:
        upto = chain.d.steps.index(chain.d.step(key))
        closed = chain.compose([s.key for n, s in enumerate(chain.d.steps)
                                if n <= upto and not s.is_input and s.tensor not in leaves])
        for x, p, sym in zip(wrt, plain, closed_syms):
            checked += 1
            if not _is_zero(p - closed[sym].xreplace(e_of), True):
                failure = failure or f"{sym}: closed form differs from d L / d {x}"
        method, detail = "exact simplification", "SymPy cancel of (closed - diff) to 0"
    else:
        for point, e_values in _points(chain.d, variables, POINTS, len(e_syms)):
            vals = chain.evaluate(set(leaves), key, point, e_values)
            at = {**point, **dict(zip(e_syms, e_values))}
            for x, p, sym in zip(wrt, plain, closed_syms):
                checked += 1
                plain_value = _settle(p.xreplace(at))
                if not _is_zero(plain_value - vals[sym], False):
                    failure = failure or f"{sym}: closed {vals[sym]} != diff {plain_value}"
        method, detail = "random rational points", f"{POINTS} points, seed crc32({spec.name!r})"
    claim = (f"${_tex(chain.d.step(key).tensor)}$ (closed form) $= \\partial L / \\partial {_tex(target)}$ (plain "
             f"differentiation of $L$ over ${', '.join(map(_tex, leaves))}$)")
    return Proof(key, "gradient", claim, method, detail, not failure, checked, time.perf_counter() - start, failure)


def _tex(name: str) -> str:
    """A tensor's LaTeX name in a claim (math between $ signs; a name that is not a tensor as it is)."""
    return TENSORS[name].latex if name in TENSORS else name


def _jacobian(chain: _Chain) -> Proof:
    """J_ijl = p_ij(δ_jl - p_il) against SymEngine's diff of the explicit softmax by s_il (exact)."""
    start = time.perf_counter()
    spec, table = chain.d.spec, chain.table
    P = dict(chain.entries["softmax"])
    e_of = {node: E(S_ij) for S_ij in chain.S for node in _exp_nodes(S_ij)}
    J = chain.d.step("jacobian").explicit
    checked, failure = 0, ""
    for x, y, z in itertools.product(range(spec.n_q), range(spec.n_k), range(spec.n_k)):
        p = P[table["P"][x, y]]
        closed = se.sympify(J[x, y, z]).xreplace({se.sympify(k): v for k, v in P.items()})
        diff = se.diff(p, se.sympify(table["S"][x, z])).xreplace(e_of)
        checked += 1
        if not _is_zero(diff - closed, exact=True):
            failure = failure or f"J[{x},{y},{z}] differs from d p_{x}{y} / d s_{x}{z}"
    return Proof("jacobian", "jacobian", r"$J_{ijl} = p_{ij} (\delta_{jl} - p_{il}) = \partial p_{ij} / \partial s_{il}$",
                 "exact simplification",
                 "SymPy cancel of (closed - diff) to 0", not failure, checked, time.perf_counter() - start, failure)


def _expanded(expr: sympy.Expr) -> sympy.Expr:
    """expand, with sign(x) written x/|x| (d|x|/dx of an explicit form; the indexed form at d_k = 1 gives
    x/sqrt(x²) = x/|x|: equal wherever x != 0)."""
    return sympy.expand(expr.replace(sympy.sign, lambda x: x / sympy.Abs(x)) if expr.has(sympy.sign) else expr)


def _indexed(d: Derivation) -> list[Proof]:
    """Each indexed formula instantiated at the sizes equals the explicit entry, exactly."""
    proofs = []
    for step in d.steps:
        if step.is_input:
            continue
        start = time.perf_counter()
        failure, checked = "", 0
        for index in itertools.product(*map(range, shape_of(step.explicit))):
            value = d.table_for(step).instantiate(step.rhs, dict(zip(step.indices, index)))
            checked += 1
            if _expanded(value - step.explicit[index]) != 0:
                failure = failure or (f"{step.symbols[index]}: indexed {value} != explicit "
                                      f"{step.explicit[index]}")
        claim = f"indexed ${_tex(step.tensor)}$ formula at the sizes $=$ explicit ${_tex(step.tensor)}$"
        proofs.append(Proof(step.key, "indexed", claim,
                            "exact simplification", "SymPy expand of (indexed - explicit) to 0",
                            not failure, checked, time.perf_counter() - start, failure))
    return proofs


def _matrix_value(d: Derivation, step) -> sympy.Matrix | None:
    """The step's matrix form with every matrix symbol replaced by its element symbols at the sizes, evaluated;
    None where the form is not arithmetic on the tensors (P = softmax(S + M), the Jacobian J^(i), the loss L)."""
    form = step.matrix
    if form is None or step.explicit is None or not isinstance(form.lhs, sympy.MatrixSymbol) \
            or form.rhs.atoms(sympy.core.function.AppliedUndef) or form.rhs.has(sympy.DiagMatrix):
        return None
    table = d.table_for(step)
    subs = {}
    for m in form.rhs.atoms(sympy.MatrixSymbol):
        if m == ONE:
            subs[m] = sympy.ones(table.spec.n_k, 1)
        elif m.name in TENSORS:
            subs[m] = table.matrix(m.name)
        else:
            return None
    sizes = {SIZES[n]: v for n, v in table.spec.sizes.items() if n in SIZES}
    value = form.rhs.xreplace(subs).xreplace(sizes)
    value = value.replace(lambda e: isinstance(e, sympy.OneMatrix), lambda e: sympy.ones(*map(int, e.shape)))
    return sympy.Matrix(value.doit())


def _matrix_forms(d: Derivation, chain: _Chain) -> list[Proof]:
    """Each printed matrix form at the sizes equals the explicit array: their difference expands to 0, with the
    steps' element symbols replaced by their explicit entries one level at a time until it does (exp kept opaque;
    most forms need none or one level, so nothing is expanded down to the inputs that need not be)."""
    forms = [(step, value) for step in d.steps if (value := _matrix_value(d, step)) is not None]
    one = {se.sympify(sym): expr for entries in chain.entries.values() for sym, expr in entries}
    proofs = []
    for step, value in forms:
        start = time.perf_counter()
        explicit = as_matrix(step.explicit)
        if value.shape != explicit.shape and value.shape == explicit.T.shape:
            value = value.T  # a vector's form as a row
        failure = "" if value.shape == explicit.shape else f"shape {value.shape} != explicit {explicit.shape}"
        for symbol, a, b in zip(as_matrix(step.symbols), value, explicit) if not failure else ():
            if not _zero_within(_opaque_exp(a) - _opaque_exp(b), one, len(d.steps)):
                failure = failure or f"{symbol}: matrix form {a} != explicit {b}"
        claim = f"matrix form of ${_tex(step.tensor)}$ at the sizes $=$ explicit ${_tex(step.tensor)}$"
        proofs.append(Proof(step.key, "matrix", claim, "exact simplification",
                            "element-symbol matrices, entries substituted level by level, SymEngine expand to 0",
                            not failure, len(value), time.perf_counter() - start, failure))
    return proofs


def _zero_within(diff, one: dict, levels: int) -> bool:
    """diff expands to 0 after at most `levels` rounds of replacing element symbols by their explicit entries."""
    for _ in range(levels + 1):
        if se.expand(diff) == 0:
            return True
        replaced = diff.xreplace(one)
        if replaced == diff:  # only inputs left
            return False
        diff = replaced
    return False


def _head_gradients(d: Derivation) -> list[tuple]:
    """One head: (step, target, leaves, forward steps from the leaves to O) for dV, dP, dS, dQ, dK and every
    score parameter θ (dθ against the plain derivative of L over Q, K, V, θ, dO)."""
    inputs = tuple(s.tensor for s in d.steps if s.is_input and s.phase == "forward")  # Q, K, θ...
    leaves = (*inputs, "V", "dO")
    forward = tuple(s.key for s in d.forward() if not s.is_input and s.key != "output")  # score ... sum
    params = [s.tensor for s in d.steps if s.is_input and s.phase == "forward" and s.tensor not in ("Q", "K")]
    return [("dV", "V", leaves, forward), ("dP", "P", ("P", "V", "dO"), ("weighted_values", "sum")),
            ("dS", "S", ("S", "V", "dO"), ("softmax", "weighted_values", "sum")),
            ("dQ", "Q", leaves, forward), ("dK", "K", leaves, forward),
            *((f"d{p}", p, leaves, forward) for p in params)]


def _layer_gradients(d: Derivation):
    """A multi-head layer: every weight, bias, input and shared parameter gradient against plain diff of the
    whole layer."""
    inputs = tuple(s.tensor for s in d.steps if s.is_input and s.phase == "forward")
    forward = tuple(s.key for s in d.steps if s.phase == "forward" and not s.is_input)
    targets = {"dWq": "Wq", "dWk": "Wk", "dWv": "Wv", "dWo": "Wo", "dbq": "bq", "dbk": "bk", "dbv": "bv",
               "dbo": "bo", "dX": "X", "dY": "Yin"}
    targets |= {"d" + x: x for x in inputs if x not in targets.values()}  # the score's and mod's θ: dθ
    keys = {s.key for s in d.steps}
    return [(key, target, inputs + ("dOut",), forward, "Out", "dOut") for key, target in targets.items() if key in keys]


def prove(d: Derivation, *, progress: Progress | None = None, exact: bool | None = None) -> Derivation:
    """Return `d` with its proofs attached. exact=None picks exact simplification for small sizes."""
    if d.table is None:
        raise ValueError("proofs need the explicit form: derive(spec, explicit=True)")
    note = progress or (lambda message: None)
    if exact is None:
        exact = d.spec.explicit_cost <= EXACT_LIMIT and not _has_branches(d)
    chain = _Chain(d)
    note("prove: indexed formulas = explicit arrays")
    proofs = _indexed(d)
    note("prove: matrix forms = explicit arrays")
    proofs += _matrix_forms(d, chain)
    if any(s.key == "jacobian" for s in d.steps):
        note("prove: softmax Jacobian")
        proofs.append(_jacobian(chain))
    single = d.table.children == {}
    gradients = [(*g, "O", "dO") for g in _head_gradients(d)] if single else _layer_gradients(d)
    for n, (key, target, leaves, forward, output, upstream) in enumerate(gradients, 1):
        note(f"prove {n}/{len(gradients)}: {key} = dL/d{target}")
        proofs.append(_gradient(chain, key, target, leaves, forward, exact, output, upstream))
    return d.with_proofs(proofs)
