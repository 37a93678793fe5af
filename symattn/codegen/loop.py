"""Loop and tile kernels (any sequence length), rendered from the indexed derivation through Jinja2 templates.

The templates (codegen/jinja/*.py.j2) own the loop and tile structure; the per-element formulas (the score, dS,
the summands of O, D, dQ, dK, dV and the coefficients that multiply the rows BLAS or a loop reads) are the
derivation's indexed right-hand sides printed with Indexed -> local or array reads. One source serves float32 and
float64: Numba compiles each kernel per dtype and the helpers dispatch on the scalar type.
"""
from __future__ import annotations

import jinja2
import sympy

from ..filestamp import stamp
from ..symbolic.derive import Derivation, derive
from ..symbolic.score import scale_symbolic
from ..symbolic.spec import AttentionSpec
from ..symbolic.tensors import INDEX_OF_DIM, TENSORS
from .printer import NumbaPrinter
from .templates import HEADER, decorator

LOOP_MODULE = "attention_loops"
SCALE = sympy.Symbol("scale")
#: Indexed reads -> code: the template's locals and batch-offset array reads.
READS = {"St": "acc", "P": "p", "dP": "dp", "D": "D_i", "dS": "ds", "Q": "Q[qz, i, a]", "K": "K[kz, j, a]",
         "V": "V[vz, j, b]", "O": "O[z, i, b]", "dO": "dO[z, i, b]"}

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("symattn.codegen", "jinja"), undefined=jinja2.StrictUndefined,
                          autoescape=False, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)


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


def render() -> str:
    """The loop/tile-kernel module source (deterministic)."""
    d = derive(AttentionSpec(1, 1, 1), explicit=False)  # indexed forms hold at any size
    _check_tileable(d)
    header = HEADER.substitute(source="the indexed derivation of scaled dot-product attention",
                               command="symattn generate --all  (from a source checkout)")
    text = _ENV.get_template(f"{LOOP_MODULE}.py.j2").render(
        header=header, f=pieces(d), jit=decorator(), jit_parallel=decorator(parallel=True),
        jit_inline=decorator(inline=True), jit_exact=decorator(inline=True, exact=True))
    return stamp(text)
