"""NumbaPrinter: SymPy expressions -> Numba-compatible Python source, and one CSE pass over assignments.

Only the `_print_*` methods that differ from SymPy's PythonCodePrinter are overridden; nodes without a
printer fail loudly (strict mode). Names that reach code are validated identifiers.
"""
from __future__ import annotations

import keyword
from dataclasses import dataclass

import sympy
from sympy.printing.pycode import PythonCodePrinter


def check_identifier(name: str) -> str:
    """`name` if it is a safe Python identifier for generated code, else ValueError."""
    if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__"):
        raise ValueError(f"{name!r} is not a valid identifier for generated code")
    return name


class NumbaPrinter(PythonCodePrinter):
    """Prints scalar expressions for Numba: element symbols -> array reads, numbers -> float literals."""

    printmethod = "_numbacode"
    _default_settings = {**PythonCodePrinter._default_settings, "strict": True, "fully_qualified_modules": True,
                         "symbol_map": {}, "indexed_map": {}}

    def __init__(self, settings=None):
        super().__init__(settings)
        self.symbol_map: dict[sympy.Symbol, str] = dict(self._settings["symbol_map"])
        self.indexed_map: dict[str, str] = dict(self._settings["indexed_map"])

    def _print(self, expr, **kwargs):
        if isinstance(expr, sympy.Expr) and expr.is_number and not expr.is_Integer:
            value = complex(expr.evalf(20))
            if value.imag != 0:
                raise ValueError(f"complex constant {expr} cannot be printed for a real kernel")
            return repr(value.real)
        return super()._print(expr, **kwargs)

    def _print_Mul(self, expr):
        numbers = [a for a in expr.args if a.is_number]
        if len(numbers) > 1:  # fold sqrt(2)/2 into one literal
            rest = [a for a in expr.args if not a.is_number]
            return self._print(sympy.Mul(*numbers)) + "".join("*" + self.parenthesize(a, 50) for a in rest)
        return super()._print_Mul(expr)

    def _print_Symbol(self, expr):
        if expr in self.symbol_map:
            return self.symbol_map[expr]
        return check_identifier(expr.name)

    def _print_Indexed(self, expr):
        """A[i, j] -> the code given for base A in `indexed_map` (e.g. a local, or K[kz, j, a])."""
        name = expr.base.label.name
        if name not in self.indexed_map:
            raise ValueError(f"no code for indexed tensor {name} in this kernel")
        return self.indexed_map[name]

    def _print_Max(self, expr):
        args = [self._print(a) for a in expr.args]
        out = args[0]
        for arg in args[1:]:
            out = f"max({out}, {arg})"
        return out


@dataclass(frozen=True)
class Block:
    """Straight-line code as data: (name, expression) statements in order, the op count."""

    statements: tuple[tuple[str, str], ...]
    ops: int


def _toposort(statements: list[tuple[sympy.Symbol, sympy.Expr]]) -> list[tuple[sympy.Symbol, sympy.Expr]]:
    """Order statements so every symbol is assigned before use, keeping the given order where possible."""
    defined_by = {lhs: n for n, (lhs, _) in enumerate(statements)}
    done, out = set(), []

    def visit(n: int, stack: tuple = ()):
        if n in done:
            return
        if n in stack:
            raise ValueError("cyclic assignments in generated code")
        for symbol in sorted(statements[n][1].free_symbols, key=str):
            if symbol in defined_by:
                visit(defined_by[symbol], stack + (n,))
        done.add(n)
        out.append(statements[n])

    for n in range(len(statements)):
        visit(n)
    return out


def _live(statements: list[tuple[sympy.Symbol, sympy.Expr]], keep: set) -> list[tuple[sympy.Symbol, sympy.Expr]]:
    """Drop statements whose result no kept symbol needs (dead code)."""
    needed, out = set(keep), []
    for lhs, rhs in reversed(statements):
        if lhs in needed:
            needed |= rhs.free_symbols
            out.append((lhs, rhs))
    return out[::-1]


def cse_block(assignments: list[tuple[sympy.Symbol, sympy.Expr]], printer: NumbaPrinter, keep: set) -> Block:
    """One CSE pass over all right-hand sides, then the live statements (those `keep` needs) in order."""
    replacements, reduced = sympy.cse([rhs for _, rhs in assignments], symbols=sympy.numbered_symbols("t"))
    statements = _live(_toposort(list(replacements) + [(lhs, rhs) for (lhs, _), rhs in zip(assignments, reduced)]),
                       keep)
    ops = sum(sympy.count_ops(rhs) for _, rhs in statements)
    return Block(tuple((printer.doprint(lhs), printer.doprint(rhs)) for lhs, rhs in statements), int(ops))
