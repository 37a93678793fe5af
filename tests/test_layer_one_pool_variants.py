"""The layer with a dot-product score and score mods / index masks runs in one thread pool (numeric/one_pool.py):
its output and every gradient, the mods' parameters included, equal the layer's general path (NumPy projections,
heads through symattn.attention_vjp in FlexAttention's layout; both paths are checked against the reference head
by head and by finite differences in test_layer_variants.py), with tile kernels in float64 and loop kernels in
float32."""
import numpy as np
import pytest

import symattn
from symattn import masks, mods
from symattn.numeric import kernels, layer, one_pool

#: name: (heads, kv_heads, batch dims, n_q, options); n_k given: cross-attention from y (batch, n_k, 8). The (mod, mask)
#: pairs but softcap with window-and-causal are ones other tests compile too (test_layer_variants, test_variant_kernels'
#: PAIRS): a new pair costs a fresh test run its kernels' compile time.
CASES = {
    "alibi-heads-causal-gqa": (4, 2, (3,), 9, dict(score_mod=mods.alibi(heads=4), is_causal=True)),
    "softcap-window-and-causal": (2, 2, (2,), 8, dict(score_mod=mods.softcap(2), mask_mod=masks.sliding_window(3),
                                                      is_causal=True)),
    "relative-bias-prefix-mqa": (4, 1, (2,), 7, dict(score_mod=mods.relative_bias(3), mask_mod=masks.prefix_lm(4),
                                                      params="B_rel")),
    "alibi-document-2d-x": (2, 2, (), 8, dict(score_mod="alibi",
                                              mask_mod=masks.document(np.array([0, 0, 0, 1, 1, 2, 2, 2])))),
    "softcap-key-padding-cross": (2, 1, (2,), 6, dict(score_mod=mods.softcap(2), n_k=9,
                                                       mask_mod=masks.key_padding(np.array([4, 9])))),
}


@pytest.mark.parametrize("tiles", [True, False], ids=["tiles", "loops"])
@pytest.mark.parametrize("case", CASES)
def test_variant_layer_in_one_pool_equals_the_general_path(rng, monkeypatch, tiles, case):
    monkeypatch.setattr(kernels, "SMALL", 0 if tiles else 1 << 62)
    H, G, batch, n, options = CASES[case]
    ran = []
    monkeypatch.setattr(one_pool, "backward", lambda *a, f=one_pool.backward: (ran.append(1), f(*a))[1])
    d_model, d = 8, 8 // H
    # tiles in float64 (tight: a logic slip shows), loops in float32: each case compiles half the kernels (the four
    # combinations took ~3 minutes of a fresh test run); the kernels' own tests cover the other two per dtype
    for dtype, tol in ((np.float64, 1e-10),) if tiles else ((np.float32, 3e-4),):
        x = rng.standard_normal(batch + (n, d_model)).astype(dtype)
        w = [(rng.standard_normal(s) / 2).astype(dtype) for s in
             ((d_model, H * d), (d_model, G * d), (d_model, G * d), (H * d, d_model))]
        kw = dict(options, heads=H, kv_heads=G)
        if "n_k" in kw:
            kw["y"] = rng.standard_normal(batch + (kw.pop("n_k"), d_model)).astype(dtype)
        if kw.get("params") == "B_rel":
            kw["params"] = {"B_rel": rng.standard_normal(7).astype(dtype)}
        out, pullback = layer.multihead_attention_vjp(x, *w, **kw)
        d_out = rng.standard_normal(out.shape).astype(dtype)
        got, again = pullback(d_out), pullback(d_out)
        with monkeypatch.context() as m:
            m.setattr(one_pool, "applies", lambda c: False)
            want_out, want_pullback = layer.multihead_attention_vjp(x, *w, **kw)
            want = want_pullback(d_out)
        np.testing.assert_allclose(out, want_out, rtol=tol, atol=tol)
        plain = layer.multihead_attention(x, *w, heads=H, kv_heads=G, y=kw.get("y"))
        assert np.abs(out - plain).max() > 1e-3  # the variant changed the layer
        assert set(got) == set(want) and ("B_rel" in got) == ("params" in kw)
        for name in want:
            assert got[name].shape == want[name].shape and got[name].dtype == dtype, name
            np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol, err_msg=name)
            np.testing.assert_array_equal(got[name], again[name], err_msg=name)
    assert len(ran) == 2  # two pullbacks through the one-pool path


def test_variant_layer_errors_come_before_any_work(rng, monkeypatch):
    x = rng.standard_normal((2, 5, 8))
    w = [rng.standard_normal((8, 8)) for _ in range(4)]
    monkeypatch.setattr(one_pool, "_project", lambda *a: pytest.fail("projected before checking the variant"))
    with pytest.raises(symattn.InputError, match="B_rel"):
        layer.multihead_attention(x, *w, heads=4, score_mod=mods.relative_bias(2))
    with pytest.raises(symattn.InputError, match="heads"):
        layer.multihead_attention(x, *w, heads=4, score_mod=mods.alibi(heads=2))
    with pytest.raises(symattn.InputError, match="key_padding lengths must lie in 0..n_k=5"):
        layer.multihead_attention(x, *w, heads=4, mask_mod=masks.key_padding(np.array([3, 6])))
    with pytest.raises(symattn.InputError, match="document mask: 5 ids for n_q=5 queries and n_k=7 keys"):
        layer.multihead_attention(x, *w, heads=4, y=rng.standard_normal((2, 7, 8)),
                                  mask_mod=masks.document(np.arange(5)))
