"""Derive and prove timings and op counts for n = d in {2, 3, 4, 6, 8} (a benchmark, not a test).

    python benchmarks/bench_derive.py [--sizes 2 3 4 6 8]

Targets on 2 cores: derive (closed forms) at n = d = 8 in <= 2 s; full proof at n = d = 6 in <= 10 s and at
n = d = 8 in <= 30 s.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import sympy

import symattn
from symattn.symbolic.tensors import flat

TARGETS = {8: (2.0, 30.0), 6: (None, 10.0)}


def op_count(d: symattn.Derivation, phase: str) -> int:
    """SymPy count_ops over the explicit entries of one phase's derived steps."""
    return sum(sympy.count_ops(x) for s in d.steps if s.phase == phase and not s.is_input for x in flat(s.explicit))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    args = parser.parse_args()
    print(f"symattn {symattn.__version__}, sympy {sympy.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} cpus")
    print(f"{'n=d':>4} {'derive s':>9} {'prove s':>8} {'method':>24} {'fwd ops':>8} {'bwd ops':>8}  targets")
    for n in args.sizes:
        spec = symattn.AttentionSpec(n, n, n)
        start = time.perf_counter()
        d = symattn.derive(spec, prove=False)
        t_derive = time.perf_counter() - start
        start = time.perf_counter()
        d = symattn.prove(d)
        t_prove = time.perf_counter() - start
        assert d.proved, [p for p in d.proofs if not p.passed]
        method = sorted({p.method for p in d.proofs if p.kind == "gradient"})[0]
        target = TARGETS.get(n)
        note = ""
        if target:
            derive_ok = target[0] is None or t_derive <= target[0]
            note = f"derive {'ok' if derive_ok else 'MISSED'}, prove {'ok' if t_prove <= target[1] else 'MISSED'}"
        print(f"{n:>4} {t_derive:>9.2f} {t_prove:>8.2f} {method:>24} {op_count(d, 'forward'):>8} "
              f"{op_count(d, 'backward'):>8}  {note}")


if __name__ == "__main__":
    main()
