"""Score mods as data: s' = f(s, b, h, q_idx, kv_idx; θ) (FlexAttention's score_mod), applied to any score.

Library: `alibi(slope)` (s + slope·(kv_idx − q_idx), slope 2^-8 by default; `heads=H`: the paper's m_h =
2^(-8(h+1)/H) of head h), `softcap(c)` (c·tanh(s/c)), `relative_bias(d)` (s + B[clip(kv_idx − q_idx, −d, d) + d],
a table of 2d + 1 entries). Text forms ("alibi", "softcap:30", "relative-bias:4") name files; ∂f by SymPy.

A user's own score_mod(score, b, h, q_idx, kv_idx), written with +, -, *, /, ** and the operations of `ops`
(exp, log, tanh, abs, where, minimum, maximum, comparisons) and indexing a declared `table`, is traced with
SymPy symbols by `score_mod(fn)` (the tracing: symattn.symbolic.usermods): the expression names it (a short hash)
and is differentiated like the library's.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

from ..errors import SpecError
from .usermods import SUPPORTED, Table, Trace, ops, table, trace as _traced  # noqa: F401 - symattn.mods's names

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
    table = ("B_rel", "Brel", r"B_{\mathrm{rel}}", "brel", r"b^{\mathrm{rel}}", ("n_rel",))  # API name, tensor, LaTeX, dims

    def formula(s, b, h, q, kv, theta):
        import sympy
        return s + theta["B_rel"](sympy.Min(sympy.Max(kv - q, -d), d) + d)
    return ScoreMod(f"relative-bias:{d}", formula, f"a learned bias per distance $f(s) = s + B_{{\\mathrm{{rel}}}}[\\mathrm{{clip}}"
                    f"(j - i, -d, d) + d]$, $d = {d}$", "relative-bias", Fraction(d), (table,), (("n_rel", 2 * d + 1),))


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
    return _library(text.strip())


@functools.lru_cache(maxsize=64)
def _library(text: str) -> ScoreMod:
    """A library mod from its text, built once per text: the API resolves its score_mod on every call (ScoreMods
    are frozen, so one object serves every caller; building alibi's took ~15 µs of a variant call)."""
    match = _TEXT.fullmatch(text)
    if not match:
        raise SpecError(f"unknown score mod {text!r}: use alibi, alibi:heads=H, softcap:C or relative-bias:D, "
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


def check_heads(mod: ScoreMod | None, heads: int, what: str, fix: str) -> None:
    """A per-head mod (ALiBi with one slope per head) used by a layer has one slope per layer head; `fix` spells
    the remedy for the caller (CLI text or Python call) with {heads} for the layer's count."""
    slopes = getattr(mod, "heads", 0) if mod is not None else 0
    if slopes and slopes != heads:
        raise SpecError(f"{what} has one slope per head of {slopes} heads, but the layer has {heads}: use "
                        + fix.format(heads=heads))


def score_mod(fn, params: dict | None = None, name: str | None = None) -> ScoreMod:
    """A user's score_mod(score, b, h, q_idx, kv_idx) traced with SymPy symbols (see symattn.mods.ops for the
    operations). Learnable tables: close over `table(name, shape)` objects, or declare `params` = {name: shape}
    and take them as a sixth argument theta (theta["bias"][kv_idx - q_idx]). `name` replaces the hash in its text."""
    return _trace(fn, params, name)


# -- a user's score mod, traced (symattn.symbolic.usermods), named and registered ---------------------------------

#: Traced mods of this process by text, so a spec (which keeps the text) finds its mod again.
TRACED: dict[str, ScoreMod] = {}


def _trace(fn, params, name) -> ScoreMod:
    from .mathtext import user_mod_description
    traced, label = _traced(fn, params)
    text = _text(name, traced.digest)
    mod = ScoreMod(text, traced.formula, user_mod_description(traced.expr, traced.symbols, traced.tables, label),
                   "user", declared=traced.declared(), sizes=traced.sizes(), trace=traced)
    try:
        mod.params  # declares the tables' tensors: a name used before with another rank is refused here
    except ValueError as e:
        raise SpecError(f"score_mod {label!r}: {e}") from None
    if TRACED.get(text, mod).trace.expr != traced.expr:
        raise SpecError(f"score mod name {text!r} is taken by another traced mod; give another name")
    TRACED[text] = mod
    return mod


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


