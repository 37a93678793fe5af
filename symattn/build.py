"""Symbols of the attention equations at two levels.

*explicit*: matrices of scalar symbols at the spec's sizes (q_{0,1}, ...), the ground truth for proofs;
*indexed*: IndexedBase objects with symbolic indices and sizes, valid for any size.
Each tensor (Q, K, V, S, P, O, dO, ...) is declared once in TENSORS with its shape and LaTeX name.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import sympy

from .spec import AttentionSpec

# Symbolic sizes and indices used by every indexed formula.
SIZES = {name: sympy.Symbol(name, integer=True, positive=True) for name in ("n_q", "n_k", "d_k", "d_v")}
i, j, l, a, b = sympy.symbols("i j l a b", integer=True, nonnegative=True)
INDEX_OF_DIM = {"n_q": i, "n_k": j, "d_k": a, "d_v": b}


@dataclass(frozen=True)
class Tensor:
    """One named tensor of the derivation: code name, LaTeX name, element name, dims."""

    name: str  # identifier used in code: "dQ"
    latex: str  # LaTeX of the whole tensor: r"\mathrm{d}Q"
    elem: str  # plain element base: "dq"
    elem_latex: str  # LaTeX element base: r"\mathrm{d}q"
    dims: tuple[str, ...]  # size names: ("n_q", "d_k")

    @cached_property
    def label(self) -> sympy.Symbol:
        return sympy.Symbol(self.name)

    @cached_property
    def base(self) -> sympy.IndexedBase:
        return sympy.IndexedBase(self.label)

    def matrix_symbol(self) -> sympy.MatrixSymbol:
        rows = SIZES[self.dims[0]]
        cols = SIZES[self.dims[1]] if len(self.dims) > 1 else 1
        return sympy.MatrixSymbol(self.name, rows, cols)

    def shape(self, spec: AttentionSpec) -> tuple[int, ...]:
        return tuple(spec.sizes[d] for d in self.dims)


def _t(name, latex, elem, elem_latex, *dims):
    return Tensor(name, latex, elem, elem_latex, tuple(dims))


TENSORS: dict[str, Tensor] = {t.name: t for t in (
    _t("Q", "Q", "q", "q", "n_q", "d_k"),
    _t("K", "K", "k", "k", "n_k", "d_k"),
    _t("V", "V", "v", "v", "n_k", "d_v"),
    _t("St", r"\tilde{S}", "st", r"\tilde{s}", "n_q", "n_k"),
    _t("S", "S", "s", "s", "n_q", "n_k"),
    _t("P", "P", "p", "p", "n_q", "n_k"),
    _t("Vt", r"\tilde{V}", "vt", r"\tilde{v}", "n_q", "n_k", "d_v"),
    _t("O", "O", "o", "o", "n_q", "d_v"),
    _t("dO", r"\mathrm{d}O", "do", r"\mathrm{d}o", "n_q", "d_v"),
    _t("dV", r"\mathrm{d}V", "dv", r"\mathrm{d}v", "n_k", "d_v"),
    _t("dP", r"\mathrm{d}P", "dp", r"\mathrm{d}p", "n_q", "n_k"),
    _t("J", "J", "J", "J", "n_q", "n_k", "n_k"),
    _t("D", "D", "D", "D", "n_q"),
    _t("dS", r"\mathrm{d}S", "ds", r"\mathrm{d}s", "n_q", "n_k"),
    _t("dQ", r"\mathrm{d}Q", "dq", r"\mathrm{d}q", "n_q", "d_k"),
    _t("dK", r"\mathrm{d}K", "dk", r"\mathrm{d}k", "n_k", "d_k"),
)}


def shape_of(array: sympy.NDimArray) -> tuple[int, ...]:
    """Shape as Python ints (immutable SymPy arrays keep a SymPy Tuple of Integers)."""
    return tuple(int(n) for n in array.shape)


def flat(array: sympy.NDimArray) -> list:
    """Entries of an array in row-major order (iterating an NDimArray yields sub-arrays)."""
    return list(array.reshape(len(array))) if array.rank() != 1 else list(array)


class SymbolTable:
    """Explicit element symbols of every tensor at one spec's sizes, and their LaTeX names."""

    def __init__(self, spec: AttentionSpec):
        self.spec = spec
        self.latex_names: dict[sympy.Basic, str] = {}
        self._arrays: dict[str, sympy.Array] = {}
        self._where: dict[sympy.Symbol, tuple[str, tuple[int, ...]]] = {}
        for tensor in TENSORS.values():
            self.latex_names[tensor.label] = tensor.latex

    def __getitem__(self, name: str) -> sympy.ImmutableDenseNDimArray:
        """Array of element symbols of tensor `name` (shape from the spec)."""
        if name not in self._arrays:
            self._arrays[name] = self._make(TENSORS[name])
        return self._arrays[name]

    def matrix(self, name: str) -> sympy.ImmutableMatrix:
        """Rank-2 (or column-vector) view of a tensor's element symbols."""
        array = self[name]
        return sympy.ImmutableMatrix(array.tolist() if array.rank() == 2 else [[x] for x in array])

    def where(self, symbol: sympy.Symbol) -> tuple[str, tuple[int, ...]]:
        """(tensor name, index) of an element symbol."""
        return self._where[symbol]

    def _make(self, tensor: Tensor) -> sympy.ImmutableDenseNDimArray:
        shape = tensor.shape(self.spec)
        flat = []
        for index in itertools.product(*(range(n) for n in shape)):
            sub = ",".join(map(str, index))
            symbol = sympy.Symbol(f"{tensor.elem}_{{{sub}}}", real=True)
            self.latex_names[symbol] = f"{tensor.elem_latex}_{{{sub}}}"
            self._where[symbol] = (tensor.name, index)
            flat.append(symbol)
        return sympy.ImmutableDenseNDimArray(flat, shape)

    def instantiate(self, expr: sympy.Expr, values: dict[sympy.Symbol, int]) -> sympy.Expr:
        """Indexed formula at concrete sizes and indices, with Indexed[...] replaced by element symbols."""
        sizes = {SIZES[name]: n for name, n in self.spec.sizes.items()}
        concrete = expr.xreplace({**sizes, **values}).doit()
        return concrete.replace(
            lambda x: isinstance(x, sympy.Indexed),
            lambda x: self[x.base.label.name][tuple(int(k) for k in x.indices)],
        )
