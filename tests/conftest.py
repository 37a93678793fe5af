"""Shared helpers: evaluate a derivation's explicit steps numerically (floats) for comparison with NumPy."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import sympy

from symattn.symbolic.tensors import shape_of


def evaluate_steps(d, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Value of every step's tensor, by substituting numbers into the explicit arrays in step order."""
    values = {}
    for name, array in inputs.items():
        values.update({d.table[name][ix]: sympy.Float(array[ix], 30) for ix in np.ndindex(array.shape)})
    out = dict(inputs)
    for step in d.steps:
        if step.is_input:
            continue
        shape = shape_of(step.explicit)
        result = np.empty(shape)
        for ix in np.ndindex(shape):
            value = step.explicit[ix].xreplace(values)
            values[step.symbols[ix]] = value
            result[ix] = float(value)
        out[step.key] = result
    return out


@pytest.fixture(scope="session", autouse=True)
def shared_kernel_cache(request, tmp_path_factory):
    """One kernel cache for the whole run, never ~/.cache: a variant compiled by one test is reused by the next.
    It lives in pytest's cache folder (kept between local runs; folders are per generator fingerprint, so a changed
    generator renders afresh), or in a fresh folder under -p no:cacheprovider. Tests of the cache set their own."""
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("symattn-kernels") if cache is not None else tmp_path_factory.mktemp("symattn-kernels")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SYMATTN_CACHE", str(folder))
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def reference_gradcheck(arrays: dict, params: dict, **options):
    """Finite differences of the NumPy reference for q, k, v (first in `arrays`) and every parameter in `params`
    (their values also in `arrays`), with the reference's own gradients as the analytic side."""
    from symattn import reference
    from symattn.check.finite_differences import gradcheck

    def f(q, k, v, *theta):
        return reference.attention(q, k, v, params=dict(zip(params, theta)), **options)

    def g(q, k, v, *rest):
        *theta, dO = rest
        grads = reference.gradients(q, k, v, dO, params=dict(zip(params, theta)), **options)
        return [grads[n] for n in ("q", "k", "v", *params)]
    return gradcheck(f, arrays, g)


def tampered(d, key: str, **changes):
    """The derivation with step `key` changed (e.g. explicit=wrong values): for tests that a proof catches it."""
    return dataclasses.replace(d, steps=tuple(dataclasses.replace(s, **changes) if s.key == key else s
                                              for s in d.steps))
