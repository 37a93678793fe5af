"""Unrolled (straight-line) kernels at exactly the spec's sizes, printed from the explicit derivation.

The softmax step is rewritten stably (exact identity): with m_i = max_l s_il over visible keys,
p_ij = exp(s_ij - m_i) / Σ_l exp(s_il - m_i). Entries that are constants (masked zeros) are folded forward.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy

from ..build import TENSORS, flat, shape_of
from ..derive import Derivation
from ..spec import EXPLICIT_LIMIT
from .printer import Block, NumbaPrinter, check_identifier, cse_block

FORWARD = ("similarity", "scaling", "softmax", "output")
BACKWARD = FORWARD + ("dV", "dP", "D", "dS", "dQ", "dK")
INPUTS = {"forward": ("Q", "K", "V"), "backward": ("Q", "K", "V", "dO")}
OUTPUTS = {"forward": ("O",), "backward": ("dQ", "dK", "dV")}
STEPS = {"forward": FORWARD, "backward": BACKWARD}

#: Unrolled kernels are generated only where they pay: max(n_q, n_k) * max(d_k, d_v) <= this.
UNROLL_LIMIT = 64


def pays_for(spec) -> bool:
    """Unrolled kernels pay (and stay compilable) only at small sizes."""
    return max(spec.n_q, spec.n_k) * max(spec.d_k, spec.d_v) <= UNROLL_LIMIT and spec.explicit_cost <= EXPLICIT_LIMIT


def local_name(symbol: sympy.Symbol, table) -> str:
    """Code name of an element symbol: st_{0,1} -> st_0_1."""
    tensor, index, tag = table.where(symbol)
    return check_identifier("_".join([TENSORS[tensor].elem, *([f"h{tag}"] if tag else []), *map(str, index)]))


def _stable_softmax(d: Derivation) -> list[tuple[sympy.Symbol, sympy.Expr]]:
    """Row maxima m_i and the max-subtracted softmax entries."""
    spec, s = d.spec, d.table["S"]
    P = d.step("softmax").explicit
    out = []
    for i in range(spec.n_q):
        visible = [s[i, j] for j in range(spec.n_k) if spec.visible(i, j)]
        m = sympy.Symbol(f"m_{i}")
        if len(visible) > 1:
            out.append((m, sympy.Max(*visible)))
            shift = {sympy.exp(x): sympy.exp(x - m) for x in visible}
        else:
            shift = {}
        out.extend((d.table["P"][i, j], P[i, j].xreplace(shift)) for j in range(spec.n_k))
    return out


def assignments(d: Derivation, kind: str) -> list[tuple[sympy.Symbol, sympy.Expr]]:
    """(symbol, expression) for every entry of the kernel's steps, constants folded forward."""
    out, constants = [], {}
    for key in STEPS[kind]:
        step = d.step(key)
        pairs = _stable_softmax(d) if key == "softmax" else [
            (d.table[step.tensor][ix], step.explicit[ix]) for ix in itertools.product(*map(range, shape_of(step.explicit)))]
        for symbol, expr in pairs:
            expr = expr.xreplace(constants)
            if expr.is_number:
                constants[symbol] = expr
            else:
                out.append((symbol, expr))
    needed = {x for name in OUTPUTS[kind] for x in flat(d.table[name])}
    return out + [(x, constants[x]) for x in sorted(needed & set(constants), key=str)]


@dataclass(frozen=True)
class KernelCode:
    """One unrolled kernel as data: name, argument names, input reads, body block, output writes."""

    name: str
    arguments: tuple[str, ...]
    inputs: tuple[tuple[str, str], ...]  # (local, array read)
    block: Block
    outputs: tuple[tuple[str, str], ...]  # (array write, local)


def kernel_code(d: Derivation, kind: str) -> KernelCode:
    t = d.table
    tensors = {*INPUTS[kind], *(d.step(key).tensor for key in STEPS[kind])}
    names = {x: local_name(x, t) for name in sorted(tensors) for x in flat(t[name])}
    printer = NumbaPrinter({"symbol_map": names})
    inputs = tuple((names[x], _read(n, t.where(x)[1])) for n in INPUTS[kind] for x in flat(t[n]))
    outputs = tuple((_read(n, t.where(x)[1]), names[x]) for n in OUTPUTS[kind] for x in flat(t[n]))
    name = check_identifier(f"{d.spec.name}_{kind}")
    return KernelCode(name, INPUTS[kind] + OUTPUTS[kind], inputs, cse_block(assignments(d, kind), printer,
                                                                            {x for n in OUTPUTS[kind] for x in flat(t[n])}), outputs)


def _read(array: str, index: tuple[int, ...]) -> str:
    return f"{array}[{', '.join(map(str, index))}]"
