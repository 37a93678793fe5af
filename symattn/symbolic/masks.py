"""Masks as data: which keys a query sees, as an index predicate (FlexAttention's mask_mod(b, h, q_idx, kv_idx)).

Library masks: `causal` (kv_idx <= q_idx), `sliding_window(w)` (causal and q_idx - kv_idx <= w: the query and
its w predecessors), `prefix_lm(p)` (kv_idx < p, the bidirectional prefix, or causal); `and_masks`, `or_masks`
compose them. Each has a text form (`spec.mask`: "causal", "window:3", "prefix:2", joined by '&' and '|') that
names files and rebuilds it from the command line. A user's mask_mod written with comparisons, &, | and ~ on
its indices is traced (usermasks.py): called with NumPy integers it answers one pair, called with SymPy symbols
it gives the condition printed in the derivation. SymPy is imported only when a condition is asked for.

Run-time masks take their data when made: `document(ids)` (query i sees key j iff ids[b, i] == ids[b, j], packed
sequences) and `key_padding(lengths)` (key j visible iff j < lengths[b]). The data travels in `Mask.arrays`, pairs
(name, int64 array (1 or B, n)); the condition reads it as IndexedBase(name)[b, index] with the symbol b.
Every mask also knows `span(b, i)`: the keys [lo, hi) query i can see at most (None: unbounded), from which
kernels take loop bounds and skip whole tiles; `exact` says the span is the mask (no per-entry test needed).
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import SpecError

MaskMod = Callable[[object, object, object, object], object]  # (b, h, q_idx, kv_idx) -> bool / condition
Span = Callable[[object, object], tuple]  # (b, q_idx) -> (lo, hi): the visible keys lie in [lo, hi); None: open


_ZERO = np.int64(0)


@dataclass(frozen=True)
class Mask:
    """One mask: `text` names it ("window:3"), `mod(b, h, q_idx, kv_idx)` decides."""

    text: str
    mod: MaskMod = field(repr=False, compare=False)
    description: str = field(default="", repr=False, compare=False)
    span: Span | None = field(default=None, repr=False, compare=False)  # None: every key may be visible
    exact: bool = field(default=False, repr=False, compare=False)  # the span is the mask
    arrays: tuple = field(default=(), repr=False, compare=False)  # ((name, int64 (1 or B, n)), ...) run-time data
    kernel_text: str = field(default="", repr=False, compare=False)  # text without run-time data ("" = text)

    def visible(self, i: int, j: int) -> bool:
        """True when query i may attend to key j (the mod called with NumPy integers, as on the reference's grids:
        with Python ints, a user's ~(i < j) would be ~False = -1, which is true)."""
        return bool(self.mod(_ZERO, _ZERO, np.int64(i), np.int64(j)))

    def condition(self, i, j):
        """The predicate on symbolic indices (a SymPy Boolean); b and h stay symbols (b, h integer)."""
        import sympy
        b, h = sympy.symbols("b h", integer=True)
        return sympy.sympify(self.mod(b, h, i, j))

    def bind(self, expr, b: int = 0):
        """`expr` with this mask's run-time reads name[b, k] (integer k) replaced by their values (for proofs and
        explicit forms, which need numbers)."""
        import sympy
        data = dict(self.arrays)

        def value(x):
            array = data[x.base.label.name]
            row = array[0 if array.shape[0] == 1 else b]
            return sympy.Integer(int(row[int(x.indices[1])]))
        return expr.replace(lambda x: isinstance(x, sympy.Indexed) and x.base.label.name in data
                            and x.indices[1].is_Integer, value)

    @property
    def kernel_tag(self) -> str:
        """File-name part of the kernels: like `tag`, without run-time data (one kernel serves any ids)."""
        return _tag(self.kernel_text or self.text)

    @property
    def tag(self) -> str:
        """File-name part: causal, window3, prefix2, causal_and_prefix2."""
        return _tag(self.text)


def _tag(text: str) -> str:
    return text.replace(":", "").replace("&", "_and_").replace("|", "_or_").replace("-", "_")


def _causal(b, h, q, kv):
    return q >= kv


causal = Mask("causal", _causal, "key $j$ is visible to query $i$ only when $j \\leq i$", lambda b, i: (0, i + 1),
              True)


def sliding_window(w: int) -> Mask:
    """Causal, and at most w keys back: query i sees keys i - w .. i."""
    w = _size("sliding_window(w)", w, minimum=0)
    return Mask(f"window:{w}", lambda b, h, q, kv: (q >= kv) & (q - kv <= w),
                f"query $i$ sees keys $i - {w}$ to $i$ (a causal sliding window)", lambda b, i: (i - w, i + 1), True)


def prefix_lm(p: int) -> Mask:
    """The first p keys (the prefix) are seen by every query; the rest causally."""
    p = _size("prefix_lm(p)", p, minimum=1)
    return Mask(f"prefix:{p}", lambda b, h, q, kv: (kv < p) | (q >= kv),
                f"the keys $j < {p}$ (the prefix) are visible to every query, the others causally ($j \\leq i$)",
                lambda b, i: (0, _max(p, i + 1)), True)


def document(ids) -> Mask:
    """Packed sequences: query i sees key j iff ids[b, i] == ids[b, j] (self-attention, n_q == n_k).
    ids: integer array (n,) or (B, n), one segment id per position; segments need not be sorted (the span of
    position i runs from the first to the last position of its id, so sorted ids skip the most)."""
    ids = _int_array("document(ids)", ids, ndim=(1, 2))
    ids = ids.reshape((1, -1)) if ids.ndim == 1 else ids  # (1 or B, n)
    lo, hi = _first_last(ids)
    digest = _digest(ids)

    def mod(b, h, q, kv):
        if _is_symbolic(b, q, kv):
            import sympy
            doc = sympy.IndexedBase("doc")
            return sympy.Eq(doc[b, q], doc[b, kv])
        row = ids[0 if ids.shape[0] == 1 else b]
        return bool(row[_position("document", q, row.size)] == row[_position("document", kv, row.size)])

    def span(b, i):
        import sympy
        return sympy.IndexedBase("doc_lo")[b, i], sympy.IndexedBase("doc_hi")[b, i]
    return Mask(f"document:{digest}", mod, "key $j$ is visible to query $i$ only when both lie in one document "
                "(segment ids given at run time)", span, False,
                (("doc", ids), ("doc_lo", lo), ("doc_hi", hi)), "document")


def key_padding(lengths, n: int | None = None) -> Mask:
    """Key j is visible iff j < lengths[b]: batch element b has lengths[b] real keys, the rest is padding.
    lengths: integer array (B,) (or a scalar for every b), each in 0..n (n checked here when given, else by
    the kernels against n_k)."""
    lengths = _int_array("key_padding(lengths)", lengths, ndim=(0, 1), counts=True)
    if lengths.size == 0:
        raise SpecError("key_padding(lengths): lengths is empty; give one length per batch element")
    if lengths.min() < 0 or (n is not None and lengths.max() > n):
        bad = lengths[(lengths < 0) | (lengths > (n if n is not None else lengths.max()))][0]
        raise SpecError(f"key_padding(lengths): every length must lie in 0..{'n' if n is None else n}, got {bad}")
    lengths = lengths.reshape((-1, 1))  # (1 or B, 1)
    digest = _digest(lengths)

    def mod(b, h, q, kv):
        if _is_symbolic(b, q, kv):
            import sympy
            return kv < sympy.IndexedBase("kv_len")[b, 0]
        return bool(kv < lengths[0 if lengths.shape[0] == 1 else b, 0])

    def span(b, i):
        import sympy
        return 0, sympy.IndexedBase("kv_len")[b, 0]
    return Mask(f"key-padding:{digest}", mod, "key $j$ is visible only when $j < \\ell_b$, the length of its batch "
                "element $b$ (given at run time)", span, True, (("kv_len", lengths),), "key-padding")


def _int_array(name: str, value, ndim: tuple, counts: bool = False) -> np.ndarray:
    """`value` as a C-contiguous int64 array, refused with SpecError unless integer typed with ndim in `ndim`.
    `counts`: the values are sizes, and one beyond int64 is refused (ids only compare equal or not, so uint64 ids
    wrap into int64 one-to-one)."""
    array = np.asarray(value)
    if array.size == 0:  # checked first: np.asarray([]) is float64, and "must hold integers" would mislead
        raise SpecError(f"{name} is empty (shape {array.shape})")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise SpecError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.ndim not in ndim:
        raise SpecError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {array.shape}")
    if array.ndim and array.shape[-1] == 0:
        raise SpecError(f"{name} is empty (shape {array.shape})")
    if counts and array.dtype.kind == "u" and array.max() > np.iinfo(np.int64).max:
        raise SpecError(f"{name} holds {array.max()}, beyond any sequence length")
    return np.array(array, dtype=np.int64, order="C", copy=True)  # the mask's own: the caller may change theirs


def _first_last(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, n) first position and last position + 1 of each position's id: its document's span of keys."""
    lo, hi = np.empty_like(ids), np.empty_like(ids)
    for z, row in enumerate(ids):
        _, inverse = np.unique(row, return_inverse=True)
        positions = np.arange(row.size)
        first = np.full(inverse.max() + 1, row.size)
        last = np.full(inverse.max() + 1, -1)
        np.minimum.at(first, inverse, positions)
        np.maximum.at(last, inverse, positions)
        lo[z], hi[z] = first[inverse], last[inverse] + 1
    return lo, hi


def _digest(array: np.ndarray) -> str:
    """Short hash of run-time data: the mask's text (and a spec's file names) differ when the data differ."""
    import hashlib
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()[:8]


def _position(name: str, index, n: int) -> int:
    if not 0 <= index < n:
        raise SpecError(f"{name} mask: index {index} is outside its {n} positions")
    return index


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

    names = [name for m in masks for name, _ in m.arrays]
    if len(set(names)) < len(names):
        raise SpecError(f"{word}_masks: two masks carry run-time arrays of one name ({', '.join(names)}); "
                        f"combine at most one document and one key_padding mask")

    def mod(b, h, q, kv):
        out = masks[0].mod(b, h, q, kv)
        for m in masks[1:]:
            out = op(out, m.mod(b, h, q, kv))
        return out
    spans = [m.span for m in masks]
    if symbol == "&":
        known = [s for s in spans if s is not None]
        span = None if not known else (lambda b, i: _intersect([s(b, i) for s in known]))
        exact = all(m.exact for m in masks)
    else:
        span = None if None in spans else (lambda b, i: _hull([s(b, i) for s in spans]))
        exact = len(masks) == 1 and masks[0].exact
    kernel = symbol.join(m.kernel_text or m.text for m in masks)
    return Mask(symbol.join(m.text for m in masks), mod, _combined_description(masks, word), span,
                exact, tuple(pair for m in masks for pair in m.arrays), kernel)


def _combined_description(masks, word: str) -> str:
    """'key $j$ is visible to query $i$ when both hold: (a) $j \\leq i$; and (b) ...': each part's own sentence, its
    opening 'key $j$ is visible to query $i$ (only) when' said once; an or numbers its parts (1), (2), so an or of
    ands reads unambiguously. One mask keeps its own description."""
    if len(masks) == 1:
        return masks[0].description
    letters = word == "and" and len(masks) <= 26
    labels = [chr(ord("a") + n) if letters else str(n + 1) for n in range(len(masks))]
    count = {"and": ("both hold", "all hold"), "or": ("either holds", "at least one holds")}[word][len(masks) > 2]
    parts = [f"({label}) {_condition(m.description)}" for label, m in zip(labels, masks)]
    return f"{_VISIBLE}when {count}: " + "; ".join(parts[:-1]) + f"; {word} " + parts[-1]


_VISIBLE = "key $j$ is visible to query $i$ "


def _condition(description: str) -> str:
    """A mask's description as a condition on (i, j): without the opening that the combined sentence says."""
    for opening in (_VISIBLE + "only when ", _VISIBLE + "when "):
        if description.startswith(opening):
            return description[len(opening):]
    return description


def _is_symbolic(*xs) -> bool:
    return any(type(x).__module__.startswith("sympy") for x in xs)


def _max(*xs):
    """max of ints or SymPy expressions; None (open) is ignored."""
    xs = [x for x in xs if x is not None]
    if _is_symbolic(*xs):
        import sympy
        return sympy.Max(*xs)
    return max(xs)


def _min(*xs):
    xs = [x for x in xs if x is not None]
    if _is_symbolic(*xs):
        import sympy
        return sympy.Min(*xs)
    return min(xs)


def _intersect(spans) -> tuple:
    """[lo, hi) of keys every span allows; a None bound is open."""
    los, his = [lo for lo, _ in spans if lo is not None], [hi for _, hi in spans if hi is not None]
    return (_max(*los) if los else None), (_min(*his) if his else None)


def _hull(spans) -> tuple:
    """The smallest [lo, hi) holding every span; one open bound opens it."""
    los, his = [lo for lo, _ in spans], [hi for _, hi in spans]
    return (None if None in los else _min(*los)), (None if None in his else _max(*his))


def _size(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


#: The masks with a text form (`--mask`, AttentionSpec(mask="...")): name -> (the form and its meaning, the mask
#: (no number) or the function of the form's number). A library mask added here parses, shows in `--mask`'s help
#: and in the error for an unknown mask.
TEXT_FORMS: dict[str, tuple[str, object]] = {
    "causal": ("causal", causal),
    "window": ("window:W (causal, W keys back)", sliding_window),
    "prefix": ("prefix:P (first P keys seen by all, then causal)", prefix_lm),
}


def text_forms_help() -> str:
    """The text forms, for help and errors: 'causal, window:W (causal, W keys back), ...'."""
    return ", ".join(form for form, _ in TEXT_FORMS.values())


def parse(text: str) -> Mask:
    """A mask from its text: TEXT_FORMS ('causal', 'window:W', 'prefix:P'), joined by '&' (binds first) and '|'."""
    shown = text if len(text) <= 60 else text[:57] + "..."
    forms = ", ".join(f.split(" ")[0] for f, _ in TEXT_FORMS.values())

    def one(part: str) -> Mask:
        name, colon, number = part.strip().partition(":")
        form = TEXT_FORMS.get(name)
        takes_number = form is not None and not isinstance(form[1], Mask)
        if not part.strip():
            raise SpecError(f"mask {shown!r} has an empty part: use {forms}, joined by & or |")
        if form is None or bool(colon) != takes_number:
            raise SpecError(f"unknown mask {part.strip()[:40]!r} in {shown!r}: use {forms}, joined by & or |")
        if takes_number and not re.fullmatch(r"[0-9]{1,6}", number):
            raise SpecError(f"mask {part.strip()[:40]!r}: {name}: takes a whole number of at most 6 digits (0-9)")
        return form[1](int(number)) if takes_number else form[1]
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
    """A user's mask_mod as a Mask, traced with SymPy symbols and checked (symattn.symbolic.usermasks)."""
    from .usermasks import trace
    text, description = trace(mod, name)
    return Mask(text, mod, description)
