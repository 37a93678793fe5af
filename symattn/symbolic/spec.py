"""AttentionSpec: the frozen description every other stage derives from.

Sizes: queries n_q, keys n_k, key/query width d_k, value width d_v (default d_k).
Every file name, kernel name and document title comes from ``spec.name`` / ``spec.title``.
"""
from __future__ import annotations

import decimal
import functools
import hashlib
import math
import numbers
import re
from dataclasses import KW_ONLY, dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from ..errors import SizeTooLargeError, SpecError
from .fields import choice, mask_field, positive_int, short_repr, variant_args, variant_parts, variant_title
from .masks import Mask, mask_of
from .score_names import PARAMS, UNSCALED  # noqa: F401  (spec.PARAMS, spec.UNSCALED, as callers know them)
from .mods import ScoreMod, check_heads, mod_of

if TYPE_CHECKING:
    import sympy

#: The scores of symattn.symbolic.score by name (score_names.py, generated from SCORES there: their parameters'
#: names, the unscaled ones), SymPy-free.
SCORES = tuple(PARAMS)
MASKED_ROWS = ("zero", "uniform", "nan")
DTYPES = ("float32", "float64")

#: Explicit expansion limit on n_q·n_k·(d_k + d_v) scalar products (n = d = 8 is 1024).
EXPLICIT_LIMIT = 2048


def check_variant(spec, owner: str) -> None:
    """Validate and normalise the score fields of `spec` (an AttentionSpec or a MultiHeadSpec, its scale already
    parsed): score, hidden (the additive score's d_a), score_mod; errors name `owner`.field."""
    choice("score", spec.score, SCORES, owner)
    if spec.score == "additive":
        if spec.hidden is None:
            raise SpecError(f"{owner}.hidden (the additive score's d_a tanh units) is required with "
                            f"score='additive'")
        object.__setattr__(spec, "hidden", positive_int("hidden", spec.hidden, owner))
    elif spec.hidden is not None:
        raise SpecError(f"{owner}.hidden applies to score='additive' only, not {spec.score!r}")
    if spec.score in UNSCALED and spec.scale is not None:
        raise SpecError(f"{owner}.scale does not apply to score={spec.score!r} (it has no scale)")
    try:
        mod = mod_of(spec.score_mod)
    except SpecError as e:
        raise SpecError(f"{owner}.score_mod: {e}") from None
    object.__setattr__(spec, "score_mod", "none" if mod is None else mod.text)


#: The scale's bounds: a score scale outside them is a mistake (1/√d_k is 0.002–1 for d_k up to 250,000), and its
#: exact numerator and denominator stay small enough to print as kernel literals and file names.
SCALE_RANGE = (Fraction(1, 10**6), Fraction(10**6))
SCALE_DIGITS = 20
_SCALE_TEXT = re.compile(r"[+-]?(\d{1,40}(\.\d{0,40})?|\.\d{1,40})([eE][+-]?\d{1,12})?|\d{1,40}/\d{1,40}")


def _scale_fraction(value) -> Fraction:
    """Exact Fraction of a scale given as text, an int, a float, a Fraction or a NumPy real scalar;
    ValueError when it is not a finite real number. Text is checked by pattern first (no 10**huge work)."""
    if isinstance(value, str):
        text = value.strip()
        match = _SCALE_TEXT.fullmatch(text)
        if not match:
            raise ValueError
        if match.group(3) and abs(int(match.group(3)[1:])) > 99:  # 10**huge is slow: out of range anyway
            mantissa = Fraction(text[:match.start(3)])
            return mantissa * (Fraction(10) ** (100 if int(match.group(3)[1:]) > 0 else -100))
        return Fraction(text)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError
    if isinstance(value, numbers.Rational):
        return Fraction(int(value.numerator), int(value.denominator))
    value = float(value)
    if not math.isfinite(value):
        raise ValueError
    return Fraction(repr(value))  # 0.1 -> 1/10, not the binary expansion


def parse_scale(value, owner: str = "AttentionSpec") -> Fraction | None:
    """Exact positive scale from an int, float, Fraction or text such as '1/8' or '0.125', within SCALE_RANGE
    and with numerator and denominator of at most SCALE_DIGITS digits."""
    if value is None:
        return None
    low, high = SCALE_RANGE
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    try:
        scale = _scale_fraction(value)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        raise SpecError(f"{owner}.scale must be a positive finite number such as 0.5 or '1/8', got {shown}") from None
    if not low <= scale <= high:
        raise SpecError(f"{owner}.scale must be between 1e-6 and 1e6, got {shown}")
    if max(len(str(scale.numerator)), len(str(scale.denominator))) > SCALE_DIGITS:
        raise SpecError(f"{owner}.scale has too many digits: give at most {SCALE_DIGITS} significant digits "
                        f"(e.g. 0.08838834764831845) or a fraction p/q with p, q < 10^{SCALE_DIGITS}")
    return scale


def scale_tag(scale: Fraction | None) -> str:
    """File-name part of a scale: 'scale1o8', or a short hash where the digits would make the name long."""
    if scale is None:
        return ""
    tag = f"scale{scale.numerator}o{scale.denominator}"
    if len(tag) <= 24:
        return tag
    return "scale_" + hashlib.sha256(str(scale).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class AttentionSpec:
    """Sizes and options of one attention head.

    S_ij = s(q_i, k_j; θ) (n_q, n_k), P = row-softmax(S) (n_q, n_k), O = PV (n_q, d_v). score: 'dot'
    (scale·q_i·k_j), 'general' (scale·q_i W_a k_jᵀ, Luong) or 'additive' (v_aᵀ tanh(q_i W_a + k_j U_a + b_a),
    Bahdanau, with `hidden` = d_a units) or 'cosine' (tau·q̂_i·k̂_j, norms clamped at 1e-12; tau is the temperature).
    scale defaults to 1/√d_k, kept exact (not for additive or cosine).
    mask: 'none' or 'causal' (top-left aligned, key j visible to query i iff j ≤ i). masked_rows: policy for
    a query that sees no key ('zero', 'uniform'; 'nan' only without such a query), as in the numeric API
    (symbolic.keyless). dtype: kernel dtype.
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
    score: str = "dot"
    hidden: int | None = None
    score_mod: str = "none"

    def __post_init__(self):
        for name in ("n_q", "n_k", "d_k"):
            object.__setattr__(self, name, positive_int(name, getattr(self, name)))
        d_v = self.d_k if self.d_v is None else positive_int("d_v", self.d_v)
        object.__setattr__(self, "d_v", d_v)
        object.__setattr__(self, "scale", parse_scale(self.scale))
        object.__setattr__(self, "mask", mask_field(self.mask))
        choice("masked_rows", self.masked_rows, MASKED_ROWS)
        choice("dtype", self.dtype, DTYPES)
        check_variant(self, "AttentionSpec")

    def __repr__(self) -> str:
        return short_repr(self)

    # -- exact and numeric scale -------------------------------------------------
    @property
    def scale_exact(self) -> sympy.Expr:
        """The scale as an exact SymPy number (1/√d_k unless given)."""
        import sympy  # the only SymPy use here: loading cached kernels by spec stays SymPy-free
        if self.scale is None:
            return 1 / sympy.sqrt(self.d_k)
        return sympy.Rational(self.scale.numerator, self.scale.denominator)

    @property
    def scale_value(self) -> float:
        """The scale as a float, correctly rounded, without SymPy."""
        if self.scale is not None:
            return float(self.scale)
        with decimal.localcontext(prec=40):
            return float(1 / decimal.Decimal(self.d_k).sqrt())

    @property
    def causal(self) -> bool:
        return self.mask == "causal"

    @functools.cached_property
    def mod_object(self) -> ScoreMod | None:
        """The score mod (symattn.symbolic.mods), None for none."""
        return mod_of(self.score_mod)

    @functools.cached_property
    def mask_object(self) -> Mask | None:
        """The mask as an index predicate (symattn.symbolic.masks), None for no mask."""
        return None if self.mask == "none" else mask_of(self.mask)

    def visible(self, i: int, j: int) -> bool:
        """True when query i may attend to key j."""
        return True if self.mask_object is None else self.mask_object.visible(i, j)

    def mask_array(self):
        """The boolean (n_q, n_k) visibility array (True = may attend), for the numeric paths; None for none."""
        import numpy as np
        if self.mask_object is None:
            return None
        return np.array([[self.visible(i, j) for j in range(self.n_k)] for i in range(self.n_q)], dtype=bool)

    # -- sizes --------------------------------------------------------------------
    @property
    def sizes(self) -> dict[str, int]:
        sizes = {"n_q": self.n_q, "n_k": self.n_k, "d_k": self.d_k, "d_v": self.d_v}
        sizes |= {"d_a": self.hidden} if self.hidden else {}
        sizes |= {"one": 1} if self.score == "cosine" else {}  # the scalar temperature tau
        return sizes | dict(self.mod_object.sizes if self.mod_object else ())

    @property
    def score_work(self) -> int:
        """Multiply-adds of one score s_ij (the score's own count: d_k for the dot product)."""
        if self.score == "dot":
            return self.d_k
        from .score import SCORES  # the formulas need SymPy; the dot product's cost does not
        return SCORES[self.score].work(self.sizes)

    @property
    def explicit_cost(self) -> int:
        return self.n_q * self.n_k * (self.score_work + self.d_v)

    def check_explicit(self) -> None:
        """Raise SizeTooLargeError when the explicit (scalar-symbol) expansion would be too large."""
        if self.explicit_cost > EXPLICIT_LIMIT:
            raise SizeTooLargeError(
                f"n_q·n_k·(score work + d_v) = {self.explicit_cost} exceeds the explicit-expansion limit "
                f"{EXPLICIT_LIMIT} (the dot product's score work is d_k, the general score's d_k², the additive "
                f"score's 2·d_k·d_a; n_q = n_k = d_k = d_v = 8 is 1024); the indexed form holds at any size: "
                f"use derive(spec, explicit=False) or `symattn derive --indexed-only`, "
                f"and the loop kernels (symattn.attention) for numbers")

    # -- names --------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Deterministic identifier, e.g. 'attn_q3_k4_dk2_dv3_causal'."""
        parts = [f"attn_q{self.n_q}_k{self.n_k}_dk{self.d_k}_dv{self.d_v}", *variant_parts(self)]
        if self.scale is not None:
            parts.append(scale_tag(self.scale))
        return "_".join(parts)

    @property
    def title(self) -> str:
        scale = "" if self.scale is None else f", scale {self.scale}"
        kind = "Scaled dot-product attention" if self.score == "dot" else f"Attention with the {self.score} score"
        return (f"{kind} (n_q={self.n_q}, n_k={self.n_k}, d_k={self.d_k}, d_v={self.d_v}{variant_title(self)}"
                f"{scale})")

    def cli_args(self) -> str:
        """The CLI options that rebuild this spec."""
        args = f"--n-q {self.n_q} --n-k {self.n_k} --d-k {self.d_k} --d-v {self.d_v}" + variant_args(self)
        if self.scale is not None:
            args += f" --scale {self.scale}"
        return args


@dataclass(frozen=True)
class MultiHeadSpec:
    """A multi-head attention layer (self- or cross-attention, grouped-query heads).

    x (n_q, d_model) gives queries; y (n_k, d_model) gives keys and values (y = x for self-attention).
    w_q (d_model, h·d_k), w_k (d_model, h_kv·d_k), w_v (d_model, h_kv·d_v), w_o (h·d_v, d_model), optional
    biases. Head i uses columns i·d_k:(i+1)·d_k of w_q and key/value group ⌊i·h_kv/h⌋.
    output = Concat(head_0, ..., head_{h-1}) w_o (+ b_o).

    The variant is AttentionSpec's (same fields, same checks; `head` passes it on): score ('dot', 'general',
    'additive' with `hidden`, 'cosine'), score_mod, mask. Every head computes the same variant: the score's and
    the mod's parameters θ (W_a, U_a, v_a, b_a, tau, a relative-bias table, ...) are shared by all heads, so their
    gradient sums the heads' contributions; a score mod sees FlexAttention's h as the head index (alibi:heads=H
    with H = heads gives ALiBi's slope per head) and b = 0; the mask applies to every head.
    """

    n_q: int
    d_model: int
    heads: int
    _: KW_ONLY
    n_k: int | None = None
    kv_heads: int | None = None
    d_k: int | None = None
    d_v: int | None = None
    cross: bool = False
    bias: bool = False
    scale: Fraction | None = None
    mask: str = "none"
    score: str = "dot"
    hidden: int | None = None
    score_mod: str = "none"
    masked_rows: str = "zero"

    def __post_init__(self):
        name = "MultiHeadSpec"
        choice("masked_rows", self.masked_rows, MASKED_ROWS, name)
        for field_name in ("n_q", "d_model", "heads"):
            object.__setattr__(self, field_name, positive_int(field_name, getattr(self, field_name), name))
        kv = self.heads if self.kv_heads is None else positive_int("kv_heads", self.kv_heads, name)
        if self.heads % kv:
            raise SpecError(f"{name}.kv_heads must divide heads ({self.heads}), got {kv}")
        object.__setattr__(self, "kv_heads", kv)
        for width in ("d_k", "d_v"):
            value = getattr(self, width)
            if value is None:
                if self.d_model % self.heads:
                    raise SpecError(f"{name}.d_model ({self.d_model}) is not divisible by heads ({self.heads}): "
                                    f"choose heads dividing d_model, or give d_k and d_v per head")
                value = self.d_model // self.heads
            object.__setattr__(self, width, positive_int(width, value, name))
        n_k = self.n_q if self.n_k is None else positive_int("n_k", self.n_k, name)
        if not self.cross and n_k != self.n_q:
            raise SpecError(f"{name}.n_k ({n_k}) differs from n_q ({self.n_q}) in self-attention: use cross=True")
        object.__setattr__(self, "n_k", n_k)
        object.__setattr__(self, "scale", parse_scale(self.scale, name))
        object.__setattr__(self, "mask", mask_field(self.mask, name))
        check_variant(self, name)
        check_heads(self.mod_object, self.heads, f"{name}.score_mod {self.score_mod!r}", "alibi:heads={heads}")

    def __repr__(self) -> str:
        return short_repr(self)

    @functools.cached_property
    def head(self) -> AttentionSpec:
        """The single-head spec every head shares (sizes and variant)."""
        return AttentionSpec(self.n_q, self.n_k, self.d_k, self.d_v, scale=self.scale, mask=self.mask,
                             score=self.score, hidden=self.hidden, score_mod=self.score_mod,
                             masked_rows=self.masked_rows)

    def group(self, i: int) -> int:
        """Key/value group of head i: ⌊i·kv_heads/heads⌋."""
        return i * self.kv_heads // self.heads

    @property
    def causal(self) -> bool:
        return self.mask == "causal"

    @property
    def mod_object(self) -> ScoreMod | None:
        return self.head.mod_object

    @property
    def mask_object(self) -> Mask | None:
        return self.head.mask_object

    @property
    def scale_exact(self) -> sympy.Expr:
        return self.head.scale_exact

    @property
    def scale_value(self) -> float:
        return self.head.scale_value

    def visible(self, i: int, j: int) -> bool:
        return self.head.visible(i, j)

    @property
    def sizes(self) -> dict[str, int]:
        """The layer's sizes and the head's (d_a, a relative-bias table's n_rel, ...)."""
        h, g = self.heads, self.kv_heads
        return self.head.sizes | {
            "d_model": self.d_model, "h": h, "h_kv": g, "hd_k": h * self.d_k, "gd_k": g * self.d_k,
            "gd_v": g * self.d_v, "hd_v": h * self.d_v, "one": 1}

    @property
    def explicit_cost(self) -> int:
        """Scalar products of the expanded layer: projections plus every head's attention."""
        projections = (self.n_q + 2 * self.n_k) * self.d_model * self.heads * max(self.d_k, self.d_v) * 2
        return projections + self.heads * self.head.explicit_cost

    def check_explicit(self) -> None:
        if self.explicit_cost > 4 * EXPLICIT_LIMIT:
            raise SizeTooLargeError(
                f"the multi-head layer at these sizes needs {self.explicit_cost} scalar products, over the "
                f"explicit-expansion limit {4 * EXPLICIT_LIMIT} (e.g. n = 3, d_model = 4, h = 2); the indexed form "
                f"holds at any size: use derive_multihead(spec, explicit=False), and symattn.multihead_attention "
                f"for numbers")

    @property
    def name(self) -> str:
        parts = [f"mha_q{self.n_q}" + (f"_k{self.n_k}" if self.cross else ""),
                 f"dm{self.d_model}_h{self.heads}_kv{self.kv_heads}_dk{self.d_k}_dv{self.d_v}"]
        parts += [x for x, on in (("cross", self.cross), ("bias", self.bias)) if on]
        parts += variant_parts(self)
        if self.scale is not None:
            parts.append(scale_tag(self.scale))
        return "_".join(parts)

    @property
    def title(self) -> str:
        kind = "cross" if self.cross else "self"
        score = "" if self.score == "dot" else f", {self.score} score"
        return (f"Multi-head {kind}-attention (n_q={self.n_q}, n_k={self.n_k}, d_model={self.d_model}, "
                f"heads={self.heads}, kv_heads={self.kv_heads}, d_k={self.d_k}, d_v={self.d_v}"
                f"{', biases' if self.bias else ''}{score}{variant_title(self)})")

    def cli_args(self) -> str:
        args = f"--n-q {self.n_q} --d-model {self.d_model} --heads {self.heads} --kv-heads {self.kv_heads}"
        args += f" --d-k {self.d_k} --d-v {self.d_v}"
        if self.cross:
            args += f" --cross --n-k {self.n_k}"
        args += " --bias" * self.bias + variant_args(self)
        if self.scale is not None:
            args += f" --scale {self.scale}"
        return args
