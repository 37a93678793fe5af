"""The multi-head attention layer as a Derivation: projections, each head's attention (the core steps on a
head's symbol table), concatenation, output projection, and the backward pass through all of them.

Layout: x (n_q, d_model), y (n_k, d_model) (y = x in self-attention), w_q (d_model, h·d_k),
w_k (d_model, h_kv·d_k), w_v (d_model, h_kv·d_v), w_o (h·d_v, d_model); head i reads columns
i·d_k:(i+1)·d_k of Q̂ = x w_q (+ b_q) and key/value group g = ⌊i·h_kv/h⌋. Z = Concat(O^(0..h-1)) w_o (+ b_o).
In indexed formulas a per-head tensor carries the head as a leading index: O_{h,i,b}.

Every head computes the spec's variant (score, score mod, mask). The parameters θ of the score and the mod are
shared: each head's symbol table aliases them to the layer's, the layer lists them once as inputs, and their
gradient dθ = Σ_h dθ^(h) sums the heads' contributions (each head's dθ^(h) is its single-head step).
"""
from __future__ import annotations

import dataclasses

import sympy

from .tensors import DIMS, HEAD, INDEX_OF_DIM, SIZES, TENSORS, SymbolTable, c, i, j, m
from .derive import Derivation, Progress, Step, derive, parameters
from .spec import MultiHeadSpec

#: A head's steps the layer does not repeat: its inputs are the layer's, the layer sums O directly, and the
#: softmax Jacobian collapses into dS.
HEAD_SKIPPED = ("weighted_values", "sum", "jacobian")
r = sympy.Symbol("r", integer=True, nonnegative=True)  # head within a key/value group
h_ = sympy.Symbol("h'", integer=True, nonnegative=True)  # a head, summed over in a shared parameter's gradient


def _array(rows) -> sympy.ImmutableDenseNDimArray:
    return sympy.ImmutableDenseNDimArray(rows)


def _columns(M: sympy.ImmutableMatrix, start: int, width: int) -> sympy.ImmutableDenseNDimArray:
    return _array(M[:, start:start + width].tolist())


class _Layer:
    """Explicit arrays of the layer's own steps, built with plain loops (independent of the indexed forms)."""

    def __init__(self, spec: MultiHeadSpec, t: SymbolTable):
        self.spec, self.t = spec, t

    def matmul(self, A: str | sympy.Array, B: str, transpose_a=False, transpose_b=False, bias: str | None = None):
        A = self.t.matrix(A) if isinstance(A, str) else A
        B = self.t.matrix(B)
        A, B = (A.T if transpose_a else A), (B.T if transpose_b else B)
        out = A * B
        if bias is not None and self.spec.bias:
            b = self.t[bias]
            out = out + sympy.ImmutableMatrix(out.rows, out.cols, lambda x, y: b[y])
        return _array(out.tolist())

    def column_sums(self, name: str):
        M = self.t.matrix(name)
        return _array([sum(M[:, y]) for y in range(M.cols)])

    def concat(self, heads: list[SymbolTable]):
        s = self.spec
        return _array([[heads[h]["O"][x, y] for h in range(s.heads) for y in range(s.d_v)] for x in range(s.n_q)])

    def merge(self, heads: list[SymbolTable], name: str, width: int, rows: int):
        """dQ̂ (one head per column block) or dK̂, dV̂ (each group sums its heads)."""
        s = self.spec
        blocks = s.heads if name == "dQ" else s.kv_heads
        members = [[h for h in range(s.heads) if (h if name == "dQ" else s.group(h)) == g] for g in range(blocks)]
        return _array([[sum(heads[h][name][x, y] for h in members[g]) for g in range(blocks) for y in range(width)]
                       for x in range(rows)])


def _source(spec: MultiHeadSpec) -> str:
    return "Yin" if spec.cross else "X"


def _indexed(spec: MultiHeadSpec) -> dict[str, tuple]:
    """key -> (tensor, indices, rhs, matrix form) of the layer's own steps."""
    B = {n: t.base for n, t in TENSORS.items()}
    M = {n: t.matrix_symbol() for n, t in TENSORS.items() if len(t.dims) <= 2}
    src, Msrc = B[_source(spec)], M[_source(spec)]
    Sum, dm, dk, dv = sympy.Sum, SIZES["d_model"], SIZES["d_k"], SIZES["d_v"]
    nq, nk, per_group = SIZES["n_q"], SIZES["n_k"], SIZES["h"] / SIZES["h_kv"]
    one = sympy.OneMatrix

    def bias(name, index):
        return B[name][index] if spec.bias else 0

    def with_bias(expr, name, rows):
        return expr + one(rows, 1) * M[name].T if spec.bias else expr

    def group_sum(name, width):
        return Sum(B[name][sympy.floor(c / width) * per_group + r, j, sympy.Mod(c, width)], (r, 0, per_group - 1))

    dx = Sum(B["dQp"][i, c] * B["Wq"][m, c], (c, 0, DIMS["hd_k"] - 1))
    dx_matrix = M["dQp"] * M["Wq"].T
    dy = (Sum(B["dKp"][j, c] * B["Wk"][m, c], (c, 0, DIMS["gd_k"] - 1))
          + Sum(B["dVp"][j, c] * B["Wv"][m, c], (c, 0, DIMS["gd_v"] - 1)))
    dy_matrix = M["dKp"] * M["Wk"].T + M["dVp"] * M["Wv"].T
    if not spec.cross:  # x feeds queries, keys and values: its gradient sums the three paths
        dx, dx_matrix = dx + dy.xreplace({j: i}), dx_matrix + dy_matrix
    L = sympy.Symbol("L")
    return {
        "project_q": ("Qp", (i, c), Sum(B["X"][i, m] * B["Wq"][m, c], (m, 0, dm - 1)) + bias("bq", c),
                      sympy.Eq(M["Qp"], with_bias(M["X"] * M["Wq"], "bq", nq), evaluate=False)),
        "project_k": ("Kp", (j, c), Sum(src[j, m] * B["Wk"][m, c], (m, 0, dm - 1)) + bias("bk", c),
                      sympy.Eq(M["Kp"], with_bias(Msrc * M["Wk"], "bk", nk), evaluate=False)),
        "project_v": ("Vp", (j, c), Sum(src[j, m] * B["Wv"][m, c], (m, 0, dm - 1)) + bias("bv", c),
                      sympy.Eq(M["Vp"], with_bias(Msrc * M["Wv"], "bv", nk), evaluate=False)),
        "concat": ("C", (i, c), B["O"][sympy.floor(c / dv), i, sympy.Mod(c, dv)], None),
        "project_out": ("Out", (i, m), Sum(B["C"][i, c] * B["Wo"][c, m], (c, 0, DIMS["hd_v"] - 1)) + bias("bo", m),
                        sympy.Eq(M["Out"], with_bias(M["C"] * M["Wo"], "bo", nq), evaluate=False)),
        "upstream": ("dOut", (i, m), None,
                     sympy.Eq(L, Sum(B["dOut"][i, m] * B["Out"][i, m], (i, 0, nq - 1), (m, 0, dm - 1)), evaluate=False)),
        "dWo": ("dWo", (c, m), Sum(B["C"][i, c] * B["dOut"][i, m], (i, 0, nq - 1)),
                sympy.Eq(M["dWo"], M["C"].T * M["dOut"], evaluate=False)),
        "dbo": ("dbo", (m,), Sum(B["dOut"][i, m], (i, 0, nq - 1)), None),
        "dC": ("dC", (i, c), Sum(B["dOut"][i, m] * B["Wo"][c, m], (m, 0, dm - 1)),
               sympy.Eq(M["dC"], M["dOut"] * M["Wo"].T, evaluate=False)),
        "dQp": ("dQp", (i, c), B["dQ"][sympy.floor(c / dk), i, sympy.Mod(c, dk)], None),
        "dKp": ("dKp", (j, c), group_sum("dK", dk), None),
        "dVp": ("dVp", (j, c), group_sum("dV", dv), None),
        "dWq": ("dWq", (m, c), Sum(B["X"][i, m] * B["dQp"][i, c], (i, 0, nq - 1)),
                sympy.Eq(M["dWq"], M["X"].T * M["dQp"], evaluate=False)),
        "dbq": ("dbq", (c,), Sum(B["dQp"][i, c], (i, 0, nq - 1)), None),
        "dWk": ("dWk", (m, c), Sum(src[j, m] * B["dKp"][j, c], (j, 0, nk - 1)),
                sympy.Eq(M["dWk"], Msrc.T * M["dKp"], evaluate=False)),
        "dbk": ("dbk", (c,), Sum(B["dKp"][j, c], (j, 0, nk - 1)), None),
        "dWv": ("dWv", (m, c), Sum(src[j, m] * B["dVp"][j, c], (j, 0, nk - 1)),
                sympy.Eq(M["dWv"], Msrc.T * M["dVp"], evaluate=False)),
        "dbv": ("dbv", (c,), Sum(B["dVp"][j, c], (j, 0, nk - 1)), None),
        "dX": ("dX", (i, m), dx, sympy.Eq(M["dX"], dx_matrix, evaluate=False)),
        "dY": ("dYin", (j, m), dy, sympy.Eq(M["dYin"], dy_matrix, evaluate=False)),
    }


#: key -> (title, explanation); mathematics between $ signs (typeset in LaTeX/Markdown, Unicode in text). @src is
#: the keys' and values' input (x, or y in cross-attention) and @1b_X the bias term of a layer with biases (_text).
TEXTS = {
    "x": ("Input $x$", r"Each of the $n_q$ rows of $x$ is a token's $d_{\mathrm{model}}$-dimensional representation; "
          r"it gives the queries (and, in self-attention, the keys and values)."),
    "y": ("Input $y$", r"Cross-attention: the $n_k$ rows of $y$ give the keys and values."),
    "w_q": ("Query projection $W_Q$", r"Columns $h d_k$ to $(h+1) d_k - 1$ project $x$ into the queries of head $h$."),
    "w_k": ("Key projection $W_K$", r"One $d_k$-column block per key/value group (grouped-query attention when "
            r"$H_{kv} < H$)."),
    "w_v": ("Value projection $W_V$", r"One $d_v$-column block per key/value group."),
    "w_o": ("Output projection $W_O$", r"Maps the concatenated head outputs ($H d_v$ columns) back to "
            r"$d_{\mathrm{model}}$."),
    "b_q": ("Query bias", "Added to every projected query."), "b_k": ("Key bias", "Added to every projected key."),
    "b_v": ("Value bias", "Added to every projected value."), "b_o": ("Output bias", "Added to every output row."),
    "project_q": ("Query projection", r"$\hat{Q} = x W_Q@1b_Q$: all heads' queries at "
                  r"once; head $h$ reads $Q^{(h)}$, column block $h$ of $\hat{Q}$."),
    "project_k": ("Key projection", r"$\hat{K} = @src W_K@1b_K$: every key/value group's keys; head $h$ "
                  r"reads $K^{(h)}$, column block $g = \lfloor h H_{kv} / H \rfloor$ of $\hat{K}$ (its group's)."),
    "project_v": ("Value projection", r"$\hat{V} = @src W_V@1b_V$: every key/value group's values; head "
                  r"$h$ reads $V^{(h)}$, column block $\lfloor h H_{kv} / H \rfloor$ of $\hat{V}$."),
    "concat": ("Concatenation", r"$C = \operatorname{Concat}(O^{(0)}, \ldots, O^{(H-1)})$: the heads' outputs side "
               r"by side, column block $h$ of $C$ is head $h$'s output."),
    "project_out": ("Output projection", r"$Z = \operatorname{MultiHead}(x) = C W_O@1b_O$: the "
                    r"layer's output."),
    "upstream": ("Upstream gradient", r"Backward pass for a scalar loss $L$ with $\partial L / \partial Z = "
                 r"\mathrm{d}Z$, i.e. $L = \sum_{i,m} \mathrm{d}Z_{im} Z_{im}$."),
    "dWo": ("Gradient of $W_O$", r"$Z$ is linear in $W_O$: $\mathrm{d}W_O = C^\top \mathrm{d}Z$."),
    "dbo": ("Gradient of $b_O$", r"Each output row adds $b_O$: $\mathrm{d}b_O$ sums $\mathrm{d}Z$ over the rows."),
    "dC": ("Gradient of the concatenation", r"$\mathrm{d}C = \mathrm{d}Z W_O^\top$; column block $h$ is head $h$'s "
           r"upstream gradient $\mathrm{d}O^{(h)}$."),
    "dQp": ("Gradient of the projected queries", r"Column block $h$ of $\mathrm{d}\hat{Q}$ is head $h$'s "
            r"$\mathrm{d}Q^{(h)}$."),
    "dKp": ("Gradient of the projected keys", r"A key/value group's keys feed every head of the group: their "
            r"$\mathrm{d}K^{(h)}$ add."),
    "dVp": ("Gradient of the projected values", r"A group's values feed every head of the group: their "
            r"$\mathrm{d}V^{(h)}$ add."),
    "dWq": ("Gradient of $W_Q$", r"$\mathrm{d}W_Q = x^\top \mathrm{d}\hat{Q}$."),
    "dbq": ("Gradient of $b_Q$", r"$\mathrm{d}b_Q$ sums $\mathrm{d}\hat{Q}$ over the rows."),
    "dWk": ("Gradient of $W_K$", r"$\mathrm{d}W_K = @src^\top \mathrm{d}\hat{K}$."),
    "dbk": ("Gradient of $b_K$", r"$\mathrm{d}b_K$ sums $\mathrm{d}\hat{K}$ over the rows."),
    "dWv": ("Gradient of $W_V$", r"$\mathrm{d}W_V = @src^\top \mathrm{d}\hat{V}$."),
    "dbv": ("Gradient of $b_V$", r"$\mathrm{d}b_V$ sums $\mathrm{d}\hat{V}$ over the rows."),
    "dX": ("Gradient of $x$", r"$\mathrm{d}x = \mathrm{d}\hat{Q} W_Q^\top$ (self-attention adds "
           r"$\mathrm{d}\hat{K} W_K^\top + \mathrm{d}\hat{V} W_V^\top$: $x$ feeds all three paths)."),
    "dY": ("Gradient of $y$", r"$\mathrm{d}y = \mathrm{d}\hat{K} W_K^\top + \mathrm{d}\hat{V} W_V^\top$."),
}


def _text(key: str, spec: MultiHeadSpec) -> tuple[str, str]:
    """TEXTS[key] for this layer: @src is x (self-attention) or y (cross), @1b_X is + 1 b_Xᵀ with biases, else
    nothing."""
    title, text = TEXTS[key]
    text = text.replace("@src", "y" if spec.cross else "x")
    for X in "QKVO":
        text = text.replace(f"@1b_{X}", rf" + \mathbf{{1}} b_{X}^\top" if spec.bias else "")
    return title, text


def _inputs(spec: MultiHeadSpec) -> list[tuple[str, str]]:
    keys = [("x", "X")] + ([("y", "Yin")] if spec.cross else [])
    keys += [("w_q", "Wq"), ("w_k", "Wk"), ("w_v", "Wv"), ("w_o", "Wo")]
    if spec.bias:
        keys += [("b_q", "bq"), ("b_k", "bk"), ("b_v", "bv"), ("b_o", "bo")]
    return keys


def derive_multihead(spec: MultiHeadSpec, *, explicit: bool = True, prove: bool = True,
                     progress: Progress | None = None) -> Derivation:
    """The layer's ordered steps (each head's steps of the spec's variant included; the variant's parameters θ
    once, shared, with dθ summed over the heads), and its proofs when prove=True."""
    if not isinstance(spec, MultiHeadSpec):
        raise TypeError(f"derive_multihead expects a MultiHeadSpec, got {type(spec).__name__}")
    note = progress or (lambda message: None)
    if explicit:
        spec.check_explicit()
    t = SymbolTable(spec)
    layer, indexed = _Layer(spec, t), _indexed(spec)
    heads = [_head_table(spec, t, h) if explicit else None for h in range(spec.heads)]
    head_derivations = [derive(spec.head, explicit=explicit, prove=False, table=table) for table in heads]
    src = _source(spec)
    builders = {
        "project_q": lambda: layer.matmul("X", "Wq", bias="bq"), "project_k": lambda: layer.matmul(src, "Wk", bias="bk"),
        "project_v": lambda: layer.matmul(src, "Wv", bias="bv"), "concat": lambda: layer.concat(heads),
        "project_out": lambda: layer.matmul("C", "Wo", bias="bo"),
        "dWo": lambda: layer.matmul("C", "dOut", transpose_a=True), "dbo": lambda: layer.column_sums("dOut"),
        "dC": lambda: layer.matmul("dOut", "Wo", transpose_b=True),
        "dQp": lambda: layer.merge(heads, "dQ", spec.d_k, spec.n_q),
        "dKp": lambda: layer.merge(heads, "dK", spec.d_k, spec.n_k),
        "dVp": lambda: layer.merge(heads, "dV", spec.d_v, spec.n_k),
        "dWq": lambda: layer.matmul("X", "dQp", transpose_a=True), "dbq": lambda: layer.column_sums("dQp"),
        "dWk": lambda: layer.matmul(src, "dKp", transpose_a=True), "dbk": lambda: layer.column_sums("dKp"),
        "dWv": lambda: layer.matmul(src, "dVp", transpose_a=True), "dbv": lambda: layer.column_sums("dVp"),
        "dX": lambda: _dx(layer, spec), "dY": lambda: _dy(layer),
    }

    def own(key: str, phase: str) -> Step:
        tensor, indices, rhs, matrix = indexed[key]
        return Step(key, *_text(key, spec), phase, tensor, indices, rhs, builders[key]() if explicit else None,
                    matrix, t[tensor] if explicit else None)

    def head_steps(phase: str) -> list[Step]:
        return [_head_step(s, h) for h, d in enumerate(head_derivations) for s in d.steps
                if s.phase == phase and not s.is_input and s.key not in HEAD_SKIPPED]

    note("derive: projections and heads")
    steps = [Step(key, *_text(key, spec), "forward", tensor, tuple(_index(tensor)), None,
                  t[tensor] if explicit else None, None, t[tensor] if explicit else None) for key, tensor in _inputs(spec)]
    steps += [_shared_input(head_derivations[0].step(p.tensor)) for p in parameters(spec.head)]
    steps += [own(k, "forward") for k in ("project_q", "project_k", "project_v")]
    steps += head_steps("forward")
    steps += [own("concat", "forward"), own("project_out", "forward")]
    note("derive: backward through the layer")
    steps.append(Step("upstream", *_text("upstream", spec), "backward", "dOut", (i, m), None,
                      t["dOut"] if explicit else None, indexed["upstream"][3], t["dOut"] if explicit else None))
    steps += [own(k, "backward") for k in ("dWo", "dbo", "dC") if spec.bias or k != "dbo"]
    steps += head_steps("backward")
    steps += [_shared_gradient(spec, t, heads, p, explicit) for p in parameters(spec.head)]
    steps += [own(k, "backward") for k in ("dQp", "dKp", "dVp", "dWq", "dbq", "dWk", "dbk", "dWv", "dbv", "dX")
              if spec.bias or not k.startswith("db")]
    if spec.cross:
        steps.append(own("dY", "backward"))
    derivation = Derivation(spec, tuple(steps), t if explicit else None)
    if prove and explicit:
        from .prove import prove as run_proofs
        derivation = run_proofs(derivation, progress=progress)
    return derivation


def _index(tensor: str) -> tuple:
    return tuple(INDEX_OF_DIM[d] for d in TENSORS[tensor].dims)


def _dx(layer: _Layer, spec: MultiHeadSpec):
    dx = layer.matmul("dQp", "Wq", transpose_b=True)
    if not spec.cross:
        dx = dx + _dy(layer)
    return dx


def _dy(layer: _Layer):
    return layer.matmul("dKp", "Wk", transpose_b=True) + layer.matmul("dVp", "Wv", transpose_b=True)


def _head_step(step: Step, h: int) -> Step:
    """Head h's copy of one of its steps: key, title and tag name the head, and its indexed formulas (right-hand
    side, chain-rule line, matrix form) read a score mod's head index as h itself (ALiBi's slope of head 1 is
    2^-8 under "Head 1", not 2^(-4h-4))."""
    def at_head(expr):
        return expr.xreplace({HEAD: sympy.Integer(h)}) if isinstance(expr, sympy.Basic) else expr
    return dataclasses.replace(step, key=f"h{h}.{step.key}", title=f"Head {h}: {step.title}", tag=str(h),
                               rhs=at_head(step.rhs), chain=tuple(map(at_head, step.chain)),
                               matrix=at_head(step.matrix))


def _head_table(spec: MultiHeadSpec, t: SymbolTable, h: int) -> SymbolTable:
    """Head h's symbol table: Q, K, V its column blocks of the projections, dO its block of dC, θ the layer's."""
    g = spec.group(h)
    aliases = {"Q": _columns(t.matrix("Qp"), h * spec.d_k, spec.d_k),
               "K": _columns(t.matrix("Kp"), g * spec.d_k, spec.d_k),
               "V": _columns(t.matrix("Vp"), g * spec.d_v, spec.d_v),
               "dO": _columns(t.matrix("dC"), h * spec.d_v, spec.d_v)}
    aliases |= {p.tensor: t[p.tensor] for p in parameters(spec.head)}  # shared by every head
    return t.child(spec.head, str(h), aliases, head=h)


def _shared_input(step: Step) -> Step:
    """A parameter θ's input step (a head's, whose symbols are the layer's), said to be shared."""
    return dataclasses.replace(step, explanation=step.explanation + " One $" + TENSORS[step.tensor].latex +
                               "$ serves every head: the heads share the variant's parameters.")


def _shared_gradient(spec: MultiHeadSpec, t: SymbolTable, heads: list[SymbolTable], p, explicit: bool) -> Step:
    """dθ = Σ_h dθ^(h): a shared parameter's gradient sums every head's contribution."""
    name = "d" + p.tensor
    tensor, latex = TENSORS[name], TENSORS[p.tensor].latex
    index = TENSORS[p.tensor].indices()
    rhs = sympy.Sum(tensor.base[(h_, *index)], (h_, 0, SIZES["h"] - 1))
    shape = tensor.matrix_symbol().shape
    matrix = sympy.Eq(tensor.matrix_symbol(), sympy.MatAdd(*(sympy.MatrixSymbol(f"{name}^({h})", *shape)
                                                             for h in range(spec.heads))), evaluate=False)
    text = (f"${latex}$ is shared by all heads: every head's scores depend on it, so its gradient sums the heads' "
            f"contributions, $\\mathrm{{d}}{latex} = \\sum_{{h}} \\mathrm{{d}}{latex}^{{(h)}}$, each "
            f"$\\mathrm{{d}}{latex}^{{(h)}}$ as in one head.")
    values = sum((table[name] for table in heads[1:]), heads[0][name]) if explicit else None
    return Step(name, f"Gradient of the parameter ${latex}$", text, "backward", name, index, rhs, values, matrix,
                t[name] if explicit else None)
