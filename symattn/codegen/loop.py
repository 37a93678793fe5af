"""Loop kernels (any sequence length) rendered from the indexed derivation into LOOP_FILE.

The template owns the loops; the per-element formulas (score, dS, and the summands of O, D, dQ, dK, dV)
are the derivation's indexed right-hand sides printed with Indexed -> local or array reads.
"""
from __future__ import annotations

import sympy

from ..symbolic.tensors import INDEX_OF_DIM, TENSORS
from ..symbolic.derive import Derivation, derive
from ..filestamp import stamp
from ..symbolic.score import SCORE, scale_symbolic
from ..symbolic.spec import AttentionSpec
from .printer import NumbaPrinter
from .templates import HEADER, LOOP_FILE, LOOP_KERNELS, decorator

LOOP_MODULE = "attention_loops"
SCALE = sympy.Symbol("scale")
#: Indexed reads -> code: the template's locals and batch-offset array reads.
READS = {"St": "acc", "P": "p", "dP": "dp", "D": "D_i", "dS": "ds", "Q": "Q[qz, i, a]", "K": "K[kz, j, a]",
         "V": "V[vz, j, b]", "O": "O[z, i, b]", "dO": "dO[z, i, b]"}


def _code(expr: sympy.Expr, spec: AttentionSpec) -> str:
    """Print an indexed expression with its reads as the template's names and the scale as a runtime value."""
    printer = NumbaPrinter({"indexed_map": READS, "symbol_map": {SCALE: "scale"}})
    return printer.doprint(expr.xreplace({scale_symbolic(spec): SCALE}))


def _summand(expr: sympy.Expr) -> sympy.Expr:
    """tau * Sum(f, limits) -> tau * f: the template owns the loop."""
    return expr.replace(lambda x: isinstance(x, sympy.Sum), lambda x: x.function)


def _coefficient(summand: sympy.Expr, read: str) -> sympy.Expr:
    """The factor of a summand that multiplies the array read `read` (blocked loops read it themselves)."""
    factor = TENSORS[read].base[tuple(INDEX_OF_DIM[dim] for dim in TENSORS[read].dims)]
    coefficient = sympy.simplify(summand / factor)
    if coefficient.has(factor):
        raise ValueError(f"summand {summand} is not linear in {factor}")
    return coefficient


def pieces(d: Derivation) -> dict[str, str]:
    """The printed per-element formulas the loop template needs."""
    spec = d.spec
    return {
        "score": _code(SCORE.indexed_scaling(spec), spec),
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
    """The loop-kernel module source (deterministic)."""
    d = derive(AttentionSpec(1, 1, 1), explicit=False)  # indexed forms hold at any size
    code = pieces(d)
    docs = {f"{k}_doc": v for k, v in (("score", code["score"]), ("D", "sum_b " + code["D_term"]),
                                       ("dS", code["dS"]), ("dQ", code["dQ_term"]), ("dK", code["dK_term"]),
                                       ("dV", code["dV_term"]))}
    kernels = "".join(LOOP_KERNELS.substitute(code, dt=dt, dtype=dtype, decorator=decorator(),
                                              parallel_decorator=decorator(parallel=True))
                      for dt, dtype in (("f32", "float32"), ("f64", "float64")))
    header = HEADER.substitute(source="the indexed derivation of scaled dot-product attention",
                               command="symattn generate --all  (from a source checkout)")
    return stamp(LOOP_FILE.substitute(docs, header=header, kernels=kernels))
