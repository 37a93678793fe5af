"""Unrolled (straight-line) kernels at exactly the spec's sizes, printed from the explicit derivation.

The softmax step is rewritten stably (exact identity): with m_i = max_l s_il over visible keys,
p_ij = exp(s_ij - m_i) / Σ_l exp(s_il - m_i). Entries that are constants (masked zeros) are folded forward.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy

from ..symbolic.tensors import TENSORS, flat, shape_of
from ..symbolic.derive import Derivation
from ..symbolic.spec import EXPLICIT_LIMIT, MultiHeadSpec
from .printer import Block, NumbaPrinter, check_identifier, cse_block


#: Unrolled kernels are generated only where they pay: max(n_q, n_k) * max(d_k, d_v) <= this.
UNROLL_LIMIT = 64


def pays_for(spec) -> bool:
    """Unrolled kernels pay (and stay compilable) only at small sizes; a layer's only where it can be derived."""
    if isinstance(spec, MultiHeadSpec):
        return spec.explicit_cost <= 4 * EXPLICIT_LIMIT
    return max(spec.n_q, spec.n_k) * max(spec.d_k, spec.d_v) <= UNROLL_LIMIT and spec.explicit_cost <= EXPLICIT_LIMIT


def local_name(symbol: sympy.Symbol, table) -> str:
    """Code name of an element symbol: st_{0,1} -> st_0_1."""
    tensor, index, tag = table.where(symbol)
    return check_identifier("_".join([TENSORS[tensor].elem, *([f"h{tag}"] if tag else []), *map(str, index)]))


def _stable_softmax(d: Derivation, key: str) -> list[tuple[sympy.Symbol, sympy.Expr]]:
    """Row maxima m_i and the max-subtracted softmax entries of softmax step `key`."""
    step = d.step(key)
    spec, s = d.spec, d.table_for(step)["S"]
    P, symbols = step.explicit, step.symbols
    tag = f"h{step.tag}_" if step.tag else ""
    out = []
    for i in range(spec.n_q):
        visible = [s[i, j] for j in range(spec.n_k) if spec.visible(i, j)]
        m = sympy.Symbol(f"m_{tag}{i}")
        if len(visible) > 1:
            out.append((m, sympy.Max(*visible)))
            shift = {sympy.exp(x): sympy.exp(x - m) for x in visible}
        else:
            shift = {}
        out.extend((symbols[i, j], P[i, j].xreplace(shift)) for j in range(spec.n_k))
    return out


@dataclass(frozen=True)
class Plan:
    """What one kernel reads, writes and computes. Batched tensors carry a leading batch index z; outputs that
    are not batched (weight gradients) accumulate over the batch."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    keys: tuple[str, ...]
    batched: frozenset = frozenset()


def plan(d: Derivation, kind: str) -> Plan:
    if not d.table.children:  # one attention head: Q, K, V, the parameters θ (, dO)
        params = tuple(s.tensor for s in d.steps if s.is_input and s.phase == "forward" and s.tensor not in ("Q", "K"))
        forward = tuple(s.key for s in d.forward() if not s.is_input and s.key not in ("weighted_values", "sum"))
        if kind == "forward":
            return Plan(("Q", "K", "V", *params), ("O",), forward)
        backward = tuple(s.key for s in d.backward() if not s.is_input and s.key != "jacobian")  # dV ... dθ
        return Plan(("Q", "K", "V", *params, "dO"), ("dQ", "dK", "dV", *("d" + p for p in params)), forward + backward)
    inputs = tuple(s.tensor for s in d.steps if s.is_input and s.phase == "forward")
    forward = tuple(s.key for s in d.steps if s.phase == "forward" and not s.is_input)
    batched = frozenset({"X", "Yin", "Out", "dOut", "dX", "dYin"})
    if kind == "forward":
        return Plan(inputs, ("Out",), forward, batched)
    backward = tuple(s.key for s in d.steps if s.phase == "backward" and not s.is_input)
    grads = tuple("d" + name for name in inputs)  # one gradient per input, in the inputs' order
    return Plan(inputs + ("dOut",), grads, forward + backward, batched)


def assignments(d: Derivation, p: Plan) -> list[tuple[sympy.Symbol, sympy.Expr]]:
    """(symbol, expression) for every entry of the kernel's steps, constants folded forward."""
    out, constants = [], {}
    for key in p.keys:
        step = d.step(key)
        pairs = _stable_softmax(d, key) if step.tensor == "P" else [
            (step.symbols[ix], step.explicit[ix]) for ix in itertools.product(*map(range, shape_of(step.explicit)))]
        for symbol, expr in pairs:
            expr = expr.xreplace(constants)
            if expr.is_number:
                constants[symbol] = expr
            else:
                out.append((symbol, expr))
    needed = {x for name in p.outputs for x in flat(d.table[name])}
    return out + [(x, constants[x]) for x in sorted(needed & set(constants), key=str)]


@dataclass(frozen=True)
class KernelCode:
    """One unrolled kernel as data: name, argument names, input reads, body block, output writes."""

    name: str
    arguments: tuple[str, ...]
    inputs: tuple[tuple[str, str], ...]  # (local, array read)
    block: Block
    outputs: tuple[tuple[str, str, str], ...]  # (array write, "=" or "+=", local)
    written: tuple[str, ...]  # the output arrays: the last arguments
    accumulated: tuple[str, ...] = ()  # outputs summed over the batch: zeroed before the batch loop

    @property
    def read(self) -> tuple[str, ...]:
        """The input arrays: the arguments before the outputs."""
        return self.arguments[:len(self.arguments) - len(self.written)]


def kernel_code(d: Derivation, kind: str) -> KernelCode:
    t, p = d.table, plan(d, kind)
    steps = [d.step(key) for key in p.keys]
    names = {x: local_name(x, t) for name in p.inputs for x in flat(t[name])}
    names.update({x: local_name(x, t) for step in steps for x in flat(step.symbols)})
    printer = NumbaPrinter({"symbol_map": names})

    def array(n: str, index) -> str:
        return _read(n, (("z",) if n in p.batched else ()) + tuple(index))
    accumulated = tuple(n for n in p.outputs if p.batched and n not in p.batched)
    inputs = tuple((names[x], array(n, t.where(x)[1])) for n in p.inputs for x in flat(t[n]))
    outputs = tuple((array(n, t.where(x)[1]), "+=" if n in accumulated else "=", names[x])
                    for n in p.outputs for x in flat(t[n]))
    keep = {x for n in p.outputs for x in flat(t[n])}
    return KernelCode(check_identifier(f"{d.spec.name}_{kind}"), p.inputs + p.outputs, inputs,
                      cse_block(assignments(d, p), printer, keep), outputs, p.outputs, accumulated)


def _read(array: str, index: tuple) -> str:
    return f"{array}[{', '.join(map(str, index))}]"
