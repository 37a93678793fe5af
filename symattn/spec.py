"""AttentionSpec: the frozen description every other stage derives from.

Sizes: queries n_q, keys n_k, key/query width d_k, value width d_v (default d_k).
Every file name, kernel name and document title comes from ``spec.name`` / ``spec.title``.
"""
from __future__ import annotations

import math
import operator
from dataclasses import KW_ONLY, dataclass
from fractions import Fraction

import sympy

from .errors import SizeTooLargeError, SpecError

MASKS = ("none", "causal")
MASKED_ROWS = ("zero", "uniform", "nan")
DTYPES = ("float32", "float64")

#: Explicit expansion limit on n_q·n_k·(d_k + d_v) scalar products (n = d = 8 is 1024).
EXPLICIT_LIMIT = 2048


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise SpecError(f"AttentionSpec.{name} must be a positive integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise SpecError(f"AttentionSpec.{name} must be a positive integer, got {value!r}") from None
    if number <= 0:
        raise SpecError(f"AttentionSpec.{name} must be a positive integer, got {number}")
    return number


def _choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SpecError(f"AttentionSpec.{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def parse_scale(value) -> Fraction | None:
    """Exact positive scale from an int, float, Fraction or text such as '1/8' or '0.125'."""
    if value is None:
        return None
    try:
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError
            value = repr(value)  # 0.1 -> 1/10, not the binary expansion
        scale = Fraction(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise SpecError(f"AttentionSpec.scale must be a positive finite number such as 0.5 or '1/8', got {value!r}") from None
    if scale <= 0:
        raise SpecError(f"AttentionSpec.scale must be positive, got {scale}")
    return scale


@dataclass(frozen=True)
class AttentionSpec:
    """Sizes and options of one scaled-dot-product attention.

    S = scale·QKᵀ (n_q, n_k), P = row-softmax(S) (n_q, n_k), O = PV (n_q, d_v).
    scale defaults to 1/√d_k, kept exact. mask: 'none' or 'causal' (top-left aligned,
    key j visible to query i iff j ≤ i). masked_rows: policy for fully masked rows in
    the numeric API ('zero', 'uniform', 'nan'). dtype: kernel dtype.
    """

    n_q: int
    n_k: int
    d_k: int
    d_v: int | None = None
    _: KW_ONLY
    scale: Fraction | None = None
    mask: str = "none"
    masked_rows: str = "zero"
    dtype: str = "float64"

    def __post_init__(self):
        for name in ("n_q", "n_k", "d_k"):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        d_v = self.d_k if self.d_v is None else _positive_int("d_v", self.d_v)
        object.__setattr__(self, "d_v", d_v)
        object.__setattr__(self, "scale", parse_scale(self.scale))
        _choice("mask", self.mask, MASKS)
        _choice("masked_rows", self.masked_rows, MASKED_ROWS)
        _choice("dtype", self.dtype, DTYPES)

    # -- exact and numeric scale -------------------------------------------------
    @property
    def scale_exact(self) -> sympy.Expr:
        """The scale as an exact SymPy number (1/√d_k unless given)."""
        if self.scale is None:
            return 1 / sympy.sqrt(self.d_k)
        return sympy.Rational(self.scale.numerator, self.scale.denominator)

    @property
    def scale_value(self) -> float:
        return float(self.scale_exact)

    @property
    def causal(self) -> bool:
        return self.mask == "causal"

    def visible(self, i: int, j: int) -> bool:
        """True when query i may attend to key j."""
        return j <= i if self.causal else True

    # -- sizes --------------------------------------------------------------------
    @property
    def sizes(self) -> dict[str, int]:
        return {"n_q": self.n_q, "n_k": self.n_k, "d_k": self.d_k, "d_v": self.d_v}

    @property
    def explicit_cost(self) -> int:
        return self.n_q * self.n_k * (self.d_k + self.d_v)

    def check_explicit(self) -> None:
        """Raise SizeTooLargeError when the explicit (scalar-symbol) expansion would be too large."""
        if self.explicit_cost > EXPLICIT_LIMIT:
            raise SizeTooLargeError(
                f"n_q·n_k·(d_k+d_v) = {self.explicit_cost} exceeds the explicit-expansion limit {EXPLICIT_LIMIT} "
                f"(e.g. n_q = n_k = d_k = d_v = 8 is 1024); the indexed form holds at any size: "
                f"use derive(spec, explicit=False) or `symattn derive --indexed-only`, "
                f"and the loop kernels (symattn.attention) for numbers")

    # -- names --------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Deterministic identifier, e.g. 'attn_q3_k4_dk2_dv3_causal'."""
        parts = [f"attn_q{self.n_q}_k{self.n_k}_dk{self.d_k}_dv{self.d_v}"]
        if self.causal:
            parts.append("causal")
        if self.scale is not None:
            parts.append(f"scale{self.scale.numerator}o{self.scale.denominator}")
        return "_".join(parts)

    @property
    def title(self) -> str:
        mask = ", causal mask" if self.causal else ""
        scale = "" if self.scale is None else f", scale {self.scale}"
        return f"Scaled dot-product attention (n_q={self.n_q}, n_k={self.n_k}, d_k={self.d_k}, d_v={self.d_v}{mask}{scale})"

    def cli_args(self) -> str:
        """The CLI options that rebuild this spec."""
        args = f"--n-q {self.n_q} --n-k {self.n_k} --d-k {self.d_k} --d-v {self.d_v}"
        if self.causal:
            args += " --causal"
        if self.scale is not None:
            args += f" --scale {self.scale}"
        return args
