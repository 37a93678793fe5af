"""The kernels' vectorisable exp and tanh (codegen/jinja/exp.py.j2) hold the accuracy their
docstrings promise, in the precision of their argument, compiled inside a loop as the kernels use them."""
import numba
import numpy as np
import pytest

from symattn.numeric import attention_loops as L


@numba.njit(fastmath={'nsz', 'arcp', 'contract', 'reassoc'})  # as in the kernels: _exp is inlined into them
def _exp_loop(x, out):
    for c in range(x.size):
        out[c] = L._exp(x[c])


@numba.njit(fastmath={'nsz', 'arcp', 'contract', 'reassoc'})
def _tanh_loop(x, out):
    for c in range(x.size):
        out[c] = L._tanh(x[c])


@numba.njit
def _exp_scalar_type(x):
    return L._exp(x)


CASES = [(np.float32, -30.0, 88.0, 3e-7), (np.float64, -40.0, 0.0, 2e-15), (np.float64, 0.0, 709.0, 3e-14)]


@pytest.mark.parametrize("dtype, lo, hi, bound", CASES)
def test_exp_relative_error_within_its_documented_bound(dtype, lo, hi, bound):
    x = np.concatenate([np.linspace(lo, hi, 200_001), np.random.default_rng(0).uniform(-1, 1, 10_000)])
    x = x.astype(dtype)
    out = np.empty_like(x)
    _exp_loop(x, out)
    exact = np.exp(x.astype(np.longdouble))
    finite = exact < np.finfo(dtype).max
    rel = np.abs(out[finite].astype(np.longdouble) - exact[finite]) / exact[finite]
    assert rel.max() <= bound, (x[finite][rel.argmax()], rel.max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_edges_and_type(dtype):
    x = np.array([np.nan, -np.inf, -1000.0, 0.0, -0.0], dtype=dtype)
    out = np.empty_like(x)
    _exp_loop(x, out)
    assert np.isnan(out[0]) and out[1] == 0 and out[2] == 0 and out[3] == 1 and out[4] == 1
    # float32 stays float32 all the way (an int64 from math.floor once made the reduction float64: half speed)
    _exp_scalar_type(dtype(0.5))
    kind = numba.from_dtype(dtype)
    (signature,) = [sig for sig in _exp_scalar_type.nopython_signatures if sig.args[0] == kind]
    assert signature.return_type == kind


def _tanh_points(dtype):
    tiny = np.geomspace(1e-44 if dtype == np.float32 else 1e-300, 12, 100_000)  # float32 subnormals included
    return np.concatenate([np.linspace(-12, 12, 200_001), tiny, -tiny]).astype(dtype)


def test_tanh_float32_relative_error_within_its_documented_bound():
    x = _tanh_points(np.float32)
    x = x[x != 0]  # 0 itself: test_tanh_edges
    out = np.empty_like(x)
    _tanh_loop(x, out)
    exact = np.tanh(x.astype(np.longdouble))
    rel = np.abs(out - exact) / np.abs(exact)
    assert rel.max() <= 4e-7, (x[rel.argmax()], rel.max())  # relative: no cancellation near 0 (the exp form had)


def test_tanh_float64_absolute_error_within_its_documented_bound():
    x = _tanh_points(np.float64)
    out = np.empty_like(x)
    _tanh_loop(x, out)
    err = np.abs(out - np.tanh(x.astype(np.longdouble)))
    assert err.max() <= 3e-16, (x[err.argmax()], err.max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_edges(dtype):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30], dtype=dtype)
    out = np.empty_like(x)
    _tanh_loop(x, out)
    assert np.isnan(out[0]) and out[3] == 0 and out[4] == 0
    np.testing.assert_array_equal(out[1:], [1, -1, 0, 0, 1, -1])  # saturated exactly: 1 - tanh² = 0 there
    assert out.dtype == dtype
    saturated = np.array([8.0, 9.5, 20.0, -8.0, -50.0] if dtype == np.float32 else [20.0, 40.0, 700.0, -20.0, -800.0],
                         dtype=dtype)  # beyond the clamp (float32) or where e^-2|x| < eps/2 (float64)
    _tanh_loop(saturated, out[:5])
    np.testing.assert_array_equal(out[:5], np.sign(saturated))
