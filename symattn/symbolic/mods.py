"""Score mods as data: s' = f(s, b, h, q_idx, kv_idx; θ) (FlexAttention's score_mod), applied to any score.

Library: `alibi(slope)` (s + slope·(kv_idx − q_idx); the ALiBi paper's slope for a single head, 2^-8, by
default), `softcap(c)` (c·tanh(s/c)), `relative_bias(d)` (s + B[clip(kv_idx − q_idx, −d, d) + d], a learnable
table B of 2d + 1 entries). Each has a text form (`spec.score_mod`: "alibi", "softcap:30", "relative-bias:4")
that names files and rebuilds it from the command line. The derivative ∂f/∂s and ∂f/∂θ are derived by SymPy.
"""
from __future__ import annotations

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

    @property
    def params(self) -> tuple:
        """θ as symattn.symbolic.score.Param (declaring them registers their tensors; needs SymPy)."""
        from .score import Param
        return tuple(Param(*fields) for fields in self.declared)

    @property
    def tag(self) -> str:
        return self.text.replace(":", "").replace("relative-bias", "relbias").replace("/", "o").replace(".", "p")


def alibi(slope=Fraction(1, 256)) -> ScoreMod:
    """s + slope·(kv_idx − q_idx): a linear penalty on distance (negative for keys before the query)."""
    slope = _number("alibi slope", slope)
    text = "alibi" if slope == Fraction(1, 256) else f"alibi:{slope}"
    return ScoreMod(text, lambda s, b, h, q, kv, theta: s + _exact(slope) * (kv - q),
                    f"s + {slope}*(j - i): ALiBi's linear distance penalty", "alibi", slope)


def softcap(c) -> ScoreMod:
    """c·tanh(s/c): scores squashed smoothly into (−c, c) (Gemma 2, Grok)."""
    c = _number("softcap", c)

    def formula(s, b, h, q, kv, theta):
        import sympy
        return _exact(c) * sympy.tanh(s / _exact(c))
    return ScoreMod(f"softcap:{c}", formula, f"{c}*tanh(s/{c}): soft-capped scores", "softcap", c)


def relative_bias(d: int) -> ScoreMod:
    """s + B[clip(kv_idx − q_idx, −d, d) + d]: a learned bias per relative distance, clipped at d (T5-like)."""
    if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 4096:
        raise SpecError(f"relative_bias(d) needs a whole number 0 <= d <= 4096, got {d!r}")
    table = ("B_rel", "Brel", "B", "brel", "B", ("n_rel",))  # a Param: API name, tensor, LaTeX names, dims

    def formula(s, b, h, q, kv, theta):
        import sympy
        return s + theta["B_rel"](sympy.Min(sympy.Max(kv - q, -d), d) + d)
    return ScoreMod(f"relative-bias:{d}", formula, f"s + B[clip(j - i, -{d}, {d}) + {d}]: a learned bias per "
                    f"relative distance", "relative-bias", Fraction(d), (table,), (("n_rel", 2 * d + 1),))


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


_TEXT = re.compile(r"alibi(?::(?P<slope>[\d./]{1,25}))?|softcap:(?P<cap>[\d./]{1,25})|relative-bias:(?P<d>\d{1,4})")


def parse(text: str) -> ScoreMod:
    """A score mod from its text: 'alibi', 'alibi:SLOPE', 'softcap:C' or 'relative-bias:D'."""
    match = _TEXT.fullmatch(text.strip())
    if not match:
        raise SpecError(f"unknown score mod {text.strip()!r}: use alibi, softcap:C or relative-bias:D")
    if match.group("cap"):
        return softcap(match.group("cap"))
    if match.group("d"):
        return relative_bias(int(match.group("d")))
    return alibi(match.group("slope") or Fraction(1, 256))


def mod_of(value) -> ScoreMod | None:
    """A ScoreMod from a ScoreMod or its text; None for 'none'."""
    if value is None or value == "none":
        return None
    if isinstance(value, ScoreMod):
        return parse(value.text)
    if isinstance(value, str):
        return parse(value)
    raise SpecError(f"a score mod is symattn.mods.alibi(), softcap(c), relative_bias(d) or its text, "
                    f"got {type(value).__name__}")
