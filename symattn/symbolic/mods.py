"""Score mods as data: s' = f(s, b, h, q_idx, kv_idx; θ) (FlexAttention's score_mod), applied to any score.

Library: `alibi(slope)` (s + slope·(kv_idx − q_idx), slope 2^-8 by default; `heads=H`: the paper's m_h =
2^(-8(h+1)/H) of head h), `softcap(c)` (c·tanh(s/c)), `relative_bias(d)` (s + B[clip(kv_idx − q_idx, −d, d) + d],
a table of 2d + 1 entries). Text forms ("alibi", "softcap:30", "relative-bias:4") name files; ∂f by SymPy.

A user's own score_mod(score, b, h, q_idx, kv_idx), written with +, -, *, /, ** and the operations of `ops`
(exp, log, tanh, abs, where, minimum, maximum, comparisons) and indexing a declared `table`, is traced with
SymPy symbols by `score_mod(fn)`: the expression names it (a short hash) and is differentiated like the library's.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

from ..errors import SpecError

#: f(s, b, h, q_idx, kv_idx, theta) -> s'; theta maps a parameter name to an element accessor.
ModFormula = Callable[..., object]


@dataclass(frozen=True)
class ScoreMod:
    """One score mod: `text` names it, `formula` computes s', `params` are (name, tensor, dims) of θ."""

    text: str
    formula: ModFormula = field(repr=False, compare=False)
    description: str = field(default="", repr=False, compare=False)
    kind: str = field(default="", repr=False, compare=False)  # "alibi" | "softcap" | "relative-bias"
    value: Fraction = field(default=Fraction(0), repr=False, compare=False)  # the slope, cap or distance
    declared: tuple = field(default=(), repr=False, compare=False)  # Param fields of θ: (name, tensor, ...)
    sizes: tuple = field(default=(), repr=False, compare=False)  # extra sizes: (("n_rel", 9),)
    heads: int = field(default=0, repr=False, compare=False)  # alibi(heads=H): H; 0: one slope for every head
    trace: object = field(default=None, repr=False, compare=False)  # a user's mod: its Trace (symattn.mods)

    @property
    def params(self) -> tuple:
        """θ as symattn.symbolic.score.Param (declaring them registers their tensors; needs SymPy)."""
        from .score import Param
        return tuple(Param(*fields) for fields in self.declared)

    @property
    def tag(self) -> str:
        return (self.text.replace(":", "").replace("relative-bias", "relbias").replace("/", "o").replace(".", "p")
                .replace("=", ""))

    def slope(self, h: int) -> float:
        """ALiBi's slope of head h (kind "alibi" or "alibi-heads")."""
        return 2.0 ** (-8 * (h + 1) / self.heads) if self.heads else float(self.value)


def alibi(slope=Fraction(1, 256), *, heads: int | None = None) -> ScoreMod:
    """s + m·(kv_idx − q_idx): a linear penalty on distance (negative for keys before the query). One slope m for
    every head, or with `heads` = H the paper's geometric slopes m_h = 2^(-8(h+1)/H) of head h (text
    "alibi:heads=H", kind "alibi-heads"); alibi() is the one-head slope 2^-8 (m_0 of H = 1)."""
    if heads is not None:
        if isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= 4096:
            raise SpecError(f"alibi(heads=H) needs a whole number 1 <= H <= 4096, got {heads!r}")

        def per_head(s, b, h, q, kv, theta):
            import sympy
            return s + sympy.Integer(2) ** (-sympy.Rational(8, heads) * (h + 1)) * (kv - q)
        text = f"ALiBi's linear bias $f(s) = s + m_h (j - i)$, head $h$'s slope $m_h = 2^{{-8(h+1)/{heads}}}$"
        return ScoreMod(f"alibi:heads={heads}", per_head, text, "alibi-heads", Fraction(heads), heads=heads)
    slope = _number("alibi slope", slope)
    text = "alibi" if slope == Fraction(1, 256) else f"alibi:{slope}"
    return ScoreMod(text, lambda s, b, h, q, kv, theta: s + _exact(slope) * (kv - q),
                    f"ALiBi's linear bias $f(s) = s + m (j - i)$ with slope $m = {slope}$", "alibi", slope)


def softcap(c) -> ScoreMod:
    """c·tanh(s/c): scores squashed smoothly into (−c, c) (Gemma 2, Grok)."""
    c = _number("softcap", c)

    def formula(s, b, h, q, kv, theta):
        import sympy
        return _exact(c) * sympy.tanh(s / _exact(c))
    return ScoreMod(f"softcap:{c}", formula, f"soft-capping $f(s) = c \\tanh(s/c)$ with $c = {c}$", "softcap", c)


def relative_bias(d: int) -> ScoreMod:
    """s + B[clip(kv_idx − q_idx, −d, d) + d]: a learned bias per relative distance, clipped at d (T5-like)."""
    if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 4096:
        raise SpecError(f"relative_bias(d) needs a whole number 0 <= d <= 4096, got {d!r}")
    table = ("B_rel", "Brel", "B", "brel", "B", ("n_rel",))  # a Param: API name, tensor, LaTeX names, dims

    def formula(s, b, h, q, kv, theta):
        import sympy
        return s + theta["B_rel"](sympy.Min(sympy.Max(kv - q, -d), d) + d)
    return ScoreMod(f"relative-bias:{d}", formula, f"a learned bias per distance $f(s) = s + B[\\mathrm{{clip}}(j - i, "
                    f"-d, d) + d]$, $d = {d}$", "relative-bias", Fraction(d), (table,), (("n_rel", 2 * d + 1),))


def _number(name: str, value) -> Fraction:
    try:
        number = Fraction(str(value)) if not isinstance(value, Fraction) else value
    except (ValueError, ZeroDivisionError):
        raise SpecError(f"{name} must be a number such as 30 or 0.5, got {value!r}") from None
    if not 0 < abs(number) <= 10**6 or max(len(str(number.numerator)), len(str(number.denominator))) > 12:
        raise SpecError(f"{name} must be a positive number of at most 12 digits up to 1e6, got {value!r}")
    return number


def _exact(x: Fraction):
    import sympy
    return sympy.Rational(x.numerator, x.denominator)


_TEXT = re.compile(r"alibi(?::(?P<slope>[\d./]{1,25})|:heads=(?P<heads>\d{1,4}))?|softcap:(?P<cap>[\d./]{1,25})"
                   r"|relative-bias:(?P<d>\d{1,4})")


def parse(text: str) -> ScoreMod:
    """A score mod from its text: 'alibi', 'alibi:SLOPE', 'alibi:heads=H', 'softcap:C', 'relative-bias:D', or the
    text of a user's mod traced in this process ('user_1a2b3c4d' or the name it was given)."""
    if text.strip() in TRACED:
        return TRACED[text.strip()]
    match = _TEXT.fullmatch(text.strip())
    if not match:
        raise SpecError(f"unknown score mod {text.strip()!r}: use alibi, alibi:heads=H, softcap:C or relative-bias:D, "
                        f"or a score_mod function")
    if match.group("heads"):
        return alibi(heads=int(match.group("heads")))
    if match.group("cap"):
        return softcap(match.group("cap"))
    if match.group("d"):
        return relative_bias(int(match.group("d")))
    return alibi(match.group("slope") or Fraction(1, 256))


def mod_of(value) -> ScoreMod | None:
    """A ScoreMod from a ScoreMod, its text or a user's score_mod(score, b, h, q_idx, kv_idx) function (traced);
    None for 'none'."""
    if value is None or value == "none":
        return None
    if isinstance(value, ScoreMod):
        return value if value.kind == "user" else parse(value.text)
    if isinstance(value, str):
        return parse(value)
    if callable(value):
        return score_mod(value)
    raise SpecError(f"a score mod is symattn.mods.alibi(), softcap(c), relative_bias(d), its text or a "
                    f"score_mod(score, b, h, q_idx, kv_idx) function, got {type(value).__name__}")


def score_mod(fn, params: dict | None = None, name: str | None = None) -> ScoreMod:
    """A user's score_mod(score, b, h, q_idx, kv_idx) traced with SymPy symbols (see symattn.mods.ops for the
    operations). Learnable tables: close over `table(name, shape)` objects, or declare `params` = {name: shape}
    and take them as a sixth argument theta (theta["bias"][kv_idx - q_idx]). `name` replaces the hash in its text."""
    return _trace(fn, params, name)


# -- a user's score mod, traced ---------------------------------------------------------------------------------

#: Traced mods of this process by text, so a spec (which keeps the text) finds its mod again.
TRACED: dict[str, ScoreMod] = {}
SUPPORTED = ("+, -, *, /, ** and unary -; ops.exp, ops.exp2, ops.log, ops.tanh, ops.abs (or abs), "
             "ops.where(condition, a, b), ops.minimum, ops.maximum; comparisons <, <=, >, >=, ops.eq, ops.ne, joined by &, |, ~; indexing a "
             "symattn.mods.table")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{0,23}")
_RESERVED = {"q", "k", "v", "W_a", "U_a", "v_a", "b_a", "tau", "B_rel"}  # gradient keys of the library


def _is_symbolic(*xs) -> bool:
    return any(type(x).__module__.startswith("sympy") for x in xs)


class ops:  # noqa: N801 - a namespace: from symattn.mods import ops
    """The operations a score mod may use: on SymPy symbols (tracing) and on NumPy arrays or numbers."""

    @staticmethod
    def exp(x):
        import numpy as np
        return __import__("sympy").exp(x) if _is_symbolic(x) else np.exp(x)

    @staticmethod
    def log(x):
        import numpy as np
        return __import__("sympy").log(x) if _is_symbolic(x) else np.log(x)

    @staticmethod
    def exp2(x):
        import numpy as np
        return 2 ** x if _is_symbolic(x) else np.exp2(x)

    @staticmethod
    def tanh(x):
        import numpy as np
        return __import__("sympy").tanh(x) if _is_symbolic(x) else np.tanh(x)

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
                        tuple(sympy.lambdify(self.symbols[1:], ix, "numpy") for ix in e.indices),
                        sympy.lambdify(args, derivative(frozen, u).xreplace({v: k for k, v in held.items()}),
                                       "numpy")) for e, u in held.items())
        return (sympy.lambdify(args, expr, "numpy"),
                sympy.lambdify(args, derivative(expr, self.symbols[0]), "numpy"), leaves)


def _in_range(t: Table, entry) -> tuple:
    """The entry's indices, checked against the table's shape where they are numbers."""
    for ix, n in zip(entry.indices, t.shape):
        if ix.is_number and not (ix.is_integer and 0 <= ix < n):
            raise SpecError(f"score mod reads {t.name}[{', '.join(map(str, entry.indices))}], outside the "
                            f"table's {t.shape} (an index must be a whole number 0..{n - 1})")
    return entry.indices


def _trace(fn, params, name) -> ScoreMod:
    import sympy
    from .mathtext import user_mod_description
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
    expr = _checked(expr, label, symbols, tables)
    digest = hashlib.sha256((sympy.srepr(expr) + repr(tables)).encode()).hexdigest()[:8]
    text = _text(name, digest)
    declared = tuple((t.name, f"th{t.name}", rf"\theta_{{\mathrm{{{t.name}}}}}", f"th{t.name}",
                      rf"\theta^{{\mathrm{{{t.name}}}}}", _dims(t)) for t in tables)
    sizes = tuple((dim, n) for t in tables for dim, n in zip(_dims(t), t.shape))
    traced = Trace(expr, symbols, tables)
    mod = ScoreMod(text, traced.formula, user_mod_description(expr, symbols, tables, label), "user",
                   declared=declared, sizes=sizes, trace=traced)
    try:
        mod.params  # declares the tables' tensors: a name used before with another rank is refused here
    except ValueError as e:
        raise SpecError(f"score_mod {label!r}: {e}") from None
    if TRACED.get(text, mod).trace.expr != expr:
        raise SpecError(f"score mod name {text!r} is taken by another traced mod; give another name")
    TRACED[text] = mod
    return mod


def _dims(t: Table) -> tuple[str, ...]:
    from .tensors import declare_dim
    dims = (f"n_{t.name}",) if len(t.shape) == 1 else (f"n_{t.name}_0", f"n_{t.name}_1")
    for axis, dim in enumerate(dims):
        declare_dim(dim, axis)
    return dims


def _text(name, digest: str) -> str:
    if name is None:
        return "user_" + digest
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name) or name == "none":
        raise SpecError(f"a score mod name is a lower-case letter then letters, digits or _, got {name!r}")
    try:
        parse(name)
    except SpecError:
        return name
    if name not in TRACED:
        raise SpecError(f"score mod name {name!r} is a library mod's text; give another name")
    return name


def _failing_line(error: Exception, fn) -> str:
    """'at `<source line>`: ' of the user's function where tracing failed ('' when not found)."""
    import linecache
    import traceback
    code = getattr(fn, "__code__", None)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if code is not None and f.filename ==
              code.co_filename]
    line = linecache.getline(frames[-1].filename, frames[-1].lineno).strip() if frames else ""
    return f"at `{line}`: " if line else ""


def _checked(expr, label: str, symbols, tables):
    """The traced result as an exact SymPy expression built from supported operations only."""
    import sympy
    from sympy.logic import boolalg
    if isinstance(expr, (bool, sympy.logic.boolalg.Boolean)) or not isinstance(expr, (int, float, sympy.Expr)):
        raise SpecError(f"score_mod {label!r} returned {type(expr).__name__}, not a score: a score mod returns the "
                        f"new score (use ops.where(condition, a, b) for a choice)")
    expr = sympy.sympify(expr)
    expr = expr.xreplace({f: sympy.Rational(repr(float(f))) for f in expr.atoms(sympy.Float)})
    allowed = (sympy.Symbol, sympy.Number, sympy.NumberSymbol, sympy.Add, sympy.Mul, sympy.Pow, sympy.exp,
               sympy.log, sympy.tanh, sympy.Abs, sympy.Min, sympy.Max, sympy.Piecewise, sympy.Indexed,
               sympy.IndexedBase, sympy.Tuple, sympy.core.relational.Relational, boolalg.And, boolalg.Or,
               boolalg.Not, boolalg.BooleanAtom, sympy.functions.elementary.piecewise.ExprCondPair)
    for node in sympy.preorder_traversal(expr):
        if node in (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
            raise SpecError(f"score_mod {label!r} gives {node}: mask keys with a mask_mod, not an infinite score")
        if not isinstance(node, allowed):
            raise SpecError(f"score_mod {label!r} uses {type(node).__name__}, which is not supported. "
                            f"Supported: {SUPPORTED}")
    unknown = {x for x in expr.free_symbols if not isinstance(x, sympy.Indexed)} - set(symbols) \
        - {sympy.Symbol(f"table_{t.name}") for t in tables}
    if unknown:
        raise SpecError(f"score_mod {label!r} depends on {sorted(map(str, unknown))}, not only on its arguments")
    return expr
