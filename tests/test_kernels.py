"""The generated loop and tile kernels against the NumPy reference: causal or not, n_q != n_k, d_k != d_v,
broadcasting, masks with fully masked rows under the three policies, large logits, float32/float64, empty
batches; tiles made small so that every problem here spans several query blocks and key tiles."""
import threading

import numpy as np
import pytest

import symattn
from symattn import reference
from symattn.numeric import kernels
from symattn.numeric.blas_hold import BlasHold

TOL = {np.float64: dict(rtol=1e-10, atol=1e-11), np.float32: dict(rtol=3e-4, atol=3e-5)}


@pytest.fixture(params=["tiles", "loops"])
def path(request, monkeypatch):
    """Force one kernel family: small tiles (several blocks per problem) or the serial loop kernels."""
    if request.param == "tiles":
        monkeypatch.setattr(kernels, "SMALL", 0)
        for name, size in (("BQ", 16), ("BK", 32), ("BQ_MASKED", 8), ("BK_MASKED", 16), ("BQ_BWD", 16),
                           ("BK_BWD", 16), ("BQ_BWD_MASKED", 8), ("BK_BWD_MASKED", 16), ("BQ_CAUSAL", 16),
                           ("BK_CAUSAL", 8), ("BD_CAUSAL", 3), ("BQ_BWD_CAUSAL", 8), ("BK_BWD_CAUSAL", 16),
                           ("BD_BWD_CAUSAL", 3)):  # causal: full tiles and diagonal strips of 3 rows
            monkeypatch.setattr(kernels, name, size)
    else:
        monkeypatch.setattr(kernels, "SMALL", 1 << 62)
    return request.param


def _close(got, want, dtype):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), **TOL[dtype])


def _check(q, k, v, dO, **kw):
    dtype = q.dtype.type
    _close(symattn.attention(q, k, v, **kw), reference.attention(q, k, v, **kw), dtype)
    for got, want, x in zip(symattn.attention_backward(q, k, v, dO, **kw), reference.attention_backward(q, k, v, dO, **kw),
                            (q, k, v)):
        assert got.shape == x.shape and got.dtype == x.dtype
        _close(got, want, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sizes", [(37, 53, 8, 5), (53, 37, 5, 8), (1, 70, 4, 4), (70, 1, 3, 2)],
                         ids=lambda s: "q%d_k%d_dk%d_dv%d" % s)
def test_plain_and_broadcast(rng, path, dtype, causal, sizes):
    n_q, n_k, d_k, d_v = sizes
    q = rng.standard_normal((2, 3, n_q, d_k)).astype(dtype)
    k = rng.standard_normal((3, n_k, d_k)).astype(dtype)  # broadcast over the first batch dim
    v = rng.standard_normal((1, 3, n_k, d_v)).astype(dtype)
    dO = rng.standard_normal((2, 3, n_q, d_v)).astype(dtype)
    _check(q, k, v, dO, is_causal=causal)
    _check(q[0], k, v[0], dO[0], is_causal=causal, scale=0.3)  # same batch: the fast path


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("policy", ["zero", "uniform", "nan"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_with_fully_masked_rows(rng, path, dtype, policy, causal, kind):
    n_q, n_k = 41, 35
    q, k, v = (rng.standard_normal((2, n, d)).astype(dtype) for n, d in ((n_q, 6), (n_k, 6), (n_k, 3)))
    dO = rng.standard_normal((2, n_q, 3)).astype(dtype)
    keep = rng.random((2, n_q, n_k)) < 0.6
    keep[:, ::5] = False  # fully masked rows
    mask = keep if kind == "bool" else (np.where(keep, 0.0, -np.inf) + 0.5 * rng.standard_normal(keep.shape)).astype(dtype)
    _check(q, k, v, dO, mask=mask, is_causal=causal, masked_rows=policy)
    _check(q, k, v, dO, mask=keep[0], is_causal=causal, masked_rows=policy)  # one mask broadcast over the batch


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits(rng, path, dtype):
    """Scores in the hundreds: no overflow; float32 carries |s|·eps of rounding, so its bound scales with that."""
    q = (300 * rng.standard_normal((2, 40, 8))).astype(dtype)
    k, v, dO = (rng.standard_normal(s).astype(dtype) for s in ((2, 50, 8), (2, 50, 4), (2, 40, 4)))
    for causal in (False, True):
        kw = dict(is_causal=causal)
        got = [symattn.attention(q, k, v, **kw), *symattn.attention_backward(q, k, v, dO, **kw)]
        want = [reference.attention(q, k, v, **kw), *reference.attention_backward(q, k, v, dO, **kw)]
        for g, w in zip(got, want):
            assert np.all(np.isfinite(g))
            bound = 1e-10 if dtype == np.float64 else 2e-3  # float32: ~1000 ulp of the largest score
            np.testing.assert_allclose(g, w, rtol=bound, atol=bound * max(1.0, np.abs(w).max()))


def test_nan_inputs_propagate(rng, path):
    q, k, v = (rng.standard_normal((1, 20, 4)) for _ in range(3))
    q[0, 3] = np.nan  # every score of row 3 is NaN: a NaN row, not a "masked" one
    k[0, 7, 0] = np.nan  # key 7: NaN in column 7 of every row
    _close(symattn.attention(q, k, v), reference.attention(q, k, v), np.float64)


@pytest.mark.parametrize("shape", [(0, 5, 4), (3, 0, 4), (2, 0, 5, 4)])
def test_empty_batches_and_queries(path, shape):
    q = np.zeros(shape)
    k = np.ones(shape[:-2] + (6, 4))
    v = np.ones(shape[:-2] + (6, 3))
    out = symattn.attention(q, k, v)
    assert out.shape == shape[:-1] + (3,)
    O, pullback = symattn.attention_vjp(q, k, v)
    grads = pullback(np.zeros_like(O))
    assert grads["q"].shape == q.shape and grads["k"].shape == k.shape and not grads["k"].any()


def test_tile_gradients_are_deterministic(rng, monkeypatch):
    """One batch element with several key-block groups (dQ partials summed in a fixed order): identical bits."""
    monkeypatch.setattr(kernels, "SMALL", 0)
    monkeypatch.setattr(kernels, "BK_BWD", 16)
    monkeypatch.setattr(kernels, "BK_BWD_MASKED", 16)
    q, k, v, dO = (rng.standard_normal((1, 64, 8)).astype(np.float32) for _ in range(4))
    runs = [symattn.attention_backward(q, k, v, dO) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)
    for got, want in zip(runs[0], reference.attention_backward(q, k, v, dO)):
        np.testing.assert_allclose(got, want, **TOL[np.float32])


def test_blas_is_held_to_one_thread_and_restored(rng, monkeypatch):
    """While a tile kernel runs every BLAS library is held to one thread; afterwards the caller's setting is back."""
    monkeypatch.setattr(kernels, "SMALL", 0)
    libs = kernels.one_blas_thread.libs()
    before = [lib.get_num_threads() for lib in libs]
    seen = []
    real = kernels.loops.forward_tiles

    def spy(*args):
        seen.append([lib.get_num_threads() for lib in libs])
        return real(*args)
    monkeypatch.setattr(kernels.loops, "forward_tiles", spy)
    q = rng.standard_normal((2, 20, 4))
    symattn.attention(q, q, q)
    assert seen == [[1] * len(libs)]
    assert [lib.get_num_threads() for lib in libs] == before


def test_blas_is_held_from_worker_threads_and_their_results_are_the_main_threads(rng, monkeypatch):
    """threadpoolctl lets only the first thread that set a limit change OpenBLAS's (pthreads) count and ignores the
    rest: a worker thread's hold did nothing, and its float32 results differed from the main thread's by up to
    2.5e-6 (2 BLAS threads sum a tile in another order). Four threads at once: each sees one BLAS thread inside
    its kernels, gets the main thread's bits, and the count is back afterwards (the holds are counted, not
    stacked: a thread could restore another's saved count while a third one's kernel ran)."""
    from concurrent.futures import ThreadPoolExecutor
    libs = kernels.one_blas_thread.libs()
    if not libs or all(lib.get_num_threads() == 1 for lib in libs):
        pytest.skip("BLAS runs on one thread here: nothing to hold")
    before = [lib.get_num_threads() for lib in libs]
    q, k, v, dO = (rng.standard_normal((4, 256, 64)).astype(np.float32) for _ in range(4))

    def call(_=None):
        O, pullback = symattn.attention_vjp(q, k, v, is_causal=True)
        return [np.array(O), *pullback(dO).values()]
    seen = []
    real = kernels.loops.forward_tiles
    monkeypatch.setattr(kernels.loops, "forward_tiles",
                        lambda *a: (seen.append([lib.get_num_threads() for lib in libs]), real(*a))[1])
    main = call()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(8)))
    for got in results:
        for a, b in zip(got, main):
            np.testing.assert_array_equal(a, b)
    assert seen and all(s == [1] * len(libs) for s in seen)
    assert [lib.get_num_threads() for lib in libs] == before


def test_a_per_thread_blas_count_is_held_and_restored_in_each_thread():
    """OpenMP builds keep a count per calling thread: the process-wide counting held only the first thread's, so a
    second thread's kernels ran unheld and the first thread was left at one thread for good (review). A library
    whose setter fails part-way leaves nothing set."""
    local = threading.local()

    class PerThread:  # an OpenMP OpenBLAS as threadpoolctl shows it
        internal_api, threading_layer, user_api = "openblas", "openmp", "blas"

        def get_num_threads(self):
            return getattr(local, "n", 4)

        def set_num_threads(self, n):
            local.n = n
    hold = BlasHold()
    hold._libs = [PerThread()]
    lib = hold._libs[0]
    a_in, b_in, a_done, b_done = (threading.Event() for _ in range(4))
    seen = {}

    def first():
        with hold:
            a_in.set()
            b_in.wait()
        a_done.set()
        b_done.wait()
        seen["first after both"] = lib.get_num_threads()

    def second():
        a_in.wait()
        with hold:
            seen["second inside"] = lib.get_num_threads()
            b_in.set()
            a_done.wait()
        b_done.set()
    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"second inside": 1, "first after both": 4}

    class Broken(PerThread):
        def get_num_threads(self):
            return 2

        def set_num_threads(self, n):
            raise OSError("no")
    hold = BlasHold()
    hold._libs = [PerThread(), Broken()]
    with pytest.raises(OSError):
        hold.__enter__()
    assert hold._libs[0].get_num_threads() == 4  # set, then restored when the second library failed
    with pytest.raises(OSError):
        hold.__enter__()  # no depth left behind: it tries again
