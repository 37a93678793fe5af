"""Loop and tile kernels (any sequence length), rendered from the indexed derivation through Jinja2 templates.

The templates (codegen/jinja/*.py.j2) own the loop and tile structure; the per-element formulas (the score, dS,
the summands of O, D, dQ, dK, dV and the coefficients that multiply the rows BLAS or a loop reads) are the
derivation's indexed right-hand sides printed with Indexed -> local or array reads. One source serves float32 and
float64: Numba compiles each kernel per dtype and the helpers dispatch on the scalar type.

`render_variant(mod, mask, key)` renders the same templates for the dot score with a score mod and a mask: the score
line prints the derivation's "mod" step, dS its "dSr" factor, a parameter table's gradient is scattered from its
KroneckerDelta form; the mask gives each query row its span [lo, hi) of keys (tiles outside it are skipped) and,
unless the span is the mask, the condition tested per entry. `render()` (no variant) prints today's module.
"""
from __future__ import annotations

import sympy

from ..filestamp import stamp
from ..symbolic.derive import Derivation, derive
from ..symbolic.usermasks import integer_relation
from ..symbolic.usermods import integer_quotient
from ..symbolic.score import scale_symbolic
from ..symbolic.spec import AttentionSpec
from ..symbolic.tensors import INDEX_OF_DIM, TENSORS
from .printer import NumbaPrinter, check_identifier
from .templates import ENV, HEADER, decorator

LOOP_MODULE = "attention_loops"
SCALE = sympy.Symbol("scale")
#: Indexed reads -> code: the template's locals and batch-offset array reads.
READS = {"St": "acc", "P": "p", "dP": "dp", "D": "D_i", "dS": "ds", "Q": "Q[qz, i, a]", "K": "K[kz, j, a]",
         "V": "V[vz, j, b]", "O": "O[z, i, b]", "dO": "dO[z, i, b]", "Sr": "sr", "dSr": "dsr", "S": "s"}

_ENV = ENV  # the one Jinja2 environment of codegen (templates.py)


def _code(expr: sympy.Expr, spec: AttentionSpec) -> str:
    """Print an indexed expression with its reads as the template's names and the scale as a runtime value."""
    printer = NumbaPrinter({"indexed_map": READS, "symbol_map": {SCALE: "scale"}})
    return printer.doprint(expr.xreplace({scale_symbolic(spec): SCALE}))


def _summand(expr: sympy.Expr) -> sympy.Expr:
    """tau * Sum(f, limits) -> tau * f: the template owns the loop."""
    return expr.replace(lambda x: isinstance(x, sympy.Sum), lambda x: x.function)


def _coefficient(summand: sympy.Expr, read: str) -> sympy.Expr:
    """The factor of a summand that multiplies the array read `read` (blocked loops and BLAS read it themselves)."""
    factor = TENSORS[read].base[tuple(INDEX_OF_DIM[dim] for dim in TENSORS[read].dims)]
    coefficient = sympy.simplify(summand / factor)
    if coefficient.has(factor):
        raise ValueError(f"summand {summand} is not linear in {factor}")
    return coefficient


def _check_tileable(d: Derivation) -> None:
    """The tile kernels get q_i . k_j from BLAS (S = Q K^T) and use one dS tile for dQ = (coef) K and
    dK = (coef)^T Q: the similarity must be that dot product and both coefficients one expression."""
    similarity = d.step("similarity").rhs
    Q, K, i, j = TENSORS["Q"].base, TENSORS["K"].base, INDEX_OF_DIM["n_q"], INDEX_OF_DIM["n_k"]
    dot = (isinstance(similarity, sympy.Sum) and len(similarity.limits) == 1
           and sympy.expand(similarity.function - Q[i, similarity.limits[0][0]] * K[j, similarity.limits[0][0]]) == 0)
    if not dot:
        raise NotImplementedError(f"tile kernels need the dot-product similarity q_i . k_j, got {similarity}")
    dq = _coefficient(_summand(d.step("dQ").rhs), "K")
    dk = _coefficient(_summand(d.step("dK").rhs), "Q")
    if sympy.simplify(dq - dk) != 0:
        raise NotImplementedError(f"tile kernels need one dS coefficient for dQ and dK, got {dq} and {dk}")


def pieces(d: Derivation) -> dict[str, str]:
    """The printed per-element formulas the templates need."""
    spec = d.spec
    return {
        "score": _code(d.step("scaling").rhs, spec),
        "O_term": _code(_summand(d.step("output").rhs), spec),
        "D_term": _code(_summand(d.step("D").rhs), spec),
        "dS": _code(d.step("dS").rhs, spec),
        "dQ_term": _code(_summand(d.step("dQ").rhs), spec),
        "dK_term": _code(_summand(d.step("dK").rhs), spec),
        "dV_term": _code(_summand(d.step("dV").rhs), spec),
        "O_coef": _code(_coefficient(_summand(d.step("output").rhs), "V"), spec),
        "dQ_coef": _code(_coefficient(_summand(d.step("dQ").rhs), "K"), spec),
        "dK_coef": _code(_coefficient(_summand(d.step("dK").rhs), "Q"), spec),
        "dV_coef": _code(_coefficient(_summand(d.step("dV").rhs), "dO"), spec),
    }


def render(command: str = "symattn generate --all  (from a source checkout)") -> str:
    """The loop/tile-kernel module source (deterministic); `command` is its header's way to regenerate it (the
    package's copy by default, a `generate -o DIR` copy by that command)."""
    d = derive(AttentionSpec(1, 1, 1), explicit=False)  # indexed forms hold at any size
    _check_tileable(d)
    header = HEADER.substitute(source="the indexed derivation of scaled dot-product attention",
                               command=command)
    return _render(header, pieces(d), None, LOOP_MODULE)


def _render(header: str, f: dict, v: dict | None, key: str) -> str:
    text = _ENV.get_template(f"{LOOP_MODULE}.py.j2").render(
        header=header, f=f, v=v, key=key, jit=decorator(), jit_parallel=decorator(parallel=True),
        jit_inline=decorator(inline=True), jit_bare=decorator(bare=True), jit_exact=decorator(inline=True, exact=True))
    return stamp(text)


# ------------------------------------------------------------------------------------------------ variants
class _VariantPrinter(NumbaPrinter):
    """NumbaPrinter that prints reads of parameters and run-time mask arrays as indexing (name[k, ...])."""

    def __init__(self, settings, direct: dict[str, str]):
        super().__init__(settings)
        self.direct = direct

    def _print_Indexed(self, expr):
        name = expr.base.label.name
        if name in self.direct:
            return f"{self.direct[name]}[{', '.join(self._print(k) for k in expr.indices)}]"
        return super()._print_Indexed(expr)

    # Float arithmetic stays in the kernels' dtype: a float64 constant or an int64 index in a float32 expression
    # would promote it to float64 (slower, and no float32 exp/tanh). Indices inside reads stay integers.
    def _typed(self, x) -> str:
        if x.is_number:
            return f"_cast(Q, {float(x)!r})"
        return f"_cast(Q, {self._print(x)})"

    def _print_Mul(self, expr):
        if expr.is_integer:
            return super()._print_Mul(expr)
        coefficient, rest = expr.as_coeff_Mul()
        factors = [] if coefficient == 1 else [self._typed(coefficient)]
        for x in sympy.Mul.make_args(rest):
            factors.append(self._typed(x) if x.is_integer else self.parenthesize(x, 50))
        return "*".join(factors)

    def _print_Add(self, expr):
        if expr.is_integer:
            return super()._print_Add(expr)
        terms = [self._typed(x) if x.is_integer else self._print(x) for x in expr.args]
        return "(" + " + ".join(terms) + ")"

    def _print_Pow(self, expr, rational=False):
        if expr.exp in (2, 3) and not expr.base.is_integer:
            base = self.parenthesize(expr.base, 60)
            return "*".join([base] * int(expr.exp))
        if expr.base.is_number and not expr.exp.is_number:  # 2**(-2*h - 2): a float power, never integer **
            return f"{float(expr.base)!r}**({self._print(expr.exp)})"
        return super()._print_Pow(expr, rational)

    def _print_tanh(self, expr):
        return f"_tanh({self._print(expr.args[0])})"

    # A mask's comparison with fractions (SymPy turns floor((i - j)/5) >= -1 into i/5 - j/5 >= -1): both sides
    # times the common denominator, so the kernels compare integers, exactly (i - j >= -5).
    def _print_Relational(self, expr):
        cleared = integer_relation(expr)
        return super()._print_Relational(expr if cleared is None else cleared)

    # floor(i/4) (a mask's i // 4): integer division, exact and valid where no array is in scope (a row's span)
    def _print_floor(self, expr):
        quotient = integer_quotient(expr)
        if quotient is None:
            return super()._print_floor(expr)
        return f"(({self._print(quotient[0])}) // {quotient[1]})"

    def _print_ceiling(self, expr):
        quotient = integer_quotient(expr)
        if quotient is None:
            return super()._print_ceiling(expr)
        return f"(-((-({self._print(quotient[0])})) // {quotient[1]}))"


def variant_params(mod) -> list[tuple[str, str]]:
    """(API name, kernel argument) of the mod's parameters θ, in kernel-argument order."""
    return [] if mod is None else [(p.name, check_identifier(p.tensor)) for p in mod.params]


def _hoisted(*exprs):
    """The mod's pieces that depend on the batch element only (FlexAttention's b and h: ALiBi's per-head slope
    2^(-8(h+1)/H)) as locals zc0, zc1, ... computed once per batch element, not once per score."""
    names: dict = {}

    def walk(node):
        free = node.free_symbols
        if free and all(isinstance(x, sympy.Symbol) and x.name in ("b", "h") for x in free) \
                and not isinstance(node, sympy.Symbol):
            name = next((n for n, e in names.items() if e == node), None) or f"zc{len(names)}"
            names[name] = node
            return sympy.Symbol(name)
        return node.func(*(walk(a) for a in node.args)) if node.args and not isinstance(node, sympy.Indexed) \
            else node
    out = tuple(walk(sympy.sympify(e)) for e in exprs)
    return (*out, names)


def render_variant(mod, mask, key: str) -> str:
    """The loop and tile kernels of the dot score with score mod `mod` and mask `mask` (either may be None),
    printed from derive(AttentionSpec(1, 1, 1, score_mod=mod, mask=mask), explicit=False); `key`: the name of the
    file it goes to (its stem), which the module declares as CACHE_KEY."""
    d = derive(AttentionSpec(1, 1, 1, score_mod=mod.text if mod else None, mask=mask), explicit=False)
    _check_tileable(d)
    arrays = [check_identifier(name) for name, _ in (mask.arrays if mask else ())]
    params = [tensor for _, tensor in variant_params(mod)]
    b = sympy.Symbol("b", integer=True)
    direct = {name: name for name in arrays + params}

    def code(expr) -> str:  # FlexAttention's b and h (any assumptions) -> the batch element's zb, zh
        expr = sympy.sympify(expr)
        bound = {x: {"b": "zb", "h": "zh"}[x.name] for x in expr.free_symbols
                 if isinstance(x, sympy.Symbol) and x.name in ("b", "h")}
        printer = _VariantPrinter({"indexed_map": READS, "symbol_map": {SCALE: "scale", **bound}}, direct)
        return printer.doprint(expr.xreplace({scale_symbolic(d.spec): SCALE}))
    f = pieces(d)
    mod_rhs, dsr_rhs, hoisted = _hoisted(d.step("mod").rhs, d.step("dSr").rhs) if mod else (None, None, {})
    f["mod"] = code(mod_rhs) if mod else "sr"
    f["dSr"] = code(dsr_rhs) if mod else "ds"
    i = INDEX_OF_DIM["n_q"]
    lo, hi = mask.span(b, i) if mask is not None and mask.span is not None else (None, None)
    condition = _visible(d.step("softmax").rhs, mask, i, INDEX_OF_DIM["n_k"])
    v = {"title": _title(mod, mask), "lo": "0" if lo is None else code(lo), "hi": "n_k" if hi is None else code(hi),
         "exact": mask is None or mask.exact, "cond": code(condition),
         "args": "".join(f", {name}" for name in params + arrays), "margs": "".join(f", {name}" for name in arrays),
         "gargs": "".join(f", d{name}" for name in params), "scatter": _scatter(d, mod, code),
         "hoist": [f"{name} = _cast(Q, {code(expr)})" for name, expr in hoisted.items()]}
    header = HEADER.substitute(source=f"the indexed derivation of dot-product attention with {v['title']}",
                               command="symattn.numeric.kernels (rendered on first use into the kernel cache)")
    return _render(header, f, v, key)


def _visible(softmax, mask, i, j):
    """The condition under which key j is visible to query i: the softmax step's Piecewise condition, or, where
    SymPy decided the mask at every size (no Piecewise left: kv_idx < 0 is False for an index j >= 0), the
    mask's own condition, True or False (False: every row is fully masked, and masked_rows decides)."""
    if isinstance(softmax, sympy.Piecewise):
        return softmax.args[0].cond
    condition = sympy.true if mask is None else sympy.sympify(mask.condition(i, j))
    if not isinstance(condition, sympy.logic.boolalg.BooleanAtom):
        raise NotImplementedError(f"the softmax step has no mask condition, but the mask is {condition}")
    return condition


def _title(mod, mask) -> str:
    parts = ([f"score mod {mod.text}"] if mod else []) + ([f"mask {mask.kernel_text or mask.text}"] if mask else [])
    return " and ".join(parts) or "no variant"


def _scatter(d: Derivation, mod, code) -> list[tuple[str, str, str]]:
    """(partial array, index, value) per mod parameter: dθ[index] += value at every visible (i, j), from the
    derivation's dθ = Σ_ij KroneckerDelta(t, index(i, j)) value_ij (or a scalar θ: Σ_ij value_ij)."""
    out = []
    for p in (mod.params if mod else ()):
        summand = _summand(d.step("d" + p.tensor).rhs)
        own = TENSORS[p.tensor].indices()
        deltas = [x for x in sympy.Mul.make_args(summand) if isinstance(x, sympy.KroneckerDelta)]
        if not own:
            out.append((f"d{p.tensor}", "0", code(summand)))
        elif len(own) == 1 and len(deltas) == 1 and own[0] in deltas[0].args:
            index = deltas[0].args[1] if deltas[0].args[0] == own[0] else deltas[0].args[0]
            out.append((f"d{p.tensor}", code(index), code(summand / deltas[0])))
        else:
            raise NotImplementedError(f"the dot kernels scatter a parameter gradient Σ δ(t, index) value; "
                                      f"d{p.tensor} = {summand} has another form")
    return out
