"""The multi-head layer takes score_mod / mask_mod / params: head h of the layer is FlexAttention's h (ALiBi's
slope per head), checked against the NumPy reference head by head and against finite differences, on both paths
(one thread pool, numeric/one_pool.py, and the general path through symattn.attention_vjp)."""
import numpy as np
import pytest

import symattn
from symattn.mods import alibi
from symattn.numeric import one_pool
from symattn.numeric import reference as ref

H, G, N, DM = 4, 2, 5, 8


@pytest.fixture(params=["one-pool", "general"], autouse=True)
def path(request, monkeypatch):
    """Each test on both of the layer's paths (the general one forced)."""
    if request.param == "general":
        monkeypatch.setattr(one_pool, "applies", lambda c: False)
    return request.param


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, N, DM))
    w = [rng.standard_normal(s) / 3 for s in ((DM, DM), (DM, DM // 2), (DM, DM // 2), (DM, DM))]
    return x, w


def _reference(x, w, **options):
    """Head by head with the NumPy reference, (B, H, n, d) as FlexAttention lays heads out."""
    wq, wk, wv, wo = w
    split = lambda A, groups: A.reshape(A.shape[0], N, groups, -1).transpose(0, 2, 1, 3)  # noqa: E731
    q = split(x @ wq, H)
    k, v = (np.repeat(split(x @ m, G), H // G, axis=1) for m in (wk, wv))  # each group over its heads
    O = ref.attention(q, k, v, **options)
    return O.transpose(0, 2, 1, 3).reshape(x.shape[0], N, DM) @ wo


@pytest.mark.parametrize("options", [dict(score_mod=alibi(heads=H), is_causal=True),
                                     dict(score_mod="softcap:2", mask_mod="window:2"),
                                     dict(score_mod="relative-bias:2", params={"B_rel": np.linspace(-1, 1, 5)})])
def test_layer_variants_match_the_reference_head_by_head(layer, options):
    x, w = layer
    out = symattn.multihead_attention(x, *w, heads=H, kv_heads=G, **options)
    mask = options.get("mask_mod")
    given = {k: v for k, v in options.items() if k not in ("mask_mod", "score_mod")}
    want = _reference(x, w, score_mod=symattn.mods.mod_of(options["score_mod"]), **given,
                      **({"mask_mod": symattn.masks.mask_of(mask)} if mask else {}))
    np.testing.assert_allclose(out, want, atol=1e-12)
    plain = symattn.multihead_attention(x, *w, heads=H, kv_heads=G, is_causal=options.get("is_causal", False))
    assert np.abs(out - plain).max() > 1e-3  # the variant changed the layer


def test_layer_variant_gradients_agree_with_finite_differences(layer):
    x, w = layer
    table = np.linspace(-1, 1, 5)
    options = dict(heads=H, kv_heads=G, score_mod="relative-bias:2", mask_mod="causal")
    out, pullback = symattn.multihead_attention_vjp(x, *w, params={"B_rel": table}, **options)
    dO = np.random.default_rng(2).standard_normal(out.shape)
    grads = pullback(dO)
    names = ("x", "w_q", "w_k", "w_v", "w_o", "B_rel")

    def loss(**change):
        args = dict(zip(names, (x, *w, table))) | change
        return float(np.sum(dO * symattn.multihead_attention(
            args["x"], args["w_q"], args["w_k"], args["w_v"], args["w_o"], params={"B_rel": args["B_rel"]},
            **options)))
    rng, eps = np.random.default_rng(3), 1e-6
    for name, value in zip(names, (x, *w, table)):
        d = rng.standard_normal(value.shape)
        fd = (loss(**{name: value + eps * d}) - loss(**{name: value - eps * d})) / (2 * eps)
        assert abs(fd - np.sum(grads[name] * d)) < 1e-6 * max(1.0, abs(fd)), name


def test_per_head_alibi_needs_as_many_heads_as_the_layer(layer):
    x, w = layer
    with pytest.raises(symattn.InputError, match=rf"one slope per head of 8 heads, but the layer has {H}"):
        symattn.multihead_attention(x, *w, heads=H, kv_heads=G, score_mod=alibi(heads=8))  # not q, k, v's layout


def test_an_empty_batch_or_no_queries_give_empty_results(layer):
    """An empty batch, or cross-attention with no queries, gives the empty output and gradients with a variant
    too (the general path's reshape to FlexAttention's layout used to fail on zero elements)."""
    x, w = layer
    kw = dict(heads=H, kv_heads=G, score_mod=alibi())
    out, pullback = symattn.multihead_attention_vjp(x[:0], *w, **kw)
    grads = pullback(np.zeros(out.shape))
    assert out.shape == (0, N, DM) and grads["x"].shape == (0, N, DM) and not grads["w_q"].any()
    y = np.ones((2, 7, DM))
    out = symattn.multihead_attention(x[:, :0], *w, y=y, mask_mod="window:2", **kw)
    assert out.shape == (2, 0, DM)
