"""Four-way agreement at a spec's sizes: symbolic vs unrolled kernel vs loop kernels vs NumPy reference,
forward (O) and every gradient (dQ, dK, dV), plus central finite differences of the loop kernels (float64).

Inputs are dyadic rationals (k/8), exact in float64 and float32; the symbolic path substitutes them into the
explicit derivation and evaluates every step at 40 significant digits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy

from .. import limits
from ..numeric import reference
from ..numeric.api import attention, attention_vjp
from ..symbolic.tensors import shape_of
from ..symbolic.derive import derive, parameters
from .finite_differences import Comparison, GradcheckReport, compare, gradcheck
from ..numeric.kernels import load_unrolled
from ..symbolic.layer import derive_multihead
from ..numeric.layer import multihead_attention, multihead_attention_backward
from ..progress import Progress, silent
from ..symbolic.spec import UNSCALED, AttentionSpec
from ..symbolic.tensors import TENSORS

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
        for name in dict.fromkeys(c.tensor for c in self.comparisons):
            lines += [c.row() for c in self.comparisons if c.tensor == name]
        lines += [c.row() for c in self.gradcheck.comparisons]
        lines += ["FAILED: " + f for f in self.failures()]
        lines.append("all paths agree" if self.passed else "verification FAILED")
        return "\n".join(lines)


def _inputs(spec: AttentionSpec, seed: int) -> dict[str, np.ndarray]:
    """Dyadic inputs (k/8) keyed by tensor name: Q, K, V, the score's parameters θ, dO."""
    rng = np.random.default_rng(seed)
    shapes = {"Q": (spec.n_q, spec.d_k), "K": (spec.n_k, spec.d_k), "V": (spec.n_k, spec.d_v)}
    shapes.update({p.tensor: TENSORS[p.tensor].shape(spec) for p in parameters(spec)})
    shapes["dO"] = (spec.n_q, spec.d_v)
    x = {name: rng.integers(-16, 17, size=shape) / 8.0 for name, shape in shapes.items()}
    if spec.score == "cosine":  # a zero row is the norm's kink: finite differences across it mean nothing
        for name in ("Q", "K"):
            x[name][np.all(x[name] == 0, axis=-1), 0] = 1 / 8
    return x


def evaluate(d, inputs: dict[str, np.ndarray], keys, digits: int = 40) -> dict[str, np.ndarray]:
    """Values of the steps `keys` of derivation `d` at dyadic inputs (k/8, exact), to `digits` digits.
    Returns arrays keyed by tensor name (a layer's own tensors; a head's are keyed 'name^h')."""
    values = {d.table[name][ix]: sympy.Rational(int(round(x[ix] * 8)), 8)
              for name, x in inputs.items() for ix in np.ndindex(x.shape)}
    out = {}
    for key in keys:
        step = d.step(key)
        array = np.empty(shape_of(step.explicit))
        for ix in np.ndindex(array.shape):
            value = step.explicit[ix].xreplace(values).evalf(digits)
            values[step.symbols[ix]] = value
            array[ix] = float(value)
        out[step.tensor + (f"^{step.tag}" if step.tag else "")] = array
    return out


def _gradient_keys(d) -> list[str]:
    """The backward steps verify compares: dV, dP, D, dS, dQ, dK and every dθ."""
    return [s.key for s in d.backward() if not s.is_input and s.key != "jacobian"]


def symbolic_values(spec: AttentionSpec, inputs: dict[str, np.ndarray], digits: int = 40) -> dict[str, np.ndarray]:
    """O and every gradient from the explicit derivation at exact rational inputs, evaluated to `digits` digits."""
    d = derive(spec, prove=False)
    keys = [s.key for s in d.forward() if not s.is_input and s.key not in ("weighted_values", "sum")]
    return evaluate(d, inputs, keys + _gradient_keys(d), digits)


def _quantities(spec) -> tuple[str, ...]:
    """O and the gradient of every input: dQ, dK, dV, dθ (tensor names)."""
    return ("O", "dQ", "dK", "dV", *("d" + p.tensor for p in parameters(spec)))


def _unrolled_call(spec, module):
    """The unrolled kernels as functions of arrays: forward(Q, K, V, *θ) -> O, backward(..., dO) -> grads."""
    forward, backward = (getattr(module, f"{spec.name}_{kind}") for kind in ("forward", "backward"))

    def f(*arrays):
        O = np.empty((spec.n_q, spec.d_v))
        forward(*arrays, O)
        return O

    def g(*arrays):
        grads = [np.empty_like(x) for x in arrays[:-1]]  # one per input, in order: dQ, dK, dV, dθ...
        backward(*arrays, *grads)
        return grads
    return f, g


def _unrolled(spec, x, module):
    f, g = _unrolled_call(spec, module)
    arrays = [x[n] for n in x if n != "dO"]
    return dict(zip(_quantities(spec), (f(*arrays), *g(*arrays, x["dO"]))))


def _options(spec) -> dict:
    """The spec as options of the numeric API: score, score mod, mask (is_causal for the causal mask, else the
    Mask itself as mask_mod), scale (for scaled scores)."""
    options = dict(scale=None if spec.score in UNSCALED else spec.scale_value, masked_rows=spec.masked_rows)
    if spec.causal:
        options["is_causal"] = True
    elif spec.mask_object is not None:
        options["mask_mod"] = spec.mask_object
    if spec.score != "dot":
        options["score"] = spec.score
    if spec.mod_object is not None:
        options["score_mod"] = spec.mod_object
    return options


def _numeric(spec):
    """f(q, k, v, *θ) and grads(q, k, v, *θ, dO) of the numeric API (the loop/tile or element kernels). A per-head
    mod (alibi:heads=H) reads h, so the numeric API wants (B, H, n, d): the spec's head, head h = 0 as in its
    derivation, goes in as head 0 of (1, H, n, d), its dO alone nonzero, and comes out as head 0."""
    names, options = [p.name for p in parameters(spec)], _options(spec)
    heads = getattr(spec.mod_object, "heads", 0) or 0

    def lift(a, fill=None):  # (n, d) -> (1, H, n, d): a copy per head, or `fill` beyond head 0
        if not heads:
            return a
        out = np.repeat(a[None, None], heads, axis=1) if fill is None else np.full((1, heads) + a.shape, fill, a.dtype)
        out[0, 0] = a
        return out

    def head0(a):
        return a[0, 0] if heads else a

    def f(q, k, v, *theta):
        return head0(attention(lift(q), lift(k), lift(v), params=dict(zip(names, theta)) or None, **options))

    def grads(q, k, v, *rest):
        O, pullback = attention_vjp(lift(q), lift(k), lift(v), params=dict(zip(names, rest[:-1])) or None, **options)
        g = pullback(lift(rest[-1], 0))
        return (head0(g["q"]), head0(g["k"]), head0(g["v"]), *(g[n] for n in names))
    return f, grads


def _loop(spec, x, dtype):
    f, grads = _numeric(spec)
    arrays = [x[n].astype(dtype) for n in ("Q", "K", "V", *(p.tensor for p in parameters(spec)))]
    return dict(zip(_quantities(spec), (f(*arrays), *grads(*arrays, x["dO"].astype(dtype)))))


def _reference(spec, x) -> dict[str, np.ndarray]:
    """The NumPy reference; a mask other than causal goes in as the mask_mod it is (evaluated over index grids)."""
    params = {p.name: x[p.tensor] for p in parameters(spec)}
    masking = dict(is_causal=True) if spec.causal else dict(mask_mod=spec.mask_object)
    kw = dict(**masking, scale=None if spec.score in UNSCALED else spec.scale_value, masked_rows=spec.masked_rows,
              score=spec.score, params=params, score_mod=spec.mod_object)
    grads = reference.gradients(x["Q"], x["K"], x["V"], x["dO"], **kw)
    values = [reference.attention(x["Q"], x["K"], x["V"], **kw), grads["q"], grads["k"], grads["v"],
              *(grads[p.name] for p in parameters(spec))]
    return dict(zip(_quantities(spec), values))


def verify(spec: AttentionSpec, *, seed: int = 0, progress: Progress = silent) -> VerifyReport:
    """Compare every path at `spec`'s sizes; see VerifyReport.passed and str(report): the exact symbolic values,
    the unrolled kernels, the numeric API's kernels (loop/tile or element kernels, float64 and float32) and the
    NumPy reference, and the numeric API's gradients (inputs and every parameter) against finite differences."""
    spec.check_explicit()  # the symbolic path expands every scalar: refuse before allocating anything
    x = _inputs(spec, limits.seed(seed))
    progress(f"verify: symbolic values of {spec.name}")
    exact = symbolic_values(spec, x)
    truth = {name: exact[name] for name in _quantities(spec)}
    paths = {}
    progress("verify: unrolled kernels (generate and compile)")
    module = load_unrolled(spec, progress=progress)
    if module is not None:
        paths["unrolled kernel f64"] = (_unrolled(spec, x, module), "float64")
    progress("verify: loop kernels (the numeric API)")
    paths["loop kernel f64"] = (_loop(spec, x, np.float64), "float64")
    paths["loop kernel f32"] = (_loop(spec, x, np.float32), "float32")
    paths["NumPy reference f64"] = (_reference(spec, x), "float64")
    comparisons = tuple(compare(name, path, values[name], truth[name], *TOLERANCE[dtype])
                        for path, (values, dtype) in paths.items() for name in truth)
    progress("verify: finite differences")
    inputs = {n: x[n] for n in ("Q", "K", "V", *(p.tensor for p in parameters(spec)))}
    f, grads = _numeric(spec)
    fd = gradcheck(f, inputs, grads, dO=x["dO"])
    return VerifyReport(spec, comparisons, fd)


# -- the multi-head layer ----------------------------------------------------------------------------------------

LAYER_ARGS = {"X": "x", "Yin": "y", "Wq": "w_q", "Wk": "w_k", "Wv": "w_v", "Wo": "w_o", "bq": "b_q", "bk": "b_k",
              "bv": "b_v", "bo": "b_o"}


def _layer_names(spec) -> dict[str, str]:
    """Tensor name -> argument name of the layer's inputs, in the derivation's order: x (, y), the weights (, the
    biases), then the shared parameters θ of the score and the score mod by parameter name."""
    used = ["X"] + ["Yin"] * spec.cross + ["Wq", "Wk", "Wv", "Wo"] + ["bq", "bk", "bv", "bo"] * spec.bias
    return {n: LAYER_ARGS[n] for n in used} | {p.tensor: p.name for p in parameters(spec)}


def _layer_inputs(spec, seed: int) -> dict[str, np.ndarray]:
    """Dyadic inputs (k/8 in [-1, 1]) keyed by tensor name: the layer's arguments, θ and dOut."""
    rng = np.random.default_rng(seed)
    return {name: rng.integers(-8, 9, size=TENSORS[name].shape(spec)) / 8.0
            for name in [*_layer_names(spec), "dOut"]}


def layer_options(spec) -> dict:
    """The spec as options of the layer (numeric and reference): heads, and the head's variant options."""
    return dict(heads=spec.heads, kv_heads=spec.kv_heads, **_options(spec))


def _call(fn, named: dict, names: dict, *extra, **options):
    """fn(x, w_q, w_k, w_v, w_o, *extra, y=..., b_*=..., params=θ, **options) from arrays keyed by tensor name."""
    args = {names[n]: v for n, v in named.items()}
    theta = {k: args.pop(k) for k in list(args) if k not in LAYER_ARGS.values()}
    return fn(*[args.pop(k) for k in ("x", "w_q", "w_k", "w_v", "w_o")], *extra, **args,
              **({"params": theta} if theta else {}), **options)


def _layer_values(forward, backward, x: dict, dtype, names: dict, options: dict) -> dict:
    """Out and every gradient (keyed dX, dWq, ..., dθ) of one implementation of the layer."""
    named = {n: v.astype(dtype) for n, v in x.items() if n != "dOut"}
    grads = _call(backward, named, names, x["dOut"].astype(dtype), **options)
    return {"Out": _call(forward, named, names, **options), **{"d" + n: grads[a] for n, a in names.items()}}


def _unrolled_layer(spec, x: dict, module) -> dict:
    """Out and every gradient from the unrolled layer kernels (inputs with a batch of one)."""
    inputs = [x[n][None] if n in ("X", "Yin") else x[n] for n in x if n != "dOut"]
    out = np.empty((1, spec.n_q, spec.d_model))
    getattr(module, f"{spec.name}_forward")(*inputs, out)
    gs = [np.empty_like(a) for a in inputs]
    getattr(module, f"{spec.name}_backward")(*inputs, x["dOut"][None], *gs)
    grads = ["d" + n for n in x if n != "dOut"]
    return {"Out": out[0], **{g: v[0] if g in ("dX", "dYin") else v for g, v in zip(grads, gs)}}


def verify_multihead(spec, *, seed: int = 0, progress: Progress = silent) -> VerifyReport:
    """The layer four ways (symbolic, unrolled layer kernel, numeric API f64/f32, NumPy reference) and finite
    differences of the numeric API for every input, weight, bias and shared parameter θ of the variant."""
    spec.check_explicit()  # the symbolic path expands the whole layer: refuse before allocating anything
    names, options = _layer_names(spec), layer_options(spec)
    x = _layer_inputs(spec, limits.seed(seed))
    progress(f"verify: symbolic values of {spec.name}")
    d = derive_multihead(spec, prove=False)
    exact = evaluate(d, x, [s.key for s in d.steps if not s.is_input])
    truth = {name: exact[name] for name in ["Out", *("d" + n for n in names)]}
    paths = {}
    progress("verify: unrolled layer kernels (generate and compile)")
    module = load_unrolled(spec, progress=progress)
    if module is not None:
        paths["unrolled kernel f64"] = (_unrolled_layer(spec, x, module), "float64")
    progress("verify: numeric layer (loop kernels)")
    for dtype in (np.float64, np.float32):
        paths[f"loop kernel {np.dtype(dtype).name.replace('float', 'f')}"] = (
            _layer_values(multihead_attention, multihead_attention_backward, x, dtype, names, options),
            np.dtype(dtype).name)
    paths["NumPy reference f64"] = (_layer_values(reference.multihead_attention, reference.multihead_attention_backward,
                                                  x, np.float64, names, options), "float64")
    comparisons = tuple(compare(name, path, values[name], truth[name], *TOLERANCE[dtype])
                        for path, (values, dtype) in paths.items() for name in truth)
    progress("verify: finite differences")

    def f(*arrays):
        return _call(multihead_attention, dict(zip(names, arrays)), names, **options)

    def g(*arrays):
        *arrays, dO = arrays
        grads = _call(multihead_attention_backward, dict(zip(names, arrays)), names, dO, **options)
        return [grads[names[n]] for n in names]
    fd = gradcheck(f, {n: x[n] for n in names}, g, dO=x["dOut"])
    return VerifyReport(spec, comparisons, fd)
