"""Scores as data: each score is one object owning its element formula s(q_i, k_j; θ), its parameters θ, its
names and one sentence of explanation. Its gradients ∂s/∂q, ∂s/∂k, ∂s/∂θ are derived by SymPy (`partial`),
never written by hand.

The formula is written once, against accessors (`q(x)`, `k(x)`, `theta[name](...)`) and a sum `Σ(f, dim)`;
the same function gives the explicit expression (element symbols, sums expanded) and the indexed one
(IndexedBase, sympy.Sum over fresh dummies, valid at any size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy

from .tensors import INDEX_OF_DIM, SECOND_INDEX, SIZES, TENSORS, SymbolTable, Tensor

Formula = Callable[..., sympy.Expr]


def scale_symbolic(spec) -> sympy.Expr:
    """Scale in indexed formulas: 1/√d_k with d_k symbolic, or the spec's exact number."""
    return 1 / sympy.sqrt(SIZES["d_k"]) if spec.scale is None else spec.scale_exact


@dataclass(frozen=True)
class Param:
    """A learnable parameter of a score: its API name (the params dict key), its tensor (code name, LaTeX
    name, element names, dims). Declaring it registers the tensor and its gradient "d<tensor>" in TENSORS."""

    name: str  # "W_a"
    tensor: str  # "Wa"
    latex: str  # "W_a"
    elem: str  # "wa": element symbols wa_{0,1}
    elem_latex: str  # "w^{a}"
    dims: tuple[str, ...]  # ("d_k", "d_a")

    def __post_init__(self):
        for name, latex, elem, elem_latex in ((self.tensor, self.latex, self.elem, self.elem_latex),
                                              ("d" + self.tensor, r"\mathrm{d}" + self.latex, "d" + self.elem,
                                               r"\mathrm{d}" + self.elem_latex)):
            tensor = Tensor(name, latex, elem, elem_latex, self.dims)
            if TENSORS.setdefault(name, tensor) != tensor:
                raise ValueError(f"tensor {name!r} is declared twice, differently")


@dataclass(frozen=True)
class Score:
    """s(q_i, k_j; θ): `formula(q, k, theta, Σ)` returns the unscaled similarity; `scaled` scores are
    multiplied by the spec's scale (1/√d_k by default) in a step of their own."""

    key: str  # "dot"
    title: str  # step title
    latex: str  # the formula in LaTeX, for documents
    explanation: str  # one sentence
    params: tuple[Param, ...]
    formula: Formula
    work: Callable[[dict], int]  # multiply-adds of one s_ij at the given sizes (explicit-expansion cost)
    scaled: bool = True
    matrix: Callable[[], sympy.Expr] | None = None  # matrix form of the similarity, where one exists
    text: str = ""  # the formula in plain text, for the command line's help (score_names.TEXTS)

    # -- explicit ------------------------------------------------------------------------------------------
    def explicit(self, spec, table: SymbolTable, qi: int, kj: int) -> sympy.Expr:
        """The unscaled similarity of query qi and key kj in element symbols (sums expanded)."""
        Q, K = table["Q"], table["K"]
        theta = {p.name: (lambda *ix, t=p.tensor: table[t][ix]) for p in self.params}
        return self.formula(lambda x: Q[qi, x], lambda x: K[kj, x], theta,
                            lambda f, dim: sympy.Add(*(f(x) for x in range(spec.sizes[dim]))))

    # -- indexed -------------------------------------------------------------------------------------------
    def indexed(self, i: sympy.Symbol, j: sympy.Symbol, *, primed: bool = False) -> sympy.Expr:
        """The unscaled similarity with IndexedBase tensors and sympy.Sum (any size). Summation indices are the
        textbook letters (a over d_k, then f; r over d_a), or fresh primed ones (`primed`) where the result is
        differentiated by an element with free indices of those letters."""
        Q, K = TENSORS["Q"].base, TENSORS["K"].base
        theta = {p.name: (lambda *ix, t=p.tensor: TENSORS[t].base[ix]) for p in self.params}
        primes = iter(sympy.symbols("a' b' c' r' e' g' a'' b'' c'' r''", integer=True, nonnegative=True))
        depth = {"d_k": 0, "d_a": 0}  # textbook letters by nesting depth: sibling sums reuse a letter

        def total(f, dim):
            letters = [INDEX_OF_DIM[dim], *([SECOND_INDEX[dim]] if dim in SECOND_INDEX else [])]
            x = next(primes) if primed or depth[dim] >= len(letters) else letters[depth[dim]]
            depth[dim] += 1
            body = f(x)
            depth[dim] -= 1
            return sympy.Sum(body, (x, 0, SIZES[dim] - 1))
        return self.formula(lambda x: Q[i, x], lambda x: K[j, x], theta, total)


def partial(expr: sympy.Expr, wrt: sympy.Expr) -> sympy.Expr:
    """∂expr/∂wrt by SymPy (see `derivative`); for indexed expressions, Kronecker deltas against summation
    dummies are contracted and index-range conditions (always true for indices in range) dropped."""
    return contract(derivative(expr, wrt))


def derivative(expr: sympy.Expr, wrt: sympy.Expr) -> sympy.Expr:
    """sympy.diff, with max/min differentiated by the chain rule as the branch they pick: d max(g, c) =
    Piecewise((dg, g >= c), (0, True)), 1 at the kink as PyTorch's clamp_min / maximum give; the max itself
    stays a max. (SymPy's own Heaviside(g - c)·dg would put 0·(1/0) where a norm clamp holds.)"""
    in_indices = {m for e in expr.atoms(sympy.Indexed) for x in e.indices for m in x.atoms(sympy.Max, sympy.Min)}
    nodes = sorted(expr.atoms(sympy.Max, sympy.Min) - in_indices, key=sympy.default_sort_key)  # not table indices
    if not nodes:
        return steps_as_piecewise(sympy.diff(expr, wrt))
    held = {m: sympy.Dummy("m") for m in nodes}
    frozen = expr.xreplace(held)
    out = sympy.diff(frozen, wrt)
    for m, x in held.items():
        outer = sympy.diff(frozen, x)
        if outer != 0:
            out += outer * _branch_derivative(m, wrt)
    return out.xreplace({x: m for m, x in held.items()})


def _branch_derivative(m: sympy.Expr, wrt: sympy.Expr) -> sympy.Expr:
    """d Max(x, rest...)/d wrt = dx where x >= max(rest), else d max(rest); x is a non-constant argument, so a
    tie with a constant (a clamp at its threshold) passes the gradient through, as torch.clamp_min does."""
    first, *rest = sorted(m.args, key=lambda x: x.is_number)
    other = m.func(*rest) if len(rest) > 1 else rest[0]
    test = first >= other if isinstance(m, sympy.Max) else first <= other
    d_first, d_other = derivative(first, wrt), derivative(other, wrt)
    if d_first == d_other:
        return d_first
    return sympy.Piecewise((d_first, test), (d_other, True))


def steps_as_piecewise(expr: sympy.Expr) -> sympy.Expr:
    """Heaviside(x) -> Piecewise((1, x >= 0), (0, True)) (a node every printer knows)."""
    return expr.replace(lambda e: isinstance(e, sympy.Heaviside),
                        lambda e: sympy.Piecewise((1, e.args[0] >= 0), (0, True)))


def contract(expr: sympy.Expr) -> sympy.Expr:
    """Σ_x δ(y, x) f(x) -> f(y) for a summation dummy x (y lies in x's range by construction), and
    Piecewise((e, range condition), (0, True)) -> e."""
    def rewrite(node):
        if isinstance(node, sympy.Sum):  # innermost first: contracting an inner sum can expose a delta here
            function, limits = rewrite(node.function), list(node.limits)
            for n, (x, _, _) in enumerate(limits):
                deltas = [d for d in sympy.Mul.make_args(function) if isinstance(d, sympy.KroneckerDelta)
                          and x in d.free_symbols]
                if deltas:
                    other = deltas[0].args[0] if deltas[0].args[1] == x else deltas[0].args[1]
                    function = (function / deltas[0]).subs(x, other)
                    limits.pop(n)
                    return rewrite(sympy.Sum(function, *limits) if limits else function)
            return sympy.Sum(function, *limits)
        if isinstance(node, sympy.Piecewise) and len(node.args) == 2 and node.args[1] == (0, True) \
                and _is_range(node.args[0][1]):
            return rewrite(node.args[0][0])
        if node.args:
            return node.func(*(rewrite(arg) for arg in node.args))
        return node
    return rewrite(expr)


def _is_range(condition) -> bool:
    """An index-range condition (integer symbols only, no tensor entries), as diff leaves around a delta."""
    return not condition.atoms(sympy.Indexed) and all(x.is_integer for x in condition.free_symbols)


# -- the library ---------------------------------------------------------------------------------------------

def _dot(q, k, theta, total):
    return total(lambda a: q(a) * k(a), "d_k")


def _general(q, k, theta, total):
    W = theta["W_a"]
    return total(lambda a: q(a) * total(lambda b: W(a, b) * k(b), "d_k"), "d_k")


def _additive(q, k, theta, total):
    W, U, v, b = theta["W_a"], theta["U_a"], theta["v_a"], theta["b_a"]
    return total(lambda r: v(r) * sympy.tanh(total(lambda a: q(a) * W(a, r), "d_k")
                                             + total(lambda a: k(a) * U(a, r), "d_k") + b(r)), "d_a")


#: torch.nn.functional.normalize's eps: a norm below it is replaced by it (x / max(‖x‖, eps)).
NORM_EPS = sympy.Rational(1, 10**12)


def _cosine(q, k, theta, total):
    norm_q = sympy.Max(sympy.sqrt(total(lambda a: q(a) ** 2, "d_k")), NORM_EPS)
    norm_k = sympy.Max(sympy.sqrt(total(lambda a: k(a) ** 2, "d_k")), NORM_EPS)
    return theta["tau"](0) * total(lambda a: q(a) * k(a), "d_k") / (norm_q * norm_k)


def _matrix(expr: Callable[..., sympy.Expr]) -> Callable[[], sympy.Expr]:
    return lambda: expr(*(TENSORS[n].matrix_symbol() for n in ("Q", "K", "Wg")))


W_GENERAL = Param("W_a", "Wg", "W_a", "wg", "w^{a}", ("d_k", "d_k"))
ADDITIVE = (Param("W_a", "Wa", "W_a", "wa", "w^{a}", ("d_k", "d_a")), Param("U_a", "Ua", "U_a", "ua", "u^{a}", ("d_k", "d_a")),
            Param("v_a", "va", "v_a", "va", "v^{a}", ("d_a",)), Param("b_a", "ba", "b_a", "ba", "b^{a}", ("d_a",)))

TAU = Param("tau", "tau", r"\tau", "tau", r"\tau", ("one",))

SCORES: dict[str, Score] = {s.key: s for s in (
    Score("dot", "Query-key similarities by dot product", r"s_{ij} = \tau\, q_i \cdot k_j",
          r"Each query is compared with every key by a dot product over the $d_k$ features.", (), _dot,
          lambda n: n["d_k"], matrix=lambda: TENSORS["Q"].matrix_symbol() * TENSORS["K"].matrix_symbol().T,
          text="scale q.k"),
    Score("general", "Query-key similarities through a learned bilinear form (Luong)",
          r"s_{ij} = \tau\, q_i W_a k_j^\top",
          r"Each query is compared with every key through a learned $d_k \times d_k$ matrix $W_a$ (Luong's "
          r"general score); $W_a = I$ gives the dot product.", (W_GENERAL,), _general, lambda n: n["d_k"] ** 2,
          matrix=_matrix(lambda Q, K, W: Q * W * K.T), text="scale q W_a k^T (Luong)"),
    Score("additive", "Query-key scores by a one-layer network (Bahdanau)",
          r"s_{ij} = v_a^\top \tanh(q_i W_a + k_j U_a + b_a)",
          r"Each query-key pair goes through a hidden layer of $d_a$ $\tanh$ units (Bahdanau's additive score); "
          r"the score is not scaled. Below, $\eta_{ijr} = b_{a,r} + (q_i W_a)_r + (k_j U_a)_r$ names the input of "
          r"hidden unit $r$ for query $i$ and key $j$, so $s_{ij} = \sum_r v_{a,r} \tanh \eta_{ijr}$.", ADDITIVE, _additive, lambda n: 2 * n["d_k"] * n["d_a"], scaled=False,
          text="v_a^T tanh(q W_a + k U_a + b_a) (Bahdanau; --hidden D_A)"),
    Score("cosine", "Query-key similarities by cosine (normalised dot product)",
          r"s_{ij} = \tau\, \frac{q_i \cdot k_j}"
          r"{\max(\lVert q_i \rVert, \epsilon)\, \max(\lVert k_j \rVert, \epsilon)}",
          r"Queries and keys are normalised to unit length (norms clamped at $\epsilon = 10^{-12}$, as "
          r"torch.nn.functional.normalize does) and compared by a dot product times the learned temperature "
          r"$\tau$; the score is not scaled by $1/\sqrt{d_k}$: $\tau$ is the temperature. Below, "
          r"$r^q_i = \lVert q_i \rVert$ and $\nu^q_i = \max(\epsilon, r^q_i)$ name query $i$'s norm and its clamped "
          r"value (likewise $r^k_j$, $\nu^k_j$ for key $j$): $\partial \nu^q_i / \partial q_{ia} = q_{ia} / r^q_i$ "
          r"where $r^q_i \geq \epsilon$, and 0 where the clamp holds.", (TAU,), _cosine,
          lambda n: 3 * n["d_k"], scaled=False, text="tau q.k/(norm(q) norm(k))"),
)}
