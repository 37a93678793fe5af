"""The numeric API with attention variants: every score, score mod and mask against the NumPy reference and
finite differences; the generic element kernels (symattn/codegen/element.py) directly for the dot product too;
validation of params, mods and masks; FlexAttention's (b, h) for (B, H, n, d) inputs.

Sizes are small (each variant compiles once); the cases sample score x mod x mask so that every score meets
every mod and every mask kind at least once in float64."""
from __future__ import annotations

import numpy as np
import pytest

import symattn
from symattn import masks, mods, reference
from symattn.check.finite_differences import gradcheck
from symattn.errors import InputError
from symattn.numeric import api, kernels, variants

N, D, DA = 5, 3, 3


def _later(b, h, q_idx, kv_idx):  # a user's mask_mod: keys up to one after the query
    return kv_idx <= q_idx + 1


def _theta(score: str, mod: str | None, rng, dtype=np.float64) -> dict:
    theta = {"general": {"W_a": rng.standard_normal((D, D))},
             "additive": {"W_a": rng.standard_normal((D, DA)), "U_a": rng.standard_normal((D, DA)),
                          "v_a": rng.standard_normal(DA), "b_a": rng.standard_normal(DA)},
             "cosine": {"tau": np.array([2.5])}}.get(score, {})
    if mod and mod.startswith("relative-bias"):
        theta["B_rel"] = rng.standard_normal(2 * int(mod.split(":")[1]) + 1)
    return {name: x.astype(dtype) for name, x in theta.items()}


def _inputs(rng, dtype=np.float64, batch=(2,)):
    return [rng.standard_normal(batch + (N, D)).astype(dtype) for _ in range(4)]  # q, k, v, dO


def _mask(text):
    return _later if text == "user" else text


#: (score, score_mod, mask_mod), sampled so each score meets several mods and masks and every mod and mask kind
#: appears (each case compiles its kernels once: the product of all would take minutes). The other tests reuse
#: these variants' kernels.
CASES = [("general", None, "causal"), ("general", "softcap:2", "user"), ("general", "relative-bias:2", "prefix:2"),
         ("additive", "alibi", "window:2"), ("additive", "relative-bias:2", "prefix:2"), ("additive", "softcap:3", None),
         ("cosine", None, "user"), ("cosine", "alibi", "window:2"), ("cosine", "relative-bias:1", "causal"),
         ("dot", "relative-bias:2", "user")]


def _check(score, mod, mask, rng, dtype=np.float64, tol=1e-10):
    q, k, v, dO = _inputs(rng, dtype)
    theta = _theta(score, mod, rng, dtype)
    options = dict(score=score, params=theta or None, score_mod=mod, mask_mod=_mask(mask))
    O, pullback = symattn.attention_vjp(q, k, v, **options)
    ref_mask = None if mask is None else masks.mask_of(_mask(mask))
    ref = dict(score=score, params=theta, score_mod=mods.mod_of(mod), mask_mod=ref_mask)
    expected = reference.attention(q, k, v, **ref)
    np.testing.assert_allclose(O, expected, rtol=tol, atol=tol)
    grads, want = pullback(dO), reference.gradients(q, k, v, dO, **ref)
    assert sorted(grads) == sorted(["q", "k", "v", *theta])
    for name in want:
        np.testing.assert_allclose(grads[name], want[name], rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("score, mod, mask", CASES)
def test_variant_matches_reference_float64(score, mod, mask, rng):
    _check(score, mod, mask, rng)


@pytest.mark.parametrize("score, mod, mask", [("additive", "softcap:3", None)])
def test_variant_matches_reference_float32(score, mod, mask, rng):
    _check(score, mod, mask, rng, np.float32, 2e-4)


def test_generic_kernels_serve_the_dot_product(rng):
    """The element kernels handle the dot product too (the API sends it to the dot family's tile kernels)."""
    q, k, v, dO = _inputs(rng)
    B_rel = rng.standard_normal(5)
    mod, mask = mods.parse("relative-bias:2"), masks.causal
    bh = variants.bh_rows((2,))
    batch = np.stack([np.arange(2)] * 3 + [np.zeros(2, int)], axis=1).astype(np.int64)
    O, LSE = np.empty((2, N, D)), np.empty((2, N))
    args = (q, k, v, np.zeros((0, 0, 0)), batch, bh, 0.5, 0, mod, mask, {"B_rel": B_rel})
    variants.variant_forward("dot", *args, O, LSE)
    ref = dict(scale=0.5, params={"B_rel": B_rel}, score_mod=mod, is_causal=True)
    np.testing.assert_allclose(O, reference.attention(q, k, v, **ref), rtol=1e-10, atol=1e-10)
    dQ, dK, dV = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    grads = variants.variant_backward("dot", *args, O, LSE, dO, dQ, dK, dV)
    want = reference.gradients(q, k, v, dO, **ref)
    for name, got in (("q", dQ), ("k", dK), ("v", dV), ("B_rel", grads["B_rel"])):
        np.testing.assert_allclose(got, want[name], rtol=1e-10, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("score, mod, mask", [("additive", "relative-bias:2", "prefix:2"),
                                              ("cosine", "relative-bias:1", "causal")])
def test_gradients_agree_with_finite_differences(score, mod, mask, rng):
    q, k, v, _ = _inputs(rng, batch=())
    theta = _theta(score, mod, rng)
    names = list(theta)

    def f(q, k, v, *values):
        return symattn.attention(q, k, v, score=score, params=dict(zip(names, values)), score_mod=mod, mask_mod=mask)

    def grads(q, k, v, *rest):
        *values, dO = rest
        _, pullback = symattn.attention_vjp(q, k, v, score=score, params=dict(zip(names, values)), score_mod=mod,
                                            mask_mod=mask)
        g = pullback(dO)
        return [g[n] for n in ("q", "k", "v", *names)]
    report = gradcheck(f, {"q": q, "k": k, "v": v, **theta}, grads)
    assert report.passed, str(report)


@pytest.mark.parametrize("policy", ["zero", "uniform", "nan"])
def test_fully_masked_rows_follow_masked_rows(policy, rng):
    """Row 0 sees no key (the boolean mask hides its row; the window mask_mod the far keys of the others)."""
    q, k, v, dO = _inputs(rng)
    theta = _theta("cosine", "alibi", rng)
    visible = np.ones((N, N), dtype=bool)
    visible[0, :] = False  # row 0: no visible key
    options = dict(score="cosine", params=theta, score_mod="alibi", mask_mod="window:2", mask=visible,
                   masked_rows=policy)
    O, pullback = symattn.attention_vjp(q, k, v, **options)
    ref = dict(score="cosine", params=theta, score_mod=mods.alibi(), mask_mod=masks.sliding_window(2), mask=visible,
               masked_rows=policy)
    np.testing.assert_allclose(O, reference.attention(q, k, v, **ref), rtol=1e-10, atol=1e-10)
    grads, want = pullback(dO), reference.gradients(q, k, v, dO, **ref)
    for name in want:
        np.testing.assert_allclose(grads[name], want[name], rtol=1e-10, atol=1e-10, err_msg=name)
    if policy == "zero":
        assert not O[:, 0].any()


def test_alibi_per_head_reads_h_of_b_h_n_d_inputs(rng):
    """(B, H, n, d) inputs: head h gets slope 2^(-8(h+1)/H), as FlexAttention's score_mod(score, b, h, ...)."""
    q, k, v, dO = _inputs(rng, batch=(2, 4))
    theta = _theta("general", None, rng)
    mod = mods.alibi(heads=4)
    O, pullback = symattn.attention_vjp(q, k, v, score="general", params=theta, score_mod=mod)
    slopes = 2.0 ** (-8.0 * np.arange(1, 5) / 4)  # (H,)
    distance = np.arange(N)[None, :] - np.arange(N)[:, None]  # j - i
    bias = slopes[:, None, None] * distance  # (H, n, n): the per-head ALiBi term, as an additive mask
    np.testing.assert_allclose(O, reference.attention(q, k, v, score="general", params=theta, mask=bias),
                               rtol=1e-10, atol=1e-10)
    plain = symattn.attention(q, k, v, score="general", params=theta, score_mod=mods.alibi(1 / 256))
    assert not np.allclose(O, plain)  # the heads differ: h was read
    grads = pullback(dO)
    want = reference.gradients(q, k, v, dO, score="general", params=theta, mask=bias)
    for name in want:
        np.testing.assert_allclose(grads[name], want[name], rtol=1e-10, atol=1e-10, err_msg=name)


def test_run_time_masks_bind_their_arrays_per_batch_element(rng):
    """document(ids) & key_padding(lengths): arrays with one row per b, read at the element's b ((B, 1, n, d)
    inputs: the reference reads b from dim -4)."""
    q, k, v, dO = (x[:, None] for x in _inputs(rng))  # (2, 1, n, d)
    theta = _theta("cosine", None, rng)
    mask = masks.and_masks(masks.document(np.array([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])),
                           masks.key_padding(np.array([4, 2])))
    O, pullback = symattn.attention_vjp(q, k, v, score="cosine", params=theta, mask_mod=mask)
    ref = dict(score="cosine", params=theta, mask_mod=mask)
    np.testing.assert_allclose(O, reference.attention(q, k, v, **ref), rtol=1e-10, atol=1e-10)
    grads, want = pullback(dO), reference.gradients(q, k, v, dO, **ref)
    for name in want:
        np.testing.assert_allclose(grads[name], want[name], rtol=1e-10, atol=1e-10, err_msg=name)


def test_weights_and_backward_take_the_variant_options(rng):
    q, k, v, dO = _inputs(rng)
    theta = _theta("additive", None, rng)
    options = dict(score="additive", params=theta, score_mod="softcap:3")
    ref = dict(score="additive", params=theta, score_mod=mods.softcap(3))
    P = symattn.attention_weights(q, k, **options)
    np.testing.assert_allclose(P, reference.weights(q, k, **ref), rtol=1e-10, atol=1e-10)
    dq, dk, dv = symattn.attention_backward(q, k, v, dO, **options)
    want = reference.gradients(q, k, v, dO, **ref)
    for got, name in ((dq, "q"), (dk, "k"), (dv, "v")):
        np.testing.assert_allclose(got, want[name], rtol=1e-10, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("params, words", [
    ({"U_a": 1}, ["missing", "'W_a'", "'v_a'"]),
    ("extra", ["unexpected", "'tau'"]),
    ("shape", ["params['W_a']", "(d_k, d_a)", "(3, 3)", "(2, 3)"]),
    ("dtype", ["params['v_a']", "float32"]),
])
def test_bad_params_name_the_param(params, words, rng):
    q, k, v, _ = _inputs(rng)
    theta = _theta("additive", None, rng)
    if params == "extra":
        theta["tau"] = np.ones(1)
    elif params == "shape":
        theta["W_a"] = np.ones((2, 3))
    elif params == "dtype":
        theta["v_a"] = theta["v_a"].astype(np.float32)
    else:
        theta = {name: x for name, x in theta.items() if name in params}
    with pytest.raises(InputError) as error:
        symattn.attention(q, k, v, score="additive", params=theta)
    assert all(word in str(error.value) for word in words), str(error.value)


@pytest.mark.parametrize("options, word", [
    (dict(score="bilinear"), "score"), (dict(score_mod=3.0), "score_mod"), (dict(mask_mod=42), "mask_mod"),
    (dict(score_mod="sofcap:3"), "score_mod"), (dict(score="additive", scale=0.5), "scale"),
    (dict(score="general", params=[1, 2]), "params"), (dict(score_mod="alibi:heads=4"), "heads"),
])
def test_bad_variant_options_are_refused_by_name(options, word, rng):
    q, k, v, _ = _inputs(rng)
    with pytest.raises(InputError, match=word):
        symattn.attention(q, k, v, **options)


def test_plain_options_keep_todays_kernels(rng, monkeypatch):
    """No variant option: the plain path runs, and resolve says so (None) for the causal dot product."""
    assert variants.resolve("dot", None, None, None, True, None) is None
    monkeypatch.setattr(variants, "forward", lambda *a: pytest.fail("variant kernels ran for plain inputs"))
    q, k, v, _ = _inputs(rng)
    np.testing.assert_allclose(api.attention(q, k, v, is_causal=True), reference.attention(q, k, v, is_causal=True),
                               rtol=1e-10, atol=1e-10)


def test_mask_mod_alone_masks_the_plain_dot_product(rng):
    q, k, v, _ = _inputs(rng)
    np.testing.assert_allclose(symattn.attention(q, k, v, mask_mod="causal"),
                               reference.attention(q, k, v, is_causal=True), rtol=1e-10, atol=1e-10)


def test_bh_rows_follow_flexattention():
    assert variants.bh_rows((2, 3)).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert variants.bh_rows((2,)).tolist() == [[0, 0], [1, 0]]
    assert variants.bh_rows(()).tolist() == [[0, 0]]


@pytest.mark.parametrize("batch", [(3,), (2, 2), (2, 1, 2)])
def test_b_and_h_mean_the_same_in_kernels_and_reference(batch, rng):
    """A mod reading b and h sees FlexAttention's (b, h) alike in the kernels and the NumPy reference for 3-D
    (b the batch, h = 0), 4-D and higher (b counts every dim before the heads) inputs."""
    from symattn.mods import score_mod

    @score_mod
    def by_element(score, b, h, q_idx, kv_idx):
        return score * (1 + 0.5 * b + 0.25 * h)  # not constant along a row: softmax sees it
    q, k, v, dO = (rng.standard_normal(batch + (3, 2)) for _ in range(4))
    O, pullback = symattn.attention_vjp(q, k, v, score_mod=by_element)
    np.testing.assert_allclose(O, reference.attention(q, k, v, score_mod=by_element), rtol=1e-10, atol=1e-10)
    got, want = pullback(dO), reference.gradients(q, k, v, dO, score_mod=by_element)
    for name in ("q", "k", "v"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-10, err_msg=name)


def test_cached_element_kernels_run_without_sympy(rng):
    """The kernel module written on first use is loaded and run by a fresh process without importing SymPy."""
    import subprocess
    import sys
    q, k, v, _ = _inputs(rng)
    symattn.attention(q, k, v, score="cosine", params=_theta("cosine", None, rng), mask_mod="causal")  # cached now
    program = ("import sys, numpy as np, symattn; from symattn.numeric import kernels; x = np.ones((2, 5, 3)); "
               "symattn.attention(x, x, x, score='cosine', params={'tau': np.ones(1)}, mask_mod='causal'); "
               "print(kernels.cache_dir(), 'sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    folder, loaded = out.stdout.split()
    if folder != str(kernels.cache_dir()):
        pytest.skip("symattn's source changed during the test (a new kernel cache folder)")
    assert loaded == "False", out.stderr


def test_element_kernels_render_deterministically_with_hoisted_sums():
    """Same text twice; the additive score's one-sided sums Σ_a Q[i,a] W_a[a,r], Σ_a K[j,a] U_a[a,r] are arrays
    computed once per row / key, so the per-pair score reads them (no d_k loop per pair)."""
    from symattn.codegen.element import render
    first = render("additive", mods.parse("relative-bias:2"), masks.parse("window:3"), "element_test")
    assert first == render("additive", mods.parse("relative-bias:2"), masks.parse("window:3"), "element_test")
    forward = first.split("def _forward_one")[1].split("def forward")[0]
    pair = forward.split("for j in range(lo, hi):")[1].split("P[ti, j] = s")[0]
    assert "p_Wa" not in pair and "p_Ua" not in pair and "_tanh(" in pair, pair


def test_a_scalar_temperature_is_taken_and_its_gradient_has_its_shape():
    rng = np.random.default_rng(7)
    q, k, v, dO = (rng.standard_normal((2, 5, 3)) for _ in range(4))
    O, pullback = symattn.attention_vjp(q, k, v, score="cosine", params={"tau": np.array(3.0)})
    g = pullback(dO)

    def loss(t):
        return float(np.sum(dO * symattn.attention(q, k, v, score="cosine", params={"tau": np.array(t)})))
    assert g["tau"].shape == ()
    assert abs(float(g["tau"]) - (loss(3 + 1e-6) - loss(3 - 1e-6)) / 2e-6) < 1e-6
    np.testing.assert_allclose(O, symattn.attention(q, k, v, score="cosine", params={"tau": np.array([3.0])}))


def test_saturated_softcap_passes_no_gradient_in_float32():
    """c·tanh(s/c) is flat where tanh saturates. The float32 tanh gave 1 - 2.4e-7 there once inlined under the
    kernels' fastmath, so 1 - tanh² leaked: with scores of 1e15, dk came out at 1e8 where the reference has 0."""
    r = np.random.default_rng(0)
    q, k, v = r.standard_normal((2, 6, 4)) * 1e15, r.standard_normal((2, 8, 4)), r.standard_normal((2, 8, 3))
    dO = r.standard_normal((2, 6, 3))
    want = reference.gradients(q, k, v, dO, score_mod=mods.softcap(30))
    assert np.abs(want["q"]).max() == 0 and np.abs(want["k"]).max() == 0
    for small in (True, False):  # loop kernels, then tiles
        with pytest.MonkeyPatch.context() as m:
            m.setattr(kernels, "SMALL", 1 << 62 if small else 0)
            O, pullback = symattn.attention_vjp(*(x.astype(np.float32) for x in (q, k, v)), score_mod=mods.softcap(30))
            got = pullback(dO.astype(np.float32))
        assert np.abs(got["q"]).max() == 0 and np.abs(got["k"]).max() == 0
        np.testing.assert_allclose(got["v"], want["v"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", ["zero", "uniform", "nan"])
def test_a_mask_mod_that_hides_every_key_at_every_size_masks_every_row(policy, rng):
    """kv_idx < 0 is False for every index, so SymPy drops the mask from the derivation (no Piecewise left): the
    kernels once read that as no mask and returned plain attention (with is_causal too: causal & False is False,
    the same path). Every row is fully masked: masked_rows holds, in the loop and the tile kernels."""
    q, k, v, dO = (rng.standard_normal((2, 5, 3)) for _ in range(4))
    never = lambda b, h, q_idx, kv_idx: kv_idx < 0  # noqa: E731
    want = reference.attention(q, k, v, mask_mod=never, masked_rows=policy)
    for small in (True, False):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(kernels, "SMALL", 1 << 62 if small else 0)
            O, pullback = symattn.attention_vjp(q, k, v, mask_mod=never, masked_rows=policy)
            grads = pullback(dO)
        np.testing.assert_allclose(O, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(O, {"zero": 0.0, "uniform": np.broadcast_to(v.mean(-2, keepdims=True), O.shape),
                                       "nan": np.nan}[policy])
        for name in "qk":
            assert np.all(grads[name] == 0) or policy == "nan"


@pytest.mark.parametrize("score, params", [("general", {"W_a": np.eye(2)}), ("dot", None)])
def test_run_time_mask_arrays_have_one_row_per_b_with_heads(score, params, rng):
    """q (B, H, n, d): key_padding's lengths are one per FlexAttention b, shared by the heads, for the element
    kernels (the general score) as for the dot kernels; B·H rows are refused by name (the element kernels once
    asked for B·H rows and read only the first B)."""
    q, k, v = (rng.standard_normal((2, 3, 4, 2)) for _ in range(3))
    options = dict(score=score, params=params, mask_mod=masks.key_padding([2, 3]))
    np.testing.assert_allclose(symattn.attention(q, k, v, **options), reference.attention(q, k, v, **options),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError, match=r"'kv_len' has 6 rows; give 1 or one per batch index b \(2\)"):
        symattn.attention(q, k, v, score=score, params=params, mask_mod=masks.key_padding([2, 3, 1, 2, 3, 4]))


@pytest.mark.parametrize("policy", ["zero", "uniform", "nan"])
def test_variant_rows_whose_visible_scores_are_all_minus_infinity_are_nan(policy, rng):
    """As for the plain kernels (test_api): scores of -inf from the data on every key the mask lets a row see give
    0/0, a NaN row as in NumPy, not the masked_rows policy, which is for rows the mask empties. Dot-variant kernels
    (loops and tiles) and element kernels, on variants other tests compile."""
    q, k, v = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 3))
    q[0, 2] = -1e200
    k[0] = np.abs(k[0]) * 1e200 + 1.0  # row (0, 2): every score -inf
    for options in (dict(score_mod="alibi", mask_mod="causal"), dict(score="general", mask_mod="causal",
                                                                     params={"W_a": np.eye(3)})):
        ref = dict(options, score_mod=mods.mod_of(options.get("score_mod")), mask_mod=masks.causal)
        want = reference.attention(q, k, v, masked_rows=policy, **ref)
        for small in (True, False):
            with pytest.MonkeyPatch.context() as m:
                m.setattr(kernels, "SMALL", 1 << 62 if small else 0)
                out = symattn.attention(q, k, v, masked_rows=policy, **options)
            assert np.isnan(out[0, 2]).all() and not np.isnan(np.delete(out.reshape(-1, 3), 2, 0)).any()
            np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
