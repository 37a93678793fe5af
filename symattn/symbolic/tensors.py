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


# Symbolic sizes (atomic) and dims (sizes or products of sizes) used by every indexed formula.
#: Printed names where the key would mislead: a layer's head count is H (h indexes a head, as a score mod's h does),
#: and a relative-bias table has 2D + 1 entries, n_rel (typeset n_{rel}).
_PRINTED = {"h": "H", "h_kv": "H_kv", "n_rel": "n_{rel}"}
SIZES = {name: sympy.Symbol(_PRINTED.get(name, name), integer=True, positive=True)
         for name in ("n_q", "n_k", "d_k", "d_v", "d_model", "h", "h_kv", "d_a", "n_rel")}
DIMS = {**SIZES, "hd_k": SIZES["h"] * SIZES["d_k"], "gd_k": SIZES["h_kv"] * SIZES["d_k"],
        "gd_v": SIZES["h_kv"] * SIZES["d_v"], "hd_v": SIZES["h"] * SIZES["d_v"], "one": sympy.Integer(1)}
i, j, l, a, b, m, c, r, f, t = sympy.symbols("i j l a b m c r f t", integer=True, nonnegative=True)
INDEX_OF_DIM = {"n_q": i, "n_k": j, "d_k": a, "d_v": b, "d_model": m, "hd_k": c, "gd_k": c, "gd_v": c, "hd_v": c,
                "d_a": r, "n_rel": t}
#: A second index for a dim that appears twice in one tensor (W_a of the general score is d_k x d_k).
SECOND_INDEX = {"d_k": f}
#: A scalar parameter (the cosine score's tau) is a tensor of one entry, dim "one", element index 0.
INDEX_OF_DIM["one"] = sympy.Integer(0)
#: The head index h of a score mod (FlexAttention's score_mod(score, b, h, q_idx, kv_idx)); a single-head
#: derivation is head 0. Not SIZES["h"] (the number of heads of a layer).
HEAD = sympy.Symbol("h", integer=True, nonnegative=True)
#: The batch element b of a score mod or mask (FlexAttention's b); explicit forms are b = 0. Not the value index b
#: (other assumptions: a different symbol).
BATCH = sympy.Symbol("b", integer=True)
#: Free indices of a user's parameter table: one per axis (rank 2 at most).
TABLE_INDICES = (t, sympy.Symbol("u", integer=True, nonnegative=True))


def declare_dim(name: str, axis: int) -> None:
    """Register the size `name` of axis `axis` of a user's parameter table (idempotent)."""
    if name not in SIZES:
        SIZES[name] = DIMS[name] = sympy.Symbol(name, integer=True, positive=True)
        INDEX_OF_DIM[name] = TABLE_INDICES[axis]


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

    def indices(self) -> tuple[sympy.Symbol, ...]:
        """Free index symbols of an element: one per dim, a second symbol where a dim repeats."""
        out = []
        for dim in self.dims:
            out.append(SECOND_INDEX[dim] if INDEX_OF_DIM[dim] in out else INDEX_OF_DIM[dim])
        return tuple(out)

    def tagged_elem(self, tag: str) -> str:
        """LaTeX element base of head `tag`: s^{(1)}, or {w^{a}}^{(1)} where the base has a superscript already."""
        if not tag:
            return self.elem_latex
        return superscripted(self.elem_latex, f"({tag})")

    def matrix_symbol(self) -> sympy.MatrixSymbol:
        rows = DIMS[self.dims[0]]
        cols = DIMS[self.dims[1]] if len(self.dims) > 1 else 1
        return sympy.MatrixSymbol(self.name, rows, cols)

    def shape(self, spec) -> tuple[int, ...]:
        return tuple(spec.sizes[d] for d in self.dims)


def _t(name, latex, elem, elem_latex, *dims):
    return Tensor(name, latex, elem, elem_latex, tuple(dims))


TENSORS: dict[str, Tensor] = {t.name: t for t in (
    _t("Q", "Q", "q", "q", "n_q", "d_k"),
    _t("K", "K", "k", "k", "n_k", "d_k"),
    _t("V", "V", "v", "v", "n_k", "d_v"),
    _t("St", r"\tilde{S}", "st", r"\tilde{s}", "n_q", "n_k"),
    _t("S", "S", "s", "s", "n_q", "n_k"),
    _t("Sr", r"\bar{S}", "sr", r"\bar{s}", "n_q", "n_k"),  # the score before its score mod
    _t("dSr", r"\mathrm{d}\bar{S}", "dsr", r"\mathrm{d}\bar{s}", "n_q", "n_k"),
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
    # the cosine score's norms, named in print only (render.shorthand): r = ‖q_i‖, ν = max(ε, r)
    _t("r_q", r"r^{q}", "r^q", r"r^{q}", "n_q"), _t("r_k", r"r^{k}", "r^k", r"r^{k}", "n_k"),
    _t("nu_q", r"\nu^{q}", "ν^q", r"\nu^{q}", "n_q"), _t("nu_k", r"\nu^{k}", "ν^k", r"\nu^{k}", "n_k"),
    # the additive score's pre-activations η_ijr = b_r + (q_i W_a)_r + (k_j U_a)_r, named in print only
    _t("eta", r"\eta", "η", r"\eta", "n_q", "n_k", "d_a"),
    # (a score's parameters and their gradients are declared with the score: symattn.symbolic.score.Param)
    # the multi-head layer: inputs, weights, projections, concatenation, output, and their gradients
    _t("X", "x", "x", "x", "n_q", "d_model"),
    _t("Yin", "y", "y", "y", "n_k", "d_model"),
    _t("Wq", "W_Q", "wq", "w^{Q}", "d_model", "hd_k"),
    _t("Wk", "W_K", "wk", "w^{K}", "d_model", "gd_k"),
    _t("Wv", "W_V", "wv", "w^{V}", "d_model", "gd_v"),
    _t("Wo", "W_O", "wo", "w^{O}", "hd_v", "d_model"),
    _t("bq", "b_Q", "bq", "b^{Q}", "hd_k"),
    _t("bk", "b_K", "bk", "b^{K}", "gd_k"),
    _t("bv", "b_V", "bv", "b^{V}", "gd_v"),
    _t("bo", "b_O", "bo", "b^{O}", "d_model"),
    _t("Qp", r"\hat{Q}", "qp", r"\hat{q}", "n_q", "hd_k"),
    _t("Kp", r"\hat{K}", "kp", r"\hat{k}", "n_k", "gd_k"),
    _t("Vp", r"\hat{V}", "vp", r"\hat{v}", "n_k", "gd_v"),
    _t("C", "C", "cc", "c", "n_q", "hd_v"),
    _t("Out", "Z", "z", "z", "n_q", "d_model"),
    _t("dOut", r"\mathrm{d}Z", "dz", r"\mathrm{d}z", "n_q", "d_model"),
    _t("dC", r"\mathrm{d}C", "dcc", r"\mathrm{d}c", "n_q", "hd_v"),
    _t("dQp", r"\mathrm{d}\hat{Q}", "dqp", r"\mathrm{d}\hat{q}", "n_q", "hd_k"),
    _t("dKp", r"\mathrm{d}\hat{K}", "dkp", r"\mathrm{d}\hat{k}", "n_k", "gd_k"),
    _t("dVp", r"\mathrm{d}\hat{V}", "dvp", r"\mathrm{d}\hat{v}", "n_k", "gd_v"),
    _t("dWq", r"\mathrm{d}W_Q", "dwq", r"\mathrm{d}w^{Q}", "d_model", "hd_k"),
    _t("dWk", r"\mathrm{d}W_K", "dwk", r"\mathrm{d}w^{K}", "d_model", "gd_k"),
    _t("dWv", r"\mathrm{d}W_V", "dwv", r"\mathrm{d}w^{V}", "d_model", "gd_v"),
    _t("dWo", r"\mathrm{d}W_O", "dwo", r"\mathrm{d}w^{O}", "hd_v", "d_model"),
    _t("dbq", r"\mathrm{d}b_Q", "dbq", r"\mathrm{d}b^{Q}", "hd_k"),
    _t("dbk", r"\mathrm{d}b_K", "dbk", r"\mathrm{d}b^{K}", "gd_k"),
    _t("dbv", r"\mathrm{d}b_V", "dbv", r"\mathrm{d}b^{V}", "gd_v"),
    _t("dbo", r"\mathrm{d}b_O", "dbo", r"\mathrm{d}b^{O}", "d_model"),
    _t("dX", r"\mathrm{d}x", "dx", r"\mathrm{d}x", "n_q", "d_model"),
    _t("dYin", r"\mathrm{d}y", "dy", r"\mathrm{d}y", "n_k", "d_model"),
)}


def as_matrix(array: sympy.NDimArray) -> sympy.ImmutableMatrix:
    """A rank-2 array as a matrix, a rank-1 array as a column."""
    return sympy.ImmutableMatrix(array.tolist() if array.rank() == 2 else [[x] for x in array])


def superscripted(tex: str, sup: str) -> str:
    """`tex` with a superscript, braced first where it has one already (\\nu^{q} -> {\\nu^{q}}^{(0)})."""
    return ("{" + tex + "}" if "^" in tex else tex) + f"^{{{sup}}}"


def shape_of(array: sympy.NDimArray) -> tuple[int, ...]:
    """Shape as Python ints (immutable SymPy arrays keep a SymPy Tuple of Integers)."""
    return tuple(int(n) for n in array.shape)


def flat(array: sympy.NDimArray) -> list:
    """Entries of an array in row-major order (iterating an NDimArray yields sub-arrays)."""
    return list(array.reshape(len(array))) if array.rank() != 1 else list(array)


class SymbolTable:
    """Explicit element symbols of every tensor at one spec's sizes, and their LaTeX names.

    `tag` distinguishes the tables of several heads (s^{(1)}_{0,2}); `aliases` maps tensor names to arrays of
    another table's symbols (a head's Q is a slice of the projected queries). `names` is shared between the
    tables of one derivation so printing sees every symbol.
    """

    def __init__(self, spec, *, tag: str = "", aliases: dict | None = None, names: dict | None = None,
                 where: dict | None = None, head: int = 0):
        self.spec = spec
        self.tag = tag
        self.head = head  # a score mod's h in this table's formulas (FlexAttention's head index)
        self.latex_names: dict[sympy.Basic, str] = {} if names is None else names
        self._arrays: dict[str, sympy.Array] = dict(aliases or {})
        self._where: dict[sympy.Symbol, tuple[str, tuple[int, ...]]] = {} if where is None else where
        self.children: dict[str, SymbolTable] = {}
        for tensor in TENSORS.values():
            self.latex_names[tensor.label] = tensor.latex

    def child(self, spec, tag: str, aliases: dict, head: int = 0) -> "SymbolTable":
        """A table for head `head`: own tagged symbols, `aliases` for the tensors it shares, names in common."""
        table = SymbolTable(spec, tag=tag, aliases=aliases, names=self.latex_names, where=self._where, head=head)
        self.children[tag] = table
        return table

    def __getitem__(self, name: str) -> sympy.ImmutableDenseNDimArray:
        """Array of element symbols of tensor `name` (shape from the spec)."""
        if name not in self._arrays:
            self._arrays[name] = self._make(TENSORS[name])
        return self._arrays[name]

    def matrix(self, name: str) -> sympy.ImmutableMatrix:
        """Rank-2 (or column-vector) view of a tensor's element symbols."""
        return as_matrix(self[name])

    def where(self, symbol: sympy.Symbol) -> tuple[str, tuple[int, ...], str]:
        """(tensor name, index, tag) of an element symbol."""
        return self._where[symbol]

    def _make(self, tensor: Tensor) -> sympy.ImmutableDenseNDimArray:
        shape = tensor.shape(self.spec)
        tag = f"^{{({self.tag})}}" if self.tag else ""
        flat = []
        for index in itertools.product(*(range(n) for n in shape)):
            sub = ",".join(map(str, index))
            symbol = sympy.Symbol(f"{tensor.elem}{tag}_{{{sub}}}", real=True)
            self.latex_names[symbol] = f"{tensor.tagged_elem(self.tag)}_{{{sub}}}"
            self._where[symbol] = (tensor.name, index, self.tag)
            flat.append(symbol)
        return sympy.ImmutableDenseNDimArray(flat, shape)

    def instantiate(self, expr: sympy.Expr, values: dict[sympy.Symbol, int]) -> sympy.Expr:
        """Indexed formula at concrete sizes and indices, with Indexed[...] replaced by element symbols."""
        sizes = {SIZES[name]: n for name, n in self.spec.sizes.items() if name in SIZES}
        mask = getattr(self.spec, "mask_object", None)
        if mask is not None and getattr(mask, "arrays", ()):  # run-time masks: their arrays' values at the indices
            expr = mask.bind(expr.xreplace({BATCH: sympy.Integer(0), **sizes,
                                            **values}).doit())
        concrete = expr.xreplace({**sizes, HEAD: sympy.Integer(self.head), BATCH: sympy.Integer(0), **values}).doit()
        return concrete.replace(lambda x: isinstance(x, sympy.Indexed), self._element)

    def _element(self, x: sympy.Indexed) -> sympy.Symbol:
        """Element symbol of a concrete Indexed; one index more than the tensor's rank names the head."""
        name, index = x.base.label.name, tuple(int(k) for k in x.indices)
        if len(index) == len(TENSORS[name].dims) + 1:
            return self.children[str(index[0])][name][index[1:]]
        return self[name][index]
