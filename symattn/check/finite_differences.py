"""Central finite differences against analytic gradients, for any function of arrays.

    report = symattn.gradcheck(f, {"q": q, "k": k}, grads)   # f(q, k) -> array; grads(q, k, dO) -> (dq, dk)
    assert report.passed, report

L = Σ dO∘f(inputs) with a fixed random dO; every input element is perturbed by ±h (central difference).
Step and tolerances follow the dtype: h = eps^(1/3)·max(1, |x|), so float64 checks are tight and float32 loose.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import InputError

#: dtype -> (relative step, rtol, atol)
POLICY = {np.dtype(np.float64): (6e-6, 1e-5, 1e-7), np.dtype(np.float32): (5e-3, 5e-2, 5e-3)}


@dataclass(frozen=True)
class Comparison:
    """One tensor compared against a reference: errors, tolerance and the worst index."""

    tensor: str
    path: str
    max_abs: float
    max_rel: float
    rtol: float
    atol: float
    index: tuple[int, ...]
    value: float
    expected: float
    ratio: float  # worst err / (atol + rtol·|expected|): passes at <= 1

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0

    def row(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return (f"  {self.tensor:<4} {self.path:<22} {self.max_abs:10.2e} {self.max_rel:10.2e} "
                f"{self.rtol:8.0e} {self.atol:8.0e}  {verdict}")

    def failure(self) -> str:
        return (f"{self.tensor} ({self.path}): worst at index {self.index}: got {self.value!r}, expected "
                f"{self.expected!r}, abs error {self.max_abs:.3e}, rel error {self.max_rel:.3e}")


def compare(tensor: str, path: str, value, expected, rtol: float, atol: float) -> Comparison:
    """Element-wise |value - expected| <= atol + rtol·|expected|; reports the worst element."""
    value, expected = np.asarray(value, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if value.shape != expected.shape:
        raise InputError(f"{tensor} ({path}): shape {value.shape} != expected {expected.shape}")
    if value.size == 0:
        return Comparison(tensor, path, 0.0, 0.0, rtol, atol, (), 0.0, 0.0, 0.0)
    with np.errstate(invalid="ignore"):
        err = np.abs(value - expected)
        err = np.where(np.isnan(value) & np.isnan(expected), 0.0, err)  # NaN where NaN is expected agrees
        err = np.where(value == expected, 0.0, err)  # equal infinities agree
        ratio = np.where(np.isnan(err), np.inf, err / (atol + rtol * np.abs(np.nan_to_num(expected))))
    worst = np.unravel_index(int(np.argmax(ratio)), err.shape)
    rel = err / np.maximum(np.abs(expected), atol)  # relative to |expected|, floored at atol (true zeros)
    return Comparison(tensor, path, float(err[worst]), float(rel[worst]), rtol, atol, tuple(map(int, worst)),
                      float(value[worst]), float(expected[worst]), float(ratio[worst]))


@dataclass(frozen=True)
class GradcheckReport:
    comparisons: tuple[Comparison, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def __str__(self) -> str:
        lines = [f"  {'':<4} {'path':<22} {'max abs':>10} {'max rel':>10} {'rtol':>8} {'atol':>8}"]
        lines += [c.row() for c in self.comparisons]
        lines += [c.failure() for c in self.comparisons if not c.passed]
        return "\n".join(lines)


def gradcheck(f: Callable, inputs: dict[str, np.ndarray], grads: Callable, *, dO: np.ndarray | None = None,
              seed: int = 0, rtol: float | None = None, atol: float | None = None) -> GradcheckReport:
    """Compare grads(*inputs, dO) with central differences of L = Σ dO∘f(*inputs), input by input."""
    arrays = {name: np.array(x, copy=True) for name, x in inputs.items()}
    dtypes = {x.dtype for x in arrays.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in POLICY:
        raise InputError(f"gradcheck inputs must share one float32 or float64 dtype, got {sorted(map(str, dtypes))}")
    dtype = next(iter(dtypes))
    step, default_rtol, default_atol = POLICY[dtype]
    rtol, atol = default_rtol if rtol is None else rtol, default_atol if atol is None else atol
    out = np.asarray(f(*arrays.values()))
    dO = np.random.default_rng(seed).normal(size=out.shape).astype(dtype) if dO is None else np.asarray(dO, dtype)
    analytic = grads(*arrays.values(), dO)
    if len(analytic) != len(arrays):
        raise InputError(f"grads returned {len(analytic)} gradients for {len(arrays)} inputs")

    def loss() -> float:
        return float(np.sum(dO.astype(np.float64) * np.asarray(f(*arrays.values()), dtype=np.float64)))

    comparisons = []
    for (name, x), g in zip(arrays.items(), analytic):
        numeric = np.empty(x.shape)
        for index in np.ndindex(x.shape):
            original = x[index]
            h = step * max(1.0, abs(float(original)))
            x[index] = original + h
            up = loss()
            x[index] = original - h
            down = loss()
            x[index] = original
            numeric[index] = (up - down) / (float(original + h) - float(original - h))
        comparisons.append(compare(f"d{name}", "finite differences", g, numeric, rtol, atol))
    return GradcheckReport(tuple(comparisons))
