"""attention_vjp: equal to attention_backward, the forward run once, the fast path equal to the validated path."""
import numpy as np
import pytest

import symattn
from symattn import InputError, reference
from symattn.numeric import api, kernels, plain

FORWARDS = ("attention_forward", "plain_forward", "plain_vjp_forward", "forward_tiles")
BACKWARDS = ("attention_backward", "plain_backward", "plain_vjp_backward", "backward_tiles")


@pytest.fixture
def calls(monkeypatch):
    """Kernel name -> number of calls, counted by wrapping the generated kernels the dispatch looks up."""
    counts = {}
    for name in FORWARDS + BACKWARDS:
        real = getattr(kernels.loops, name)

        def counted(*args, real=real, name=name):
            counts[name] = counts.get(name, 0) + 1
            return real(*args)
        monkeypatch.setattr(kernels.loops, name, counted)
    return counts


CASES = {  # name -> (shapes of q, k, v, options)
    "plain-3d": (((2, 7, 4), (2, 9, 4), (2, 9, 3)), {}),
    "plain-2d": (((7, 4), (9, 4), (9, 3)), {"is_causal": True}),
    "broadcast-mask": (((2, 1, 7, 4), (3, 9, 4), (3, 9, 3)), {"mask": "rows", "masked_rows": "uniform"}),
}


@pytest.mark.parametrize("tiles", [False, True], ids=["loops", "tiles"])
@pytest.mark.parametrize("case", CASES)
def test_vjp_equals_backward_and_runs_the_forward_once(rng, monkeypatch, calls, case, tiles):
    monkeypatch.setattr(kernels, "SMALL", 0 if tiles else 1 << 62)
    shapes, options = CASES[case]
    q, k, v = (rng.standard_normal(s) for s in shapes)
    if options.get("mask") == "rows":
        mask = rng.random((7, 9)) < 0.5
        mask[2] = False
        options = dict(options, mask=mask)
    O, pullback = symattn.attention_vjp(q, k, v, **options)
    np.testing.assert_array_equal(O, symattn.attention(q, k, v, **options))
    calls.clear()
    dO = rng.standard_normal(O.shape)
    grads = pullback(dO)
    assert sum(calls.get(n, 0) for n in FORWARDS) == 0 and sum(calls.get(n, 0) for n in BACKWARDS) == 1
    assert list(grads) == ["q", "k", "v"]
    for name, x, want in zip("qkv", (q, k, v), symattn.attention_backward(q, k, v, dO, **options)):
        assert grads[name].shape == x.shape
        np.testing.assert_array_equal(grads[name], want)
    for name, want in zip("qkv", reference.attention_backward(q, k, v, dO, **options)):
        np.testing.assert_allclose(grads[name], want, rtol=1e-10, atol=1e-12)
    calls.clear()
    symattn.attention_vjp(q, k, v, **options)[1](dO)
    assert sum(calls.get(n, 0) for n in FORWARDS) == 1 and sum(calls.get(n, 0) for n in BACKWARDS) == 1


@pytest.mark.parametrize("shape", [(1, 5, 2), (3, 7, 4), (5, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_fast_and_validated_paths_agree_bit_for_bit(rng, shape, dtype, causal):
    """The validated path (a Fortran-ordered q) runs the fast path's serial kernels on unbroadcast inputs without a
    mask: the same numbers to the last bit (they once differed by 1-2 ulp at d_k = 2: two compiled functions,
    fastmath)."""
    q, k, v, dO = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
    O, pullback = symattn.attention_vjp(q, k, v, is_causal=causal)
    O2, pullback2 = symattn.attention_vjp(np.asfortranarray(q), k, v, is_causal=causal)
    assert plain.plain(np.asfortranarray(q), k, v, None, causal, None, "zero") is None
    np.testing.assert_array_equal(O, O2)
    grads, grads2 = pullback(dO), pullback2(dO)
    for name in "qkv":
        np.testing.assert_array_equal(grads[name], grads2[name])
    np.testing.assert_array_equal(symattn.attention(q, k, v, is_causal=causal), O)
    for name, g in zip("qkv", symattn.attention_backward(q, k, v, dO, is_causal=causal)):
        np.testing.assert_array_equal(g, grads[name])


def test_the_small_pullback_reads_its_own_copy_of_O(rng):
    """O owns its memory on the small path, so NumPy lets the caller make it writable or resize it; the pullback
    reads the copy the forward kernel saved, so the gradients stay those of the forward that ran."""
    q, k, v, dO = (rng.standard_normal((2, 5, 4)) for _ in range(4))
    want = reference.gradients(q, k, v, dO)
    O, pullback = symattn.attention_vjp(q, k, v)
    with pytest.raises(ValueError, match="read-only"):
        O[0, 0, 0] = 1.0
    O.setflags(write=True)
    O[:] = 0.0
    O.resize((1, 2, 4), refcheck=False)
    grads = pullback(dO)
    for name in "qkv":
        np.testing.assert_allclose(grads[name], want[name], rtol=1e-10, atol=1e-12)


def test_fast_path_is_taken_and_agrees_with_the_validated_path(rng, monkeypatch):
    q, k, v, dO = (rng.standard_normal((3, 6, 4)).astype(np.float32) for _ in range(4))
    fast = [symattn.attention(q, k, v, is_causal=True), symattn.attention_vjp(q, k, v, is_causal=True)[1](dO)]
    # the same data through the validated path: a non-contiguous view, a NumPy scalar scale, lists
    slow_q = np.asfortranarray(q)
    assert plain.plain(slow_q, k, v, None, True, None, "zero") is None
    scale = np.float32(0.5)
    assert plain.plain(q, k, v, None, True, scale, "zero") is None
    np.testing.assert_array_equal(symattn.attention(slow_q, k, v, is_causal=True), fast[0])
    np.testing.assert_array_equal(symattn.attention(q, k, v, is_causal=True, scale=scale),
                                  symattn.attention(q, k, v, is_causal=True, scale=0.5))
    sub = q.view(type("Sub", (np.ndarray,), {}))  # a subclass: not an exact ndarray
    assert plain.plain(sub, k, v, None, True, None, "zero") is None
    np.testing.assert_array_equal(symattn.attention(sub, k, v, is_causal=True), fast[0])
    slow = symattn.attention_vjp(slow_q, k, v, is_causal=True)[1](dO)
    for name in "qkv":
        np.testing.assert_array_equal(slow[name], fast[1][name])
    monkeypatch.setattr(api, "_prepare", lambda *a, **kw: pytest.fail("plain inputs went through _prepare"))
    symattn.attention(q, k, v)
    symattn.attention_vjp(q[0], k[0], v[0], scale=0.25)[1](dO[0])


@pytest.mark.parametrize("bad, message", [
    (dict(is_causal=1), "is_causal must be True or False"),
    (dict(masked_rows="drop"), "masked_rows must be one of"),
    (dict(scale=-1.0), "scale must be a positive"),
    (dict(scale=float("nan")), "scale must be a positive"),
])
def test_plain_inputs_with_bad_options_are_refused(rng, bad, message):
    q = rng.standard_normal((2, 3, 4))
    for f in (symattn.attention, symattn.attention_vjp):
        with pytest.raises(InputError, match=message):
            f(q, q, q, **bad)


@pytest.mark.parametrize("shapes, message", [
    (((2, 3, 4), (2, 5, 3), (2, 5, 2)), "same last dim d_k"),
    (((2, 3, 4), (2, 5, 4), (2, 6, 2)), "same number of keys"),
    (((2, 3, 4), (3, 5, 4), (3, 5, 2)), "do not broadcast"),
])
def test_plain_looking_shapes_are_validated(shapes, message):
    q, k, v = (np.zeros(s) for s in shapes)
    with pytest.raises(InputError, match=message):
        symattn.attention_vjp(q, k, v)


def test_pullback_checks_dO(rng):
    q = rng.standard_normal((2, 3, 4))
    for x in (q, np.asfortranarray(q)):  # the fast path and the validated path
        O, pullback = symattn.attention_vjp(x, x, x)
        with pytest.raises(InputError, match=r"dO must have the output's shape \(2, 3, 4\)"):
            pullback(np.zeros((2, 4, 4)))
        with pytest.raises(InputError, match="dO must have the dtype"):
            pullback(np.zeros(O.shape, np.float32))
        with pytest.raises(InputError, match="dO .*float16"):
            pullback(np.zeros(O.shape, np.float16))
        strided = np.zeros((2, 3, 8))[..., ::2]
        np.testing.assert_array_equal(pullback(strided)["q"], 0.0)  # non-contiguous dO is fine


def test_serial_plain_kernels_share_their_scratch_safely(rng):
    """The serial plain kernels write their score rows and backward tiles into scratch buffers shared by every call
    of a shape: closures kept alive and interleaved with other calls of the same and other shapes still give the
    reference's gradients. Safe because the kernels hold the GIL while they run (no nogil)."""
    assert not any(getattr(kernels.loops, k).targetoptions.get("nogil") for k in (
        "plain_forward", "plain_backward", "plain_vjp_forward", "plain_vjp_backward"))
    cases = [tuple(rng.standard_normal(s) for s in ((2, n_q, 3), (2, n_k, 3), (2, n_k, 2), (2, n_q, 2)))
             for n_q, n_k in ((4, 5), (6, 5), (4, 17))]
    pullbacks = [symattn.attention_vjp(q, k, v, is_causal=c)[1] for c in (False, True) for q, k, v, _ in cases]
    for _ in range(2):
        for i, pullback in enumerate(pullbacks):
            q, k, v, dO = cases[i % len(cases)]
            symattn.attention(*cases[(i + 1) % len(cases)][:3])  # another call between, writing the scratch
            grads = pullback(dO)
            want = reference.attention_backward(q, k, v, dO, is_causal=i >= len(cases))
            for name, w in zip("qkv", want):
                np.testing.assert_allclose(grads[name], w, rtol=1e-10, atol=1e-12)


def _spoil(x: np.ndarray) -> None:
    """Change x in place: negate a boolean mask, scale anything else."""
    if x.dtype == bool:
        np.logical_not(x, out=x)
    else:
        x *= -3.0


@pytest.mark.parametrize("case", ["plain", "mask", "variant"])
def test_the_pullback_reads_what_the_forward_saw(rng, case):
    """Changing q, k, v (or θ, or the mask) in place after attention_vjp once changed the gradients silently
    (dq off by 1e6 at (2,64,128,8)): the pullback keeps its own copies, as PyTorch keeps saved tensors, and the
    O it returns is read-only, as PyTorch raises on an in-place change of a saved output."""
    q, k, v, dO = (rng.standard_normal((2, 5, 4)) for _ in range(4))
    mask, W_a = rng.random((5, 5)) < 0.7, rng.standard_normal((4, 4))

    def options(mask, W_a):
        return {"plain": {}, "mask": {"mask": mask}, "variant": {"score": "general", "params": {"W_a": W_a}}}[case]
    want = symattn.attention_vjp(q.copy(), k.copy(), v.copy(), **options(mask.copy(), W_a.copy()))[1](dO)
    O, pullback = symattn.attention_vjp(q, k, v, **options(mask, W_a))
    for x in (q, k, v, mask, W_a):
        _spoil(x)
    with pytest.raises(ValueError, match="read-only"):
        O += 1.0
    got = pullback(dO)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
