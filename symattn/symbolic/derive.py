"""Derivation: the ordered, named steps of attention forward and backward.

Forward (the eight steps of the attention workflow): query, keys, similarity, scaling, softmax,
weighted values, sum, output. Backward for L = Σ dO∘O: upstream, dV, dP, softmax Jacobian, D, dS, dQ, dK.
Every step holds an indexed formula (any size), an explicit array at the spec's sizes written in the
element symbols of earlier steps (the chain rule through intermediates), and a matrix form where one exists.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import sympy

from .tensors import SIZES, TENSORS, SymbolTable, a, b, i, j, l
from .score import SCORE, scale_symbolic
from .spec import AttentionSpec

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Step:
    """One named step: `lhs = rhs` per element, its explicit values, its matrix form."""

    key: str
    title: str
    explanation: str
    phase: str  # "forward" | "backward"
    tensor: str  # name in build.TENSORS of the tensor this step defines
    indices: tuple[sympy.Symbol, ...]  # free indices of lhs
    rhs: sympy.Expr | None  # indexed right-hand side; None for inputs
    explicit: sympy.ImmutableDenseNDimArray | None  # at the spec's sizes; None when explicit=False
    matrix: sympy.Eq | None = None
    symbols: sympy.ImmutableDenseNDimArray | None = None  # element symbols the explicit entries define
    tag: str = ""  # the head of a multi-head layer this step belongs to ("" for the layer or a single head)

    @property
    def lhs(self) -> sympy.Indexed:
        return TENSORS[self.tensor].base[self.indices]

    @property
    def indexed(self) -> sympy.Eq | None:
        return None if self.rhs is None else sympy.Eq(self.lhs, self.rhs, evaluate=False)

    @property
    def is_input(self) -> bool:
        return self.rhs is None


@dataclass(frozen=True)
class Derivation:
    """Ordered steps of one spec, the symbol table of their explicit forms, and the proofs."""

    spec: AttentionSpec
    steps: tuple[Step, ...]
    table: SymbolTable | None
    proofs: tuple = field(default=())

    def step(self, key: str) -> Step:
        for step in self.steps:
            if step.key == key:
                return step
        raise KeyError(f"no step {key!r}; steps are {[s.key for s in self.steps]}")

    def forward(self) -> list[Step]:
        return [s for s in self.steps if s.phase == "forward"]

    def backward(self) -> list[Step]:
        return [s for s in self.steps if s.phase == "backward"]

    @property
    def proved(self) -> bool:
        return bool(self.proofs) and all(p.passed for p in self.proofs)

    def table_for(self, step: Step) -> SymbolTable:
        """The symbol table a step's indexed formula refers to (its head's, in a multi-head layer)."""
        return self.table.children[step.tag] if step.tag else self.table

    def with_proofs(self, proofs) -> "Derivation":
        return dataclasses.replace(self, proofs=tuple(proofs))

    # Printing lives in latex.py; these are conveniences.
    def to_text(self, **kw) -> str:
        from ..render.latex import to_text
        return to_text(self, **kw)

    def to_latex(self, **kw) -> str:
        from ..render.latex import to_latex
        return to_latex(self, **kw)

    def to_markdown(self, **kw) -> str:
        from ..render.latex import to_markdown
        return to_markdown(self, **kw)

    def to_tex_document(self, **kw) -> str:
        from ..render.latex import to_tex_document
        return to_tex_document(self, **kw)


# -- explicit forms (matrix arithmetic on element symbols; independent of the indexed formulas) --------

def _array(rows) -> sympy.ImmutableDenseNDimArray:
    return sympy.ImmutableDenseNDimArray(rows)


def _softmax(spec: AttentionSpec, table: SymbolTable) -> sympy.Array:
    s = table["S"]  # (n_q, n_k)
    rows = []
    for qi in range(spec.n_q):
        visible = [kj for kj in range(spec.n_k) if spec.visible(qi, kj)]
        Z = sympy.Add(*(sympy.exp(s[qi, kj]) for kj in visible))  # masked keys are absent from the sum
        rows.append([sympy.exp(s[qi, kj]) / Z if kj in visible else sympy.S.Zero for kj in range(spec.n_k)])
    return _array(rows)  # (n_q, n_k)


def _explicit(spec: AttentionSpec, table: SymbolTable) -> dict[str, Callable[[], sympy.Array]]:
    """Explicit array builders by step key, evaluated lazily in step order."""
    t, m = table, table.matrix
    nq, nk, dk, dv = spec.n_q, spec.n_k, spec.d_k, spec.d_v
    tau = spec.scale_exact
    return {
        "query": lambda: t["Q"], "keys": lambda: t["K"],
        "similarity": lambda: SCORE.explicit_similarity(t),
        "scaling": lambda: SCORE.explicit_scaling(spec, t),
        "softmax": lambda: _softmax(spec, t),
        "weighted_values": lambda: _array([[[t["P"][x, y] * t["V"][y, z] for z in range(dv)]
                                            for y in range(nk)] for x in range(nq)]),  # (n_q, n_k, d_v)
        "sum": lambda: _array([[sum(t["Vt"][x, y, z] for y in range(nk)) for z in range(dv)] for x in range(nq)]),
        "output": lambda: _array((m("P") * m("V")).tolist()),  # (n_q, d_v)
        "upstream": lambda: t["dO"],
        "dV": lambda: _array((m("P").T * m("dO")).tolist()),  # (n_k, d_v)
        "dP": lambda: _array((m("dO") * m("V").T).tolist()),  # (n_q, n_k)
        "jacobian": lambda: _array([[[t["P"][x, y] * (int(y == z) - t["P"][x, z]) for z in range(nk)]
                                     for y in range(nk)] for x in range(nq)]),  # (n_q, n_k, n_k)
        "D": lambda: _array([sum(t["dO"][x, z] * t["O"][x, z] for z in range(dv)) for x in range(nq)]),  # (n_q,)
        "dS": lambda: _array([[t["P"][x, y] * (t["dP"][x, y] - t["D"][x]) for y in range(nk)] for x in range(nq)]),
        "dQ": lambda: _array((tau * m("dS") * m("K")).tolist()),  # (n_q, d_k)
        "dK": lambda: _array((tau * m("dS").T * m("Q")).tolist()),  # (n_k, d_k)
    }


# -- indexed forms and step texts ----------------------------------------------------------------------

def _indexed_softmax(spec: AttentionSpec) -> sympy.Expr:
    S = TENSORS["S"].base
    if not spec.causal:
        return sympy.exp(S[i, j]) / sympy.Sum(sympy.exp(S[i, l]), (l, 0, SIZES["n_k"] - 1))
    top = sympy.Min(i, SIZES["n_k"] - 1)
    return sympy.Piecewise((sympy.exp(S[i, j]) / sympy.Sum(sympy.exp(S[i, l]), (l, 0, top)), j <= i), (0, True))


def _step_table(spec: AttentionSpec):
    """(key, phase, tensor, indices, title, explanation, indexed rhs or None, matrix form or None)."""
    B = {name: t.base for name, t in TENSORS.items()}
    M = {name: t.matrix_symbol() for name, t in TENSORS.items() if len(t.dims) <= 2}
    Sum, nq, nk, dv = sympy.Sum, SIZES["n_q"], SIZES["n_k"], SIZES["d_v"]
    tau = scale_symbolic(spec)
    softmax = sympy.Function("softmax")
    causal = " Causal mask: key j is visible to query i only when j <= i; masked keys are absent from the sum." \
        if spec.causal else ""
    L = sympy.Symbol("L")
    return [
        ("query", "forward", "Q", (i, a), "The query vectors",
         "Each of the n_q queries is a row vector q_i of d_k features.", None, None),
        ("keys", "forward", "K", (j, a), "The key vectors",
         "Each of the n_k keys is a row vector k_j of d_k features.", None, None),
        (*SCORE.similarity[:1], "forward", SCORE.similarity[3], (i, j), *SCORE.similarity[1:3],
         SCORE.indexed_similarity(), None),
        (*SCORE.scaling[:1], "forward", SCORE.scaling[3], (i, j), *SCORE.scaling[1:3],
         SCORE.indexed_scaling(spec), SCORE.matrix_form(spec)),
        ("softmax", "forward", "P", (i, j), "Softmax normalisation into weights",
         "Each row of scores goes through a softmax: weights are positive and sum to 1 over the keys." + causal,
         _indexed_softmax(spec), sympy.Eq(M["P"], softmax(M["S"]), evaluate=False)),
        ("weighted_values", "forward", "Vt", (i, j, b), "Value vectors scaled by their weights",
         "For query i, each value vector v_j is multiplied by its weight p_ij.", B["P"][i, j] * B["V"][j, b], None),
        ("sum", "forward", "O", (i, b), "Multiply and sum",
         "The weighted value vectors of query i are summed over the keys.", Sum(B["Vt"][i, j, b], (j, 0, nk - 1)), None),
        ("output", "forward", "O", (i, b), "The attention output",
         "Stacking the rows gives the output matrix O = PV, one d_v-vector per query.",
         Sum(B["P"][i, j] * B["V"][j, b], (j, 0, nk - 1)), sympy.Eq(M["O"], M["P"] * M["V"], evaluate=False)),
        ("upstream", "backward", "dO", (i, b), "Upstream gradient",
         "Backward pass for a scalar loss L with dL/dO = dO, i.e. L = sum(dO * O).", None,
         sympy.Eq(L, Sum(B["dO"][i, b] * B["O"][i, b], (i, 0, nq - 1), (b, 0, dv - 1)), evaluate=False)),
        ("dV", "backward", "dV", (j, b), "Gradient of the values",
         "O is linear in V, so dV is the weights transposed times the upstream gradient.",
         Sum(B["P"][i, j] * B["dO"][i, b], (i, 0, nq - 1)), sympy.Eq(M["dV"], M["P"].T * M["dO"], evaluate=False)),
        ("dP", "backward", "dP", (i, j), "Gradient of the weights",
         "O is linear in P, so dP is the upstream gradient times V transposed.",
         Sum(B["dO"][i, b] * B["V"][j, b], (b, 0, dv - 1)), sympy.Eq(M["dP"], M["dO"] * M["V"].T, evaluate=False)),
        ("jacobian", "backward", "J", (i, j, l), "Softmax Jacobian",
         "Within row i, the derivative of weight p_ij by score s_il is p_ij (delta_jl - p_il).",
         B["P"][i, j] * (sympy.KroneckerDelta(j, l) - B["P"][i, l]), None),
        ("D", "backward", "D", (i,), "Row correction term",
         "D_i = sum_b dO_ib O_ib equals sum_j P_ij dP_ij; it is the part of dP every weight of the row shares.",
         Sum(B["dO"][i, b] * B["O"][i, b], (b, 0, dv - 1)), None),
        ("dS", "backward", "dS", (i, j), "Gradient of the scores",
         "Applying the softmax Jacobian to dP collapses to P * (dP - D 1^T).",
         B["P"][i, j] * (B["dP"][i, j] - B["D"][i]),
         sympy.Eq(M["dS"], sympy.HadamardProduct(M["P"], M["dP"] - M["D"] * sympy.OneMatrix(1, nk)), evaluate=False)),
        ("dQ", "backward", "dQ", (i, a), "Gradient of the queries",
         "S = scale * Q K^T, so dQ = scale * dS K.", tau * Sum(B["dS"][i, j] * B["K"][j, a], (j, 0, nk - 1)),
         sympy.Eq(M["dQ"], tau * M["dS"] * M["K"], evaluate=False)),
        ("dK", "backward", "dK", (j, a), "Gradient of the keys",
         "S = scale * Q K^T, so dK = scale * dS^T Q.", tau * Sum(B["dS"][i, j] * B["Q"][i, a], (i, 0, nq - 1)),
         sympy.Eq(M["dK"], tau * M["dS"].T * M["Q"], evaluate=False)),
    ]


def derive(spec: AttentionSpec, *, explicit: bool = True, prove: bool = True,
           progress: Progress | None = None, table: SymbolTable | None = None) -> Derivation:
    """Build the ordered steps of `spec`; with explicit=True also the arrays at its sizes,
    with prove=True also the proofs (see symattn.prove). `table` supplies the element symbols
    (the multi-head layer passes one per head); by default a fresh one."""
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"derive expects an AttentionSpec, got {type(spec).__name__}")
    note = progress or (lambda message: None)
    if explicit:
        spec.check_explicit()
        table = SymbolTable(spec) if table is None else table
        builders = _explicit(spec, table)
    rows = _step_table(spec)
    steps = []
    for n, (key, phase, tensor, indices, title, text, rhs, matrix) in enumerate(rows, 1):
        note(f"derive {n}/{len(rows)}: {key}")
        values = builders[key]() if explicit else None
        symbols = table[tensor] if explicit else None
        steps.append(Step(key, title, text, phase, tensor, indices, rhs, values, matrix, symbols))
    derivation = Derivation(spec, tuple(steps), table)
    if prove and explicit:
        from .prove import prove as run_proofs
        derivation = run_proofs(derivation, progress=progress)
    return derivation
