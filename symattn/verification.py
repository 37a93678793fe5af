"""Four-way agreement at a spec's sizes: symbolic vs unrolled kernel vs loop kernels vs NumPy reference,
forward (O) and every gradient (dQ, dK, dV), plus central finite differences of the loop kernels (float64).

Inputs are dyadic rationals (k/8), exact in float64 and float32; the symbolic path substitutes them into the
explicit derivation and evaluates every step at 40 significant digits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import reference
from .api import attention, attention_backward
from .build import shape_of
from .derive import derive
from .finite_differences import Comparison, GradcheckReport, compare, gradcheck
from .kernels import load_unrolled
from .progress import Progress, silent
from .spec import AttentionSpec

TOLERANCE = {"float64": (1e-10, 1e-12), "float32": (2e-4, 2e-5)}  # (rtol, atol)
QUANTITIES = ("O", "dQ", "dK", "dV")


@dataclass(frozen=True)
class VerifyReport:
    spec: AttentionSpec
    comparisons: tuple[Comparison, ...]  # each path against the symbolic values
    gradcheck: GradcheckReport  # loop kernel gradients against finite differences

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons) and self.gradcheck.passed

    def failures(self) -> list[str]:
        return [c.failure() for c in (*self.comparisons, *self.gradcheck.comparisons) if not c.passed]

    def __str__(self) -> str:
        head = f"  {'':<4} {'path vs symbolic':<22} {'max abs':>10} {'max rel':>10} {'rtol':>8} {'atol':>8}"
        lines = [f"verify {self.spec.name}", head]
        for name in QUANTITIES:
            lines += [c.row() for c in self.comparisons if c.tensor == name]
        lines += [c.row() for c in self.gradcheck.comparisons]
        lines += ["FAILED: " + f for f in self.failures()]
        lines.append("all paths agree" if self.passed else "verification FAILED")
        return "\n".join(lines)


def _inputs(spec: AttentionSpec, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"Q": (spec.n_q, spec.d_k), "K": (spec.n_k, spec.d_k), "V": (spec.n_k, spec.d_v), "dO": (spec.n_q, spec.d_v)}
    return {name: rng.integers(-16, 17, size=shape) / 8.0 for name, shape in shapes.items()}


def symbolic_values(spec: AttentionSpec, inputs: dict[str, np.ndarray], digits: int = 40) -> dict[str, np.ndarray]:
    """O, dQ, dK, dV from the explicit derivation at exact rational inputs, evaluated to `digits` digits."""
    import sympy
    d = derive(spec, prove=False)
    values = {d.table[name][ix]: sympy.Rational(int(round(x[ix] * 8)), 8)
              for name, x in inputs.items() for ix in np.ndindex(x.shape)}
    out = {}
    for key in ("similarity", "scaling", "softmax", "output", "dV", "dP", "D", "dS", "dQ", "dK"):
        step = d.step(key)
        array = np.empty(shape_of(step.explicit))
        for ix in np.ndindex(array.shape):
            value = step.explicit[ix].xreplace(values).evalf(digits)
            values[d.table[step.tensor][ix]] = value
            array[ix] = float(value)
        out[step.tensor] = array
    return out


def _unrolled(spec, x, progress):
    module = load_unrolled(spec, progress=progress)
    if module is None:
        return None
    O = np.empty((spec.n_q, spec.d_v))
    getattr(module, f"{spec.name}_forward")(x["Q"], x["K"], x["V"], O)
    grads = [np.empty_like(x[name]) for name in ("Q", "K", "V")]
    getattr(module, f"{spec.name}_backward")(x["Q"], x["K"], x["V"], x["dO"], *grads)
    return dict(zip(QUANTITIES, (O, *grads)))


def _loop(spec, x, dtype):
    kw = dict(is_causal=spec.causal, scale=spec.scale_value)
    q, k, v, dO = (x[n].astype(dtype) for n in ("Q", "K", "V", "dO"))
    return dict(zip(QUANTITIES, (attention(q, k, v, **kw), *attention_backward(q, k, v, dO, **kw))))


def verify(spec: AttentionSpec, *, seed: int = 0, progress: Progress = silent) -> VerifyReport:
    """Compare every path at `spec`'s sizes; see VerifyReport.passed and str(report)."""
    x = _inputs(spec, seed)
    progress(f"verify: symbolic values of {spec.name}")
    exact = symbolic_values(spec, x)
    truth = {"O": exact["O"], "dQ": exact["dQ"], "dK": exact["dK"], "dV": exact["dV"]}
    kw = dict(is_causal=spec.causal, scale=spec.scale_value)
    paths = {}
    progress("verify: unrolled kernels (generate and compile)")
    unrolled = _unrolled(spec, x, progress)
    if unrolled is not None:
        paths["unrolled kernel f64"] = (unrolled, "float64")
    progress("verify: loop kernels")
    paths["loop kernel f64"] = (_loop(spec, x, np.float64), "float64")
    paths["loop kernel f32"] = (_loop(spec, x, np.float32), "float32")
    ref_grads = reference.attention_backward(x["Q"], x["K"], x["V"], x["dO"], **kw)
    paths["NumPy reference f64"] = (dict(zip(QUANTITIES, (reference.attention(x["Q"], x["K"], x["V"], **kw),
                                                          *ref_grads))), "float64")
    comparisons = tuple(compare(name, path, values[name], truth[name], *TOLERANCE[dtype])
                        for path, (values, dtype) in paths.items() for name in QUANTITIES)
    progress("verify: finite differences")
    fd = gradcheck(lambda q, k, v: attention(q, k, v, **kw), {"Q": x["Q"], "K": x["K"], "V": x["V"]},
                   lambda q, k, v, dO: attention_backward(q, k, v, dO, **kw), dO=x["dO"])
    return VerifyReport(spec, comparisons, fd)
