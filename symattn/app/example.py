"""The worked example of `symattn run`: a sentence, exact token embeddings and projections.

The shipped default (data/default.json) covers "The cat sat on the mat" with d_model = d_k = d_v = 4.
Other words and sizes get deterministic embeddings/projections from a SHA-256 of their name, with entries
in {-1, -1/2, 0, 1/2, 1}, so every run of the same options gives the same numbers; so do the parameters θ of
a variant's score or score mod (W_a, U_a, v_a, b_a, a relative-bias table), from their name and shape.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources

import numpy as np
import sympy

from ..errors import SymattnError

_STEPS = (-1, Fraction(-1, 2), 0, Fraction(1, 2), 1)


def _default() -> dict:
    return json.loads(resources.files("symattn.app").joinpath("data/default.json").read_text())


def default_sentence() -> str:
    """The worked example's sentence when none is given ("The cat sat on the mat")."""
    return _default()["sentence"]


def _hashed(name: str, count: int) -> list[sympy.Rational]:
    """`count` deterministic entries from SHA-256 of `name`."""
    digest = b""
    while len(digest) < count:
        digest += hashlib.sha256(f"{name}/{len(digest)}".encode()).digest()
    return [sympy.Rational(_STEPS[byte % len(_STEPS)]) for byte in digest[:count]]


def _rational_matrix(rows) -> sympy.ImmutableMatrix:
    return sympy.ImmutableMatrix([[sympy.Rational(Fraction(x)) for x in row] for row in rows])


@dataclass(frozen=True)
class Example:
    """Tokens and exact Q (n, d_k), K (n, d_k), V (n, d_v); with embeddings, also X (n, d_model) and the
    projections W_Q (d_model, d_k), W_K, W_V (d_model, d_v) they came from, and W_O (d_v, d_model) of the
    two-head layer. An inputs file may give Q, K, V directly (then X and the projections are None)."""

    tokens: tuple[str, ...]
    query: int  # index of the query token shown in detail
    Q: sympy.ImmutableMatrix
    K: sympy.ImmutableMatrix
    V: sympy.ImmutableMatrix
    X: sympy.ImmutableMatrix | None = None
    W_Q: sympy.ImmutableMatrix | None = None
    W_K: sympy.ImmutableMatrix | None = None
    W_V: sympy.ImmutableMatrix | None = None
    W_O: sympy.ImmutableMatrix | None = None
    source: str = "the shipped default"  # where the numbers came from, for the narration

    @classmethod
    def from_embeddings(cls, tokens, query: int, X, W_Q, W_K, W_V, W_O=None, source: str = "the shipped default"):
        """Q = X W_Q, K = X W_K, V = X W_V (exact)."""
        return cls(tuple(tokens), query, X * W_Q, X * W_K, X * W_V, X, W_Q, W_K, W_V, W_O, source)


def query_index(tokens, query: str | None) -> int:
    """Index of the first token equal to `query` (ignoring case); the first token when `query` is None."""
    if query is None:
        return 0
    lowered = [t.lower() for t in tokens]
    if query.lower() not in lowered:
        raise SymattnError(f"query token {query!r} is not in the sentence {' '.join(tokens)!r}")
    return lowered.index(query.lower())


def example(sentence: str | None = None, *, query: str | None = None, d_model: int = 4, d_k: int = 4,
            d_v: int | None = None) -> Example:
    """Build the example for `sentence` (whitespace tokens; default "The cat sat on the mat")."""
    data = _default()
    d_v = d_k if d_v is None else d_v
    tokens = tuple((data["sentence"] if sentence is None else sentence).split())
    if not tokens:
        raise SymattnError("the sentence has no tokens: give at least one word")
    query = data["query"] if query is None and sentence is None else (query or tokens[0])
    lowered = [t.lower() for t in tokens]
    shipped = d_model == data["d_model"] and d_k == d_v == data["d_model"]
    vocab = data["embeddings"] if d_model == data["d_model"] else {}
    X = sympy.ImmutableMatrix([[sympy.Rational(Fraction(x)) for x in vocab[w]] if w in vocab
                               else _hashed(f"embedding/{w}", d_model) for w in lowered])

    def projection(name: str, width: int):
        if shipped:
            return _rational_matrix(data[name])
        return sympy.ImmutableMatrix(d_model, width, _hashed(f"{name}/{d_model}x{width}", d_model * width))

    W_O = _rational_matrix(data["W_O"]) if shipped else sympy.ImmutableMatrix(
        d_v, d_model, _hashed(f"W_O/{d_v}x{d_model}", d_v * d_model))
    source = "the shipped default" if sentence is None else "deterministic example values"
    return Example.from_embeddings(tokens, query_index(tokens, query), X, projection("W_Q", d_k),
                                   projection("W_K", d_k), projection("W_V", d_v), W_O, source)


def parameters(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Exact deterministic values of a variant's parameters θ, keyed like `shapes` (parameter name -> shape):
    object arrays of sympy.Rational entries in {-1, -1/2, 0, 1/2, 1}, from a SHA-256 of the name and shape."""
    values = {}
    for name, shape in shapes.items():
        count = int(np.prod(shape, dtype=int))
        values[name] = np.array(_hashed(f"{name}/{'x'.join(map(str, shape))}", count), dtype=object).reshape(shape)
    if "tau" in values:  # a temperature: positive (cosine similarities times 2 span [-2, 2])
        values["tau"] = np.full(values["tau"].shape, sympy.Integer(2), dtype=object)
    return values
