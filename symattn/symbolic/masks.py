"""Masks as data: which keys a query sees, as an index predicate (FlexAttention's mask_mod(b, h, q_idx, kv_idx)).

Library masks: `causal` (kv_idx <= q_idx), `sliding_window(w)` (causal and q_idx - kv_idx <= w: the query and
its w predecessors), `prefix_lm(p)` (kv_idx < p, the bidirectional prefix, or causal); `and_masks`, `or_masks`
compose them. Each has a text form (`spec.mask`: "causal", "window:3", "prefix:2", joined by '&' and '|') that
names files and rebuilds it from the command line. A user's mask_mod written with comparisons, &, | and ~ on
its indices is traced: called with Python ints it answers one pair, called with SymPy symbols it gives the
condition printed in the derivation. SymPy is imported only when a condition is asked for.
"""
from __future__ import annotations

import itertools
import operator
import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import SpecError

MaskMod = Callable[[object, object, object, object], object]  # (b, h, q_idx, kv_idx) -> bool / condition


@dataclass(frozen=True)
class Mask:
    """One mask: `text` names it ("window:3"), `mod(b, h, q_idx, kv_idx)` decides."""

    text: str
    mod: MaskMod = field(repr=False, compare=False)
    description: str = field(default="", repr=False, compare=False)

    def visible(self, i: int, j: int) -> bool:
        """True when query i may attend to key j."""
        return bool(self.mod(0, 0, i, j))

    def condition(self, i, j):
        """The predicate on symbolic indices (a SymPy Boolean)."""
        import sympy
        return sympy.sympify(self.mod(sympy.Integer(0), sympy.Integer(0), i, j))

    @property
    def tag(self) -> str:
        """File-name part: causal, window3, prefix2, causal_and_prefix2."""
        return self.text.replace(":", "").replace("&", "_and_").replace("|", "_or_")


def _causal(b, h, q, kv):
    return q >= kv


causal = Mask("causal", _causal, "key j is visible to query i only when j <= i")


def sliding_window(w: int) -> Mask:
    """Causal, and at most w keys back: query i sees keys i - w .. i."""
    w = _size("sliding_window(w)", w, minimum=0)
    return Mask(f"window:{w}", lambda b, h, q, kv: (q >= kv) & (q - kv <= w),
                f"query i sees keys i - {w} .. i (a causal sliding window)")


def prefix_lm(p: int) -> Mask:
    """The first p keys (the prefix) are seen by every query; the rest causally."""
    p = _size("prefix_lm(p)", p, minimum=1)
    return Mask(f"prefix:{p}", lambda b, h, q, kv: (kv < p) | (q >= kv),
                f"the first {p} keys (the prefix) are visible to every query, the others causally")


def and_masks(*masks: Mask) -> Mask:
    """Visible where every mask sees the key."""
    return _combine("&", operator.and_, masks, "and")


def or_masks(*masks: Mask) -> Mask:
    """Visible where any mask sees the key."""
    return _combine("|", operator.or_, masks, "or")


def _combine(symbol: str, op, masks, word: str) -> Mask:
    masks = tuple(mask_of(m) for m in masks)
    if not masks:
        raise SpecError(f"{word}_masks needs at least one mask")
    if symbol == "&" and any("|" in m.text for m in masks):
        raise SpecError("and_masks of an or_masks cannot be written as text; combine the other way round")

    def mod(b, h, q, kv):
        out = masks[0].mod(b, h, q, kv)
        for m in masks[1:]:
            out = op(out, m.mod(b, h, q, kv))
        return out
    return Mask(symbol.join(m.text for m in masks), mod, f" {word} ".join(m.description for m in masks))


def _size(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


_PART = re.compile(r"(causal|window:(\d{1,6})|prefix:(\d{1,6}))")


def parse(text: str) -> Mask:
    """A mask from its text: 'causal', 'window:W', 'prefix:P', joined by '&' (binds first) and '|'."""
    def one(part: str) -> Mask:
        match = _PART.fullmatch(part.strip())
        if not match:
            raise SpecError(f"unknown mask {part.strip()!r}: use causal, window:W or prefix:P, joined by & or |")
        if match.group(2) is not None:
            return sliding_window(int(match.group(2)))
        return prefix_lm(int(match.group(3))) if match.group(3) is not None else causal
    alternatives = [and_masks(*map(one, side.split("&"))) if "&" in side else one(side) for side in text.split("|")]
    return alternatives[0] if len(alternatives) == 1 else or_masks(*alternatives)


def mask_of(value) -> Mask:
    """A Mask from a Mask, its text, or a user's mask_mod(b, h, q_idx, kv_idx) (traced)."""
    if isinstance(value, Mask):
        return value
    if isinstance(value, str):
        return parse(value)
    if callable(value):
        return traced(value)
    raise SpecError(f"a mask is a Mask, its text ('causal', 'window:3', 'prefix:2') or a mask_mod function, "
                    f"got {type(value).__name__}")


def traced(mod: MaskMod, name: str | None = None) -> Mask:
    """A user's mask_mod as a Mask: its condition traced with SymPy symbols names it (a short hash)."""
    import hashlib

    import sympy
    b, h, q, kv = sympy.symbols("b h q_idx kv_idx", integer=True)
    try:
        condition = mod(b, h, q, kv)
        if not isinstance(condition, (sympy.logic.boolalg.Boolean, bool)):
            raise TypeError(f"it returned {type(condition).__name__}, not a condition")
    except Exception as e:  # whatever the function does with symbols it cannot
        raise SpecError(f"cannot trace mask_mod {getattr(mod, '__name__', mod)!r} with symbolic indices: {e}; "
                        f"write it with comparisons (<, <=, ==, ...), &, | and ~ on its arguments") from None
    for qi, kj in itertools.product(range(6), repeat=2):  # the traced condition must say what the ints say
        if bool(sympy.sympify(condition).subs({b: 0, h: 0, q: qi, kv: kj})) != bool(mod(0, 0, qi, kj)):
            raise SpecError(f"mask_mod {getattr(mod, '__name__', mod)!r} traces to {condition}, which disagrees with "
                            f"its value at q_idx={qi}, kv_idx={kj}; with symbols, == compares expressions: write "
                            f"sympy.Eq(a, b) (or (a <= b) & (a >= b)) for equality")
    text = name or "user_" + hashlib.sha256(sympy.srepr(condition).encode()).hexdigest()[:8]
    return Mask(text, mod, f"user mask: {condition}")
