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

from .tensors import DIMS, SIZES, TENSORS, SymbolTable, a, b, flat, i, j, l
from .chains import MASK, chains, dS_matrix, jacobian_matrix
from .keyless import check_policy, constant_rows, policy_text, uniform_branch, uniform_rows
from .modsteps import mod_gradient_rows, mod_param_rows, mod_rows, mod_slope
from .score import SCORES, Score, derivative, partial, scale_symbolic
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
    chain: tuple = ()  # chain-rule line: lhs = chain[0] = chain[1] = ...; the last member is rhs (chains.py)

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
    for qi in uniform_rows(spec):  # no visible key, masked_rows='uniform': constant weights (else 0, as built)
        rows[qi] = [sympy.Rational(1, spec.n_k)] * spec.n_k
    return _array(rows)  # (n_q, n_k)


def _zero_uniform_rows(spec: AttentionSpec, rows: list) -> sympy.Array:
    """The Jacobian's or dS's rows, 0 for queries whose weights are constant (masked_rows='uniform')."""
    for qi in uniform_rows(spec):
        rows[qi] = sympy.Array(rows[qi]).applyfunc(lambda _: sympy.S.Zero).tolist()
    return _array(rows)


def _score_steps(spec: AttentionSpec, score: Score, table: SymbolTable) -> dict[str, Callable[[], sympy.Array]]:
    """Explicit builders of the score's forward steps: similarity and scaling, or the unscaled score."""
    pairs = lambda f: _array([[f(x, y) for y in range(spec.n_k)] for x in range(spec.n_q)])  # noqa: E731
    steps = {"score": lambda: pairs(lambda x, y: score.explicit(spec, table, x, y))} if not score.scaled else {
        "similarity": lambda: pairs(lambda x, y: score.explicit(spec, table, x, y)),  # (n_q, n_k)
        "scaling": lambda: spec.scale_exact * table["St"]}
    mod = spec.mod_object
    if mod is not None:  # S_ij = f(S̄_ij, i, j; θ) and dS̄_ij = dS_ij ∂f/∂s, the derivative by SymPy
        theta = {p.name: (lambda *ix, t=p.tensor: table[t][ix]) for p in mod.params}
        h = table.head  # FlexAttention's h: the head of a multi-head layer, 0 for a single head
        steps["mod"] = lambda: pairs(lambda x, y: mod.formula(table["Sr"][x, y], 0, h, x, y, theta))
        steps["dSr"] = lambda: pairs(lambda x, y: table["dS"][x, y] * mod_slope(mod, table["Sr"][x, y], x, y,
                                                                                     theta, h))
        for p in mod.params:
            steps["d" + p.tensor] = lambda p=p: sympy.ImmutableDenseNDimArray(
                [sum(table["dS"][x, y] * derivative(mod.formula(table["Sr"][x, y], 0, h, x, y, theta), e)
                     for x in range(spec.n_q) for y in range(spec.n_k)) for e in flat(table[p.tensor])],
                table[p.tensor].shape)
    return steps


def _score_gradients(spec: AttentionSpec, score: Score, table: SymbolTable) -> dict[str, Callable[[], sympy.Array]]:
    """dQ, dK and every dθ as τ Σ dS_ij ∂s̃_ij/∂(q, k, θ), the partials derived by sympy.diff of the score's
    similarity s̃ (τ: the scale of a scaled score, factored out of the sum; 1 otherwise)."""
    similarity = {}

    def s(x, y):  # s̃_ij in element symbols, built once per pair
        if (x, y) not in similarity:
            similarity[x, y] = score.explicit(spec, table, x, y)
        return similarity[x, y]
    tau = spec.scale_exact if score.scaled else sympy.S.One
    dS, Q, K = table["dSr" if spec.mod_object else "dS"], table["Q"], table["K"]
    rows, cols = range(spec.n_q), range(spec.n_k)
    out = {
        "dQ": lambda: _array([[tau * sum(dS[x, y] * derivative(s(x, y), Q[x, z]) for y in cols)
                               for z in range(spec.d_k)] for x in rows]),  # (n_q, d_k)
        "dK": lambda: _array([[tau * sum(dS[x, y] * derivative(s(x, y), K[y, z]) for x in rows)
                               for z in range(spec.d_k)] for y in cols]),  # (n_k, d_k)
    }
    for p in score.params:
        def gradient(theta=table[p.tensor]):
            entries = [tau * sum(dS[x, y] * derivative(s(x, y), t) for x in rows for y in cols) for t in flat(theta)]
            return sympy.ImmutableDenseNDimArray(entries, theta.shape)  # θ's shape
        out["d" + p.tensor] = gradient
    return out


def _explicit(spec: AttentionSpec, table: SymbolTable) -> dict[str, Callable[[], sympy.Array]]:
    """Explicit array builders by step key, evaluated lazily in step order."""
    t, m = table, table.matrix
    nq, nk, dv = spec.n_q, spec.n_k, spec.d_v
    score = SCORES[spec.score]
    return {
        "query": lambda: t["Q"], "keys": lambda: t["K"],
        **{p.tensor: (lambda p=p: t[p.tensor]) for p in parameters(spec)},
        **_score_steps(spec, score, table),
        "softmax": lambda: _softmax(spec, t),
        "weighted_values": lambda: _array([[[t["P"][x, y] * t["V"][y, z] for z in range(dv)]
                                            for y in range(nk)] for x in range(nq)]),  # (n_q, n_k, d_v)
        "sum": lambda: _array([[sum(t["Vt"][x, y, z] for y in range(nk)) for z in range(dv)] for x in range(nq)]),
        "output": lambda: _array((m("P") * m("V")).tolist()),  # (n_q, d_v)
        "upstream": lambda: t["dO"],
        "dV": lambda: _array((m("P").T * m("dO")).tolist()),  # (n_k, d_v)
        "dP": lambda: _array((m("dO") * m("V").T).tolist()),  # (n_q, n_k)
        "jacobian": lambda: _zero_uniform_rows(spec, [[[t["P"][x, y] * (int(y == z) - t["P"][x, z]) for z in range(nk)]
                                                       for y in range(nk)] for x in range(nq)]),  # (n_q, n_k, n_k)
        "D": lambda: _array([sum(t["dO"][x, z] * t["O"][x, z] for z in range(dv)) for x in range(nq)]),  # (n_q,)
        "dS": lambda: _zero_uniform_rows(spec, [[t["P"][x, y] * (t["dP"][x, y] - t["D"][x]) for y in range(nk)]
                                                for x in range(nq)]),  # (n_q, n_k)
        **_score_gradients(spec, score, table),
    }


# -- indexed forms and step texts ----------------------------------------------------------------------

def _indexed_softmax(spec: AttentionSpec) -> sympy.Expr:
    """p_ij = exp(s_ij) / Σ over the keys visible to query i; 0 for a masked key."""
    return constant_rows(_visible_softmax(spec), spec, 1 / SIZES["n_k"])


def _visible_softmax(spec: AttentionSpec) -> sympy.Expr:
    S, mask = TENSORS["S"].base, spec.mask_object
    if mask is None:
        return sympy.exp(S[i, j]) / sympy.Sum(sympy.exp(S[i, l]), (l, 0, SIZES["n_k"] - 1))
    if spec.causal:  # the visible keys are a range: sum up to min(i, n_k - 1)
        top = sympy.Min(i, SIZES["n_k"] - 1)
        return sympy.Piecewise((sympy.exp(S[i, j]) / sympy.Sum(sympy.exp(S[i, l]), (l, 0, top)), j <= i), (0, True))
    visible = sympy.Sum(sympy.Piecewise((sympy.exp(S[i, l]), mask.condition(i, l)), (0, True)), (l, 0, SIZES["n_k"] - 1))
    return sympy.Piecewise((sympy.exp(S[i, j]) / visible, mask.condition(i, j)), (0, True))


def _step_table(spec: AttentionSpec):
    """(key, phase, tensor, indices, title, explanation, indexed rhs or None, matrix form or None)."""
    B = {name: t.base for name, t in TENSORS.items()}
    M = {name: t.matrix_symbol() for name, t in TENSORS.items() if len(t.dims) <= 2}
    Sum, nq, nk, dv = sympy.Sum, SIZES["n_q"], SIZES["n_k"], SIZES["d_v"]
    score = SCORES[spec.score]
    softmax = sympy.Function("softmax")
    mask = spec.mask_object
    masked = "" if mask is None else (
        f" Mask ({mask.text}): {mask.description}. In matrix form $P = \\operatorname{{softmax}}(S + M)$ with "
        r"$M_{ij} = 0$ where key $j$ is visible to query $i$ and $M_{ij} = -\infty$ where it is masked: masked "
        r"keys are absent from the sum and get weight 0. The kernels never form $-\infty$: they skip masked keys "
        r"(and whole masked tiles).")
    L = sympy.Symbol("L")
    constant = uniform_branch(spec)  # masked_rows='uniform' with a query that sees no key
    constant_text = (r" This holds for a query that sees a key; one that sees none has constant weights $1/n_k$, "
                     r"so its row is 0 (the first branch).") if constant else ""
    return [
        ("query", "forward", "Q", (i, a), "The query vectors",
         "Each of the $n_q$ queries is a row vector $q_i$ of $d_k$ features.", None, None),
        ("keys", "forward", "K", (j, a), "The key vectors",
         "Each of the $n_k$ keys is a row vector $k_j$ of $d_k$ features.", None, None),
        *_param_rows(spec, score),
        *_score_rows(spec, score),
        *mod_rows(spec),
        ("softmax", "forward", "P", (i, j), "Softmax normalisation into weights",
         r"Each row of scores goes through a softmax, $p_{ij} = e^{s_{ij}} / \sum_l e^{s_{il}}$: weights are positive "
         r"and sum to 1 over the " + ("visible " if mask else "") + "keys." + masked + policy_text(spec),
         _indexed_softmax(spec),
         sympy.Eq(M["P"], softmax(sympy.MatAdd(M["S"], MASK, evaluate=False) if mask is not None else M["S"]),
                  evaluate=False)),
        ("weighted_values", "forward", "Vt", (i, j, b), "Value vectors scaled by their weights",
         "For query $i$, each value vector $v_j$ is multiplied by its weight $p_{ij}$.", B["P"][i, j] * B["V"][j, b],
         None),
        ("sum", "forward", "O", (i, b), "Multiply and sum",
         "The weighted value vectors of query $i$ are summed over the keys.", Sum(B["Vt"][i, j, b], (j, 0, nk - 1)),
         None),
        ("output", "forward", "O", (i, b), "The attention output",
         "Stacking the rows gives the output matrix $O = P V$, one $d_v$-vector per query.",
         Sum(B["P"][i, j] * B["V"][j, b], (j, 0, nk - 1)), sympy.Eq(M["O"], M["P"] * M["V"], evaluate=False)),
        ("upstream", "backward", "dO", (i, b), "Upstream gradient",
         r"Backward pass for a scalar loss $L$ with $\partial L / \partial O = \mathrm{d}O$, i.e. "
         r"$L = \sum_{i,b} \mathrm{d}O_{ib} O_{ib}$.", None,
         sympy.Eq(L, Sum(B["dO"][i, b] * B["O"][i, b], (i, 0, nq - 1), (b, 0, dv - 1)), evaluate=False)),
        ("dV", "backward", "dV", (j, b), "Gradient of the values",
         r"$O$ is linear in $V$, so $\mathrm{d}V = P^\top \mathrm{d}O$: the weights transposed times the upstream "
         r"gradient.",
         Sum(B["P"][i, j] * B["dO"][i, b], (i, 0, nq - 1)), sympy.Eq(M["dV"], M["P"].T * M["dO"], evaluate=False)),
        ("dP", "backward", "dP", (i, j), "Gradient of the weights",
         r"$O$ is linear in $P$, so $\mathrm{d}P = \mathrm{d}O\, V^\top$.",
         Sum(B["dO"][i, b] * B["V"][j, b], (b, 0, dv - 1)), sympy.Eq(M["dP"], M["dO"] * M["V"].T, evaluate=False)),
        ("jacobian", "backward", "J", (i, j, l), "Softmax Jacobian",
         r"Within row $i$, $\partial p_{ij} / \partial s_{il} = p_{ij} (\delta_{jl} - p_{il})$; as a matrix, the "
         r"Jacobian of row $i$ is $\operatorname{diag}(p_i) - p_i p_i^\top$ ($p_i$ the row's weights as a column)."
         + constant_text, constant_rows(B["P"][i, j] * (sympy.KroneckerDelta(j, l) - B["P"][i, l]), spec, 0),
         None if constant else jacobian_matrix()),
        ("D", "backward", "D", (i,), "Row correction term",
         r"$D_i = \sum_l P_{il}\, \mathrm{d}P_{il}$ is the part of $\mathrm{d}P$ every weight of row $i$ shares. "
         r"Since $\mathrm{d}P_{il} = \sum_b \mathrm{d}O_{ib} V_{lb}$ and $\sum_l P_{il} V_{lb} = O_{ib}$, it equals "
         r"$\sum_b \mathrm{d}O_{ib} O_{ib}$, a row sum of $\mathrm{d}O \circ O$: $d_v$ products instead of $n_k$.",
         Sum(B["dO"][i, b] * B["O"][i, b], (b, 0, dv - 1)), None),
        ("dS", "backward", "dS", (i, j), "Gradient of the scores",
         r"The chain rule through the softmax Jacobian collapses to $\mathrm{d}S = P \circ (\mathrm{d}P - "
         r"D \mathbf{1}^\top)$." + constant_text, constant_rows(B["P"][i, j] * (B["dP"][i, j] - B["D"][i]), spec, 0),
         None if constant else dS_matrix()),
        *mod_gradient_rows(spec),
        *_gradient_rows(spec, score),
        *mod_param_rows(spec),
    ]


def parameters(spec: AttentionSpec) -> tuple:
    """Every parameter θ: the score's, then the score mod's."""
    return SCORES[spec.score].params + (spec.mod_object.params if spec.mod_object else ())


def _param_rows(spec: AttentionSpec, score: Score) -> list[tuple]:
    """Input steps of the parameters θ of the score and of the score mod."""
    owner = {p.tensor: f"the {score.key} score" for p in score.params}
    shape = {p.tensor: "a scalar" if TENSORS[p.tensor].dims == ("one",) else _shape_text(spec, TENSORS[p.tensor].dims)
             for p in parameters(spec)}
    return [(p.tensor, "forward", p.tensor, TENSORS[p.tensor].indices(), f"The parameter ${p.latex}$",
             f"A learned parameter of {owner.get(p.tensor, 'the score mod')}, {shape[p.tensor]}.", None, None)
            for p in parameters(spec)]


def _shape_text(spec: AttentionSpec, dims: tuple[str, ...]) -> str:
    """'of shape $(d_{k}, d_{a}) = (2, 3)$': the dims as typeset and, at the spec's sizes, their values."""
    sizes = spec.sizes
    values = [DIMS[d].subs({SIZES[n]: v for n, v in sizes.items() if n in SIZES}) for d in dims]
    shown = f"({', '.join(sympy.latex(DIMS[d]) for d in dims)})"
    return f"of shape ${shown}" + (f" = ({', '.join(map(str, values))})$" if all(v.is_Integer for v in values) else "$")


def _score_rows(spec: AttentionSpec, score: Score) -> list[tuple]:
    """The score's forward steps: similarity then scaling (scaled scores), or the score itself."""
    M = {name: TENSORS[name].matrix_symbol() for name in ("St", "S")}
    out = "Sr" if spec.mod_object else "S"  # a score mod turns S̄ into S
    if not score.scaled:
        return [("score", "forward", out, (i, j), score.title, score.explanation, score.indexed(i, j), None)]
    tau = scale_symbolic(spec)
    similarity = None if score.matrix is None else sympy.Eq(M["St"], score.matrix(), evaluate=False)
    scaled = None if score.matrix is None else sympy.Eq(M["S"], tau * score.matrix(), evaluate=False)
    return [("similarity", "forward", "St", (i, j), score.title, score.explanation, score.indexed(i, j), similarity),
            ("scaling", "forward", out, (i, j), r"Scaling by $\tau$",
             r"The similarities are multiplied by the scale $\tau$ ($1/\sqrt{d_k}$ by default) so their variance "
             r"does not grow with $d_k$.", tau * TENSORS["St"].base[i, j], scaled if out == "S" else None)]


def _gradient_rows(spec: AttentionSpec, score: Score) -> list[tuple]:
    """dQ, dK and every dθ: Σ over the scores of dS times ∂s/∂(q, k, θ), the partial derived by SymPy."""
    B = {name: t.base for name, t in TENSORS.items()}
    Sum, nq, nk = sympy.Sum, SIZES["n_q"], SIZES["n_k"]
    s = score.indexed(i, j, primed=True)  # s̃_ij; the scale τ of a scaled score stays outside the sums
    tau = scale_symbolic(spec) if score.scaled else sympy.S.One
    dS = B["dSr" if spec.mod_object else "dS"]  # the gradient of the score before its mod
    rows = []
    for tensor, title, one, over in (("Q", "queries", "query", ((j, 0, nk - 1),)), ("K", "keys", "key", ((i, 0, nq - 1),))):
        index = (i, a) if tensor == "Q" else (j, a)
        small = tensor.lower()
        S = r"\bar{S}" if spec.mod_object else "S"  # the score before its mod
        text = ((f"${S} = \\tau Q K^\\top$, so " + (f"$\\mathrm{{d}}Q = \\tau\\, \\mathrm{{d}}{S}\\, K$." if tensor == "Q"
                                                 else f"$\\mathrm{{d}}K = \\tau\\, \\mathrm{{d}}{S}^\\top Q$."))
                if score.key == "dot" else f"Chain rule through every score the {one} enters; "
                f"$\\partial s_{{ij}} / \\partial {small}_{{{'i' if small == 'q' else 'j'}a}}$ is derived by SymPy "
                f"from the {score.key} score.")
        rows.append((f"d{tensor}", "backward", f"d{tensor}", index, f"Gradient of the {title}", text,
                     tau * Sum(dS[i, j] * partial(s, B[tensor][index]), *over), _matrix_gradient(spec, score, tensor)))
    for p in score.params:
        index = TENSORS[p.tensor].indices()
        rows.append((f"d{p.tensor}", "backward", f"d{p.tensor}", index, f"Gradient of the parameter ${p.latex}$",
                     f"${p.latex}$ enters every score: $\\mathrm{{d}}{p.latex} = \\sum_{{i,j}} \\mathrm{{d}}S_{{ij}}\\, "
                     f"\\partial s_{{ij}} / \\partial {p.latex}$, the partial derived by SymPy.", tau * Sum(dS[i, j] * partial(s, B[p.tensor][index]),
                                                             (i, 0, nq - 1), (j, 0, nk - 1)),
                     _matrix_gradient(spec, score, p.tensor)))
    return rows


def _matrix_gradient(spec: AttentionSpec, score: Score, tensor: str) -> sympy.Eq | None:
    """The matrix form of dQ, dK or dθ where the score is bilinear: dot (τ dS K, τ dSᵀ Q) and general (τ dS K W_aᵀ,
    τ dSᵀ Q W_a, τ Qᵀ dS K); after a score mod, dS̄ (the gradient of the score before its mod) takes dS's place."""
    M = {name: TENSORS[name].matrix_symbol() for name in ("Q", "K", "Wg")}
    dS = TENSORS["dSr" if spec.mod_object else "dS"].matrix_symbol()
    forms = {"dot": {"Q": lambda: dS * M["K"], "K": lambda: dS.T * M["Q"]},
             "general": {"Q": lambda: dS * M["K"] * M["Wg"].T, "K": lambda: dS.T * M["Q"] * M["Wg"],
                         "Wg": lambda: M["Q"].T * dS * M["K"]}}
    form = forms.get(score.key, {}).get(tensor)
    if form is None:
        return None
    return sympy.Eq(TENSORS["d" + tensor].matrix_symbol(), scale_symbolic(spec) * form(), evaluate=False)


def derive(spec: AttentionSpec, *, explicit: bool = True, prove: bool = True,
           progress: Progress | None = None, table: SymbolTable | None = None) -> Derivation:
    """Build the ordered steps of `spec`; with explicit=True also the arrays at its sizes,
    with prove=True also the proofs (see symattn.prove). `table` supplies the element symbols
    (the multi-head layer passes one per head); by default a fresh one."""
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"derive expects an AttentionSpec, got {type(spec).__name__}")
    note = progress or (lambda message: None)
    check_policy(spec)
    if explicit:
        spec.check_explicit()
        table = SymbolTable(spec) if table is None else table
        builders = _explicit(spec, table)
    rows = _step_table(spec)
    mod = spec.mod_object
    lines = chains({row[0]: (row[2], row[3], row[6]) for row in rows if row[1] == "backward"},
                   {"dQ", "dK", *("d" + p.tensor for p in SCORES[spec.score].params)},
                   {"d" + p.tensor for p in (mod.params if mod else ())}, mod is not None)
    if uniform_branch(spec):  # the Jacobian lines hold only where a key is seen: the chain rule, then the result
        lines["dS"] = (lines["dS"][0], lines["dS"][-1])
    steps = []
    for n, (key, phase, tensor, indices, title, text, rhs, matrix) in enumerate(rows, 1):
        note(f"derive {n}/{len(rows)}: {key}")
        values = builders[key]() if explicit else None
        symbols = table[tensor] if explicit else None
        steps.append(Step(key, title, text, phase, tensor, indices, rhs, values, matrix, symbols,
                          chain=lines.get(key, ())))
    derivation = Derivation(spec, tuple(steps), table)
    if prove and explicit:
        from .prove import prove as run_proofs
        derivation = run_proofs(derivation, progress=progress)
    return derivation
