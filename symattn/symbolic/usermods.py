"""A user's own score mod, traced (symattn.symbolic.mods.score_mod builds the ScoreMod from the trace): the
function score_mod(score, b, h, q_idx, kv_idx) is called with SymPy symbols, and what it may use is `ops` (exp,
log, tanh, abs, where, minimum, maximum, comparisons) besides +, -, *, /, **, and indexing a declared `table`.
The result is checked node by node: an unsupported operation is an error naming it. symattn.mods re-exports
`ops` and `table`.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from ..errors import SpecError

SUPPORTED = ("+, -, *, /, ** and unary -; // and % of the indices; ops.exp, ops.exp2, ops.log, ops.tanh, "
             "ops.abs (or abs), ops.where(condition, a, b), ops.minimum, ops.maximum; comparisons <, <=, >, >=, "
             "ops.eq, ops.ne, joined by &, |, ~; indexing a symattn.mods.table")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{0,23}")
_RESERVED = {"q", "k", "v", "W_a", "U_a", "v_a", "b_a", "tau", "B_rel"}  # gradient keys of the library


def integer_quotient(rounded):
    """(p, q) when `rounded` is floor(p/q) or ceiling(p/q) of an integer p and an integer q > 0 (a user's i // 4),
    else None: what NumPy and the kernels can compute as an exact integer floor division."""
    import sympy
    num, den = sympy.fraction(sympy.together(rounded.args[0]))
    return (num, den) if num.is_integer and den.is_Integer and den > 0 else None


def _integer_floors(expr, floordiv):
    """floor(p/q) and ceiling(p/q) of integer p and q > 0 as floordiv(p, q), inner ones too."""
    import sympy
    if not expr.args:
        return expr
    quotient = integer_quotient(expr) if isinstance(expr, (sympy.floor, sympy.ceiling)) else None
    if quotient is not None:
        num, den = _integer_floors(quotient[0], floordiv), quotient[1]
        return floordiv(num, den) if isinstance(expr, sympy.floor) else -floordiv(-num, den)
    return expr.func(*(_integer_floors(x, floordiv) for x in expr.args))


def lambdified(args, expr):
    """sympy.lambdify to NumPy (of a traced expression, never of user text), with floor and ceiling of integer
    quotients as NumPy's exact integer floor division: p/q in floating point can land below an integer
    (5·(1/3) + 1/3 < 2), and a float is no table index."""
    import numpy as np
    import sympy
    return sympy.lambdify(args, _integer_floors(sympy.sympify(expr), sympy.Function("floordiv")),
                          [{"floordiv": np.floor_divide}, "numpy"])


def _is_symbolic(*xs) -> bool:
    return any(type(x).__module__.startswith("sympy") for x in xs)


def _numeric(name: str, x):
    """NumPy's `name` of a number or array, quietly: an overflow gives inf as NumPy does, and a traced constant
    that overflows is then named by the trace's own check ("gives oo"), not by a stray RuntimeWarning."""
    import numpy as np
    with np.errstate(all="ignore"):
        return getattr(np, name)(x)


class ops:  # noqa: N801 - a namespace: from symattn.mods import ops
    """The operations a score mod may use: on SymPy symbols (tracing) and on NumPy arrays or numbers."""

    @staticmethod
    def exp(x):
        return __import__("sympy").exp(x) if _is_symbolic(x) else _numeric("exp", x)

    @staticmethod
    def log(x):
        return __import__("sympy").log(x) if _is_symbolic(x) else _numeric("log", x)

    @staticmethod
    def exp2(x):
        return 2 ** x if _is_symbolic(x) else _numeric("exp2", x)

    @staticmethod
    def tanh(x):
        return __import__("sympy").tanh(x) if _is_symbolic(x) else _numeric("tanh", x)

    @staticmethod
    def abs(x):
        return abs(x)

    @staticmethod
    def minimum(x, y):
        import numpy as np
        return __import__("sympy").Min(x, y) if _is_symbolic(x, y) else np.minimum(x, y)

    @staticmethod
    def maximum(x, y):
        import numpy as np
        return __import__("sympy").Max(x, y) if _is_symbolic(x, y) else np.maximum(x, y)

    @staticmethod
    def where(condition, x, y):
        import numpy as np
        if _is_symbolic(condition, x, y):
            import sympy
            if isinstance(condition, bool):  # q_idx == kv_idx on symbols is a structural comparison: False
                raise SpecError("ops.where got a plain True/False while tracing: with symbols, == and != compare "
                                "expressions; write ops.eq(a, b) or ops.ne(a, b)")
            return sympy.Piecewise((x, condition), (y, True))
        return np.where(condition, x, y)

    @staticmethod
    def eq(x, y):
        return __import__("sympy").Eq(x, y) if _is_symbolic(x, y) else x == y

    @staticmethod
    def ne(x, y):
        return __import__("sympy").Ne(x, y) if _is_symbolic(x, y) else x != y

    min, max = minimum, maximum


class Table:
    """A learnable parameter table a score mod closes over (FlexAttention's closed-over bias tensor): `name` is
    its key in `params`, `shape` one or two sizes. Indexed in a traced mod, it gives the symbolic entry."""

    def __init__(self, name: str, shape):
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED:
            raise SpecError(f"a table name is a letter then letters or digits (at most 24), not one of "
                            f"{sorted(_RESERVED)}; got {name!r}")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if not 1 <= len(shape) <= 2 or any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4096
                                           for n in shape):
            raise SpecError(f"table {name!r} needs a shape of one or two sizes 1..4096, got {shape!r}")
        self.name, self.shape = name, shape

    def __getitem__(self, index):
        import sympy
        index = index if isinstance(index, tuple) else (index,)
        if len(index) != len(self.shape):
            raise SpecError(f"table {self.name!r} of shape {self.shape} takes {len(self.shape)} indices, "
                            f"got {len(index)}")
        _TOUCHED[self.name] = self
        return sympy.IndexedBase(f"table_{self.name}")[index]

    def __repr__(self) -> str:
        return f"table({self.name!r}, {self.shape})"


def table(name: str, shape) -> Table:
    """A learnable table for a score mod to index, e.g. table("bias", 9)[kv_idx - q_idx + 4]."""
    return Table(name, shape)


_TOUCHED: dict[str, Table] = {}  # the tables one trace indexes


@dataclass(frozen=True)
class Trace:
    """A traced mod: `expr` in the symbols (score, b, h, q_idx, kv_idx) and entries of `tables`."""

    expr: object  # sympy.Expr
    symbols: tuple  # (score, b, h, q_idx, kv_idx)
    tables: tuple[Table, ...]

    def formula(self, s, b, h, q, kv, theta):
        """s' with the symbols replaced by the given values and table entries read through theta's accessors."""
        import sympy
        expr = self.expr.xreplace(dict(zip(self.symbols, map(sympy.sympify, (s, b, h, q, kv)))))
        sizes = {f"table_{t.name}": t for t in self.tables}
        return expr.replace(lambda e: isinstance(e, sympy.Indexed) and e.base.label.name in sizes,
                            lambda e: theta[sizes[e.base.label.name].name](*_in_range(sizes[e.base.label.name], e)))

    def numpy(self):
        """Plain NumPy functions by sympy.lambdify of the traced expression (never of user text): f, ∂f/∂s, each
        f(score, b, h, q_idx, kv_idx, *tables) (tables in `tables` order), and per table entry read by the mod,
        (table name, index functions of (b, h, q_idx, kv_idx), ∂f/∂entry)."""
        import sympy

        from .score import derivative
        bases = [sympy.IndexedBase(f"table_{t.name}") for t in self.tables]
        args = [*self.symbols, *bases]
        expr = self.expr.replace(lambda e: isinstance(e, sympy.Pow) and e.base.is_Integer and not e.exp.is_number,
                                 lambda e: sympy.Pow(sympy.Float(e.base), e.exp))  # NumPy: no int ** -int
        entries = sorted(expr.atoms(sympy.Indexed), key=sympy.default_sort_key)
        held = {e: sympy.Dummy("u") for e in entries}
        frozen = expr.xreplace(held)
        leaves = tuple((e.base.label.name[len("table_"):],
                        tuple(lambdified(self.symbols[1:], ix) for ix in e.indices),
                        lambdified(args, derivative(frozen, u).xreplace({v: k for k, v in held.items()})))
                       for e, u in held.items())
        return lambdified(args, expr), lambdified(args, derivative(expr, self.symbols[0])), leaves

    @property
    def digest(self) -> str:
        """A short hash of the expression and its tables (a traced mod's default name)."""
        import sympy
        return hashlib.sha256((sympy.srepr(self.expr) + repr(self.tables)).encode()).hexdigest()[:8]

    def declared(self) -> tuple:
        """The tables as symattn.symbolic.score.Param fields (name, tensor, LaTeX names, dims); declares the dims."""
        return tuple((t.name, f"th{t.name}", rf"\theta_{{\mathrm{{{t.name}}}}}", f"th{t.name}",
                      rf"\theta^{{\mathrm{{{t.name}}}}}", _dims(t)) for t in self.tables)

    def sizes(self) -> tuple:
        """((dim, size), ...) of the tables' dims."""
        return tuple((dim, n) for t in self.tables for dim, n in zip(_dims(t), t.shape))


def _in_range(t: Table, entry) -> tuple:
    """The entry's indices, checked against the table's shape where they are numbers."""
    for ix, n in zip(entry.indices, t.shape):
        if ix.is_number and not (ix.is_integer and 0 <= ix < n):
            raise SpecError(f"score mod reads {t.name}[{', '.join(map(str, entry.indices))}], outside the "
                            f"table's {t.shape} (an index must be a whole number 0..{n - 1})")
    return entry.indices


def trace(fn, params: dict | None = None) -> tuple[Trace, str]:
    """`fn` called with SymPy symbols (score real; b, h, q_idx, kv_idx integers; theta's tables when `params`
    declares them), its result checked to be built from SUPPORTED operations only: the Trace and the function's
    name (for messages)."""
    import sympy
    label = getattr(fn, "__name__", type(fn).__name__)
    symbols = (sympy.Symbol("score", real=True), *sympy.symbols("b h q_idx kv_idx", integer=True))
    theta = {n: Table(n, shape) for n, shape in (params or {}).items()}
    _TOUCHED.clear()
    try:
        expr = fn(*symbols, theta) if params is not None else fn(*symbols)
    except SpecError:
        raise
    except Exception as e:  # whatever the function does with symbols it cannot
        raise SpecError(f"cannot trace score_mod {label!r}: {_failing_line(e, fn)}{type(e).__name__}: {e}. "
                        f"Supported: {SUPPORTED}; write conditions with ops.where, not a Python if") from None
    tables = tuple(sorted(_TOUCHED.values(), key=lambda t: t.name))
    return Trace(_checked(expr, label, symbols, tables), symbols, tables), label


def _check_index(entry, label: str, symbols) -> None:
    """A table entry's indices: whole-number expressions of b, h, q_idx and kv_idx (the kernels compute them as
    integers, and the numeric API checks their range at the call's sizes), never of the score or another entry."""
    import sympy
    name = entry.base.label.name[len("table_"):]
    for ix in entry.indices:
        huge = any(abs(n) >= 2 ** 31 for n in ix.atoms(sympy.Integer))  # tables hold at most 4096 entries a dim
        if huge or ix.atoms(type(entry)) or not ix.free_symbols <= set(symbols[1:]) or ix.is_integer is not True:
            raise SpecError(f"score_mod {label!r} reads {name}[{', '.join(map(str, entry.indices))}]: a table index "
                            f"is a whole-number expression of b, h, q_idx, kv_idx (+, -, *, abs, minimum, maximum, "
                            f"where; no division, no score, no other table, constants below 2^31)")


def _dims(t: Table) -> tuple[str, ...]:
    from .tensors import declare_dim
    dims = (f"n_{t.name}",) if len(t.shape) == 1 else (f"n_{t.name}_0", f"n_{t.name}_1")
    for axis, dim in enumerate(dims):
        declare_dim(dim, axis)
    return dims


def _failing_line(error: Exception, fn) -> str:
    """'at `<source line>`: ' of the user's function where tracing failed ('' when not found)."""
    import linecache
    import traceback
    code = getattr(fn, "__code__", None)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if code is not None and f.filename ==
              code.co_filename]
    line = linecache.getline(frames[-1].filename, frames[-1].lineno).strip() if frames else ""
    return f"at `{line}`: " if line else ""


def _index_arithmetic(node) -> bool:
    """Whether `node` (a floor, ceiling or Mod) is arithmetic of the indices b, h, q_idx, kv_idx only: no score,
    no table entry inside."""
    import sympy
    return not node.atoms(sympy.Indexed) and all(x.is_integer for x in node.free_symbols)


def _checked(expr, label: str, symbols, tables):
    """The traced result as an exact SymPy expression built from supported operations only."""
    import sympy
    from sympy.logic import boolalg
    # (a Symbol is a Boolean too in SymPy: the score itself, returned unchanged, is a score)
    if isinstance(expr, bool) or not isinstance(expr, (int, float, sympy.Expr)):
        raise SpecError(f"score_mod {label!r} returned {type(expr).__name__}, not a score: a score mod returns the "
                        f"new score (use ops.where(condition, a, b) for a choice)")
    expr = sympy.sympify(expr)
    for f in expr.atoms(sympy.Float):  # 1e300 * 1e300 is one Float of 1e600 by now
        if not math.isfinite(float(f)):
            raise SpecError(f"score_mod {label!r} uses a constant beyond float64's range (about 1.8e308): {f:.3e}")
    expr = expr.xreplace({f: sympy.Rational(repr(float(f))) for f in expr.atoms(sympy.Float)})
    allowed = (sympy.Symbol, sympy.Number, sympy.NumberSymbol, sympy.Add, sympy.Mul, sympy.Pow, sympy.exp,
               sympy.log, sympy.tanh, sympy.Abs, sympy.Min, sympy.Max, sympy.Piecewise, sympy.Indexed,
               sympy.IndexedBase, sympy.Tuple, sympy.core.relational.Relational, boolalg.And, boolalg.Or,
               boolalg.Not, boolalg.BooleanAtom, sympy.functions.elementary.piecewise.ExprCondPair)
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, (sympy.floor, sympy.ceiling, sympy.Mod)) and _index_arithmetic(node):
            continue  # q_idx // 2, (q_idx - kv_idx) % 3: integers, constant in the score (below, all allowed)
        if node in (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
            raise SpecError(f"score_mod {label!r} gives {node}: mask keys with a mask_mod, not an infinite score")
        if not isinstance(node, allowed):
            raise SpecError(f"score_mod {label!r} uses {type(node).__name__}, which is not supported. "
                            f"Supported: {SUPPORTED}")
        if isinstance(node, sympy.Number) and not math.isfinite(float(node)):
            digits = len(str(abs(sympy.floor(abs(node))))) if abs(node) >= 1 else 0
            raise SpecError(f"score_mod {label!r} uses a constant of {digits} digits, beyond float64's range "
                            f"(about 1.8e308)")
        if isinstance(node, sympy.Indexed):
            _check_index(node, label, symbols)
    unknown = {x for x in expr.free_symbols if not isinstance(x, sympy.Indexed)} - set(symbols) \
        - {sympy.Symbol(f"table_{t.name}") for t in tables}
    if unknown:
        raise SpecError(f"score_mod {label!r} depends on {sorted(map(str, unknown))}, not only on its arguments")
    return expr
