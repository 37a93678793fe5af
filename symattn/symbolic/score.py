"""The score function as one symbolic piece: scaled dot product, score(q_i, k_j) = scale · q_i·k_j.

It contributes two forward steps (similarity, scaling) and the element formula the rest consumes.
Another score (additive, bilinear, cosine) would provide the same three things.
"""
from __future__ import annotations

import sympy

from .tensors import SIZES, TENSORS, SymbolTable, a, i, j
from .spec import AttentionSpec


def scale_symbolic(spec: AttentionSpec) -> sympy.Expr:
    """Scale in indexed formulas: 1/√d_k with d_k symbolic, or the spec's exact number."""
    return 1 / sympy.sqrt(SIZES["d_k"]) if spec.scale is None else spec.scale_exact


class ScaledDotProduct:
    """score(q_i, k_j) = scale · Σ_a q_{i,a} k_{j,a}."""

    name = "scaled dot product"
    # (key, title, explanation, tensor) of the two steps this score contributes.
    similarity = ("similarity", "Query-key similarities by dot product",
                  "Each query is compared with every key by a dot product over the d_k features.", "St")
    scaling = ("scaling", r"Scaling by 1/sqrt(d_k)",
               "The dot products are multiplied by the scale (1/sqrt(d_k) by default) so their variance does not grow with d_k.", "S")

    def indexed_similarity(self) -> sympy.Expr:
        Q, K = TENSORS["Q"].base, TENSORS["K"].base
        return sympy.Sum(Q[i, a] * K[j, a], (a, 0, SIZES["d_k"] - 1))

    def indexed_scaling(self, spec: AttentionSpec) -> sympy.Expr:
        return scale_symbolic(spec) * TENSORS["St"].base[i, j]

    def explicit_similarity(self, table: SymbolTable) -> sympy.Array:
        Q, K = table.matrix("Q"), table.matrix("K")  # (n_q, d_k), (n_k, d_k)
        return sympy.ImmutableDenseNDimArray((Q * K.T).tolist())  # (n_q, n_k)

    def explicit_scaling(self, spec: AttentionSpec, table: SymbolTable) -> sympy.Array:
        return spec.scale_exact * table["St"]  # (n_q, n_k)

    def matrix_form(self, spec: AttentionSpec) -> sympy.Eq:
        Q, K, S = (TENSORS[n].matrix_symbol() for n in ("Q", "K", "S"))
        return sympy.Eq(S, scale_symbolic(spec) * Q * K.T, evaluate=False)


SCORE = ScaledDotProduct()
