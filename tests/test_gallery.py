"""The FlexAttention gallery (issue 8): user-written score mods and mask mods ported from attention-gym and the
FlexAttention blog, traced, and verified four ways: exact symbolic values, unrolled kernels, the NumPy reference,
and finite differences of every input and parameter."""
import numpy as np
import pytest

import symattn
from symattn import masks, reference
from symattn.check import gallery
from symattn.mods import ops
from symattn.numeric import kernels
from symattn.check.verification import verify

EXAMPLES = {e.name: e for e in gallery.examples()}


def test_the_gallery_covers_the_issue_list():
    assert {"alibi", "softcap", "sliding_window", "prefix_lm", "relative_positional", "learned_bias"} <= set(EXAMPLES)
    assert ("document" in EXAMPLES) == hasattr(gallery.masks, "document")


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_is_verified_four_ways(name):
    spec = EXAMPLES[name].spec()
    report = verify(spec)
    assert report.passed, report.failures()
    paths = {c.path for c in report.comparisons}
    assert {"unrolled kernel f64", "loop kernel f64", "loop kernel f32", "NumPy reference f64"} <= paths
    checked = {c.tensor for c in report.gradcheck.comparisons}  # finite differences: inputs and parameters
    assert {"dQ", "dK", "dV"} <= checked
    if name == "learned_bias":
        assert "dthrelbias" in checked and "dthrelbias" in {c.tensor for c in report.comparisons}


def test_the_ported_mods_say_what_the_sources_say(rng):
    """Each port against the formula of its source, written out in NumPy here."""
    S = rng.normal(size=(2, 8, 4, 5))  # (B, H, n_q, n_k)
    b, h = np.arange(2)[:, None, None, None], np.arange(8)[None, :, None, None]
    i, j = np.arange(4)[:, None], np.arange(5)[None, :]
    alibi = gallery.generate_alibi_bias(8)
    np.testing.assert_allclose(alibi(S, b, h, i, j), S + (j - i) * np.exp2(-((h + 1) * 8.0 / 8)))
    traced = gallery.score_mod(alibi)
    np.testing.assert_allclose(reference.modded(S, traced), S + (j - i) * 2.0 ** (-(h + 1.0)), rtol=1e-15)
    soft = gallery.score_mod(gallery.generate_tanh_softcap(20))
    np.testing.assert_allclose(reference.modded(S * 100, soft), 20 * np.tanh(S * 100 / 20), rtol=1e-15)
    window = gallery.generate_sliding_window(2)
    assert [window.visible(5, kv) for kv in range(7)] == [False, False, False, True, True, True, False]
    prefix = gallery.generate_prefix_lm_mask(2)
    assert [prefix.visible(0, kv) for kv in range(4)] == [True, True, False, False]
    i, j = np.arange(12)[:, None], np.arange(12)[None, :]
    dilated = masks.mask_of(gallery.generate_dilated_sliding_window(4, 2))
    np.testing.assert_array_equal(_grid(dilated, 12), (abs(i - j) <= 4) & (abs(i - j) % 2 == 0))
    natten = masks.mask_of(gallery.generate_natten(4, 3, 3, 1))  # canvas 4 x 3, kernel 3 x 1
    cx, cy = np.clip(i // 4, 1, 2), np.clip(i % 4, 0, 2)  # as attn_gym: x = idx // w, y = idx % w
    np.testing.assert_array_equal(_grid(natten, 12), (abs(cx - j // 4) <= 1) & (abs(cy - j % 4) <= 0))


def _grid(mask, n: int) -> np.ndarray:
    return np.array([[mask.visible(i, j) for j in range(n)] for i in range(n)])


@pytest.mark.parametrize("name, mask_mod", [
    ("dilated_sliding_window", lambda: gallery.generate_dilated_sliding_window(5, 3)),
    ("natten", lambda: gallery.generate_natten(8, 6, 3, 5)),
    # SymPy rewrites these with fractions (i/5 - j/5 >= -1, 2j/3 <= i/2): compared as integers once cleared
    ("floor comparison", lambda: lambda b, h, q_idx, kv_idx: ((q_idx - kv_idx) // 5 >= -1) & (kv_idx // 4 <= 9)),
    ("true division", lambda: lambda b, h, q_idx, kv_idx: 2 * kv_idx / 3 <= q_idx / 2),
    ("fraction inside min", lambda: lambda b, h, q_idx, kv_idx: ops.minimum(q_idx / 2, 20) >= kv_idx),
])
def test_index_arithmetic_masks_run_on_every_kernel_path(rng, monkeypatch, name, mask_mod):
    """Masks with integer division and remainder (NATTEN's idx // w, idx % w) print as integer arithmetic in the
    kernels, in the per-row key span too (it once printed float casts of an array not in scope there), and
    comparisons SymPy rewrote with fractions compare integers: the loop and tile kernels, forward and backward,
    agree with the NumPy reference at n = 48."""
    q, k, v, dO = (rng.standard_normal((2, 48, 4)) for _ in range(4))
    mod = mask_mod()
    want, grads = reference.attention(q, k, v, mask_mod=mod), reference.gradients(q, k, v, dO, mask_mod=mod)
    want_grads = grads["q"], grads["k"], grads["v"]
    for small in (1 << 62, 0):  # the serial loop kernels, then the tile kernels
        monkeypatch.setattr(kernels, "SMALL", small)
        np.testing.assert_allclose(symattn.attention(q, k, v, mask_mod=mod), want, rtol=1e-12, atol=1e-12)
        for got, w in zip(symattn.attention_backward(q, k, v, dO, mask_mod=mod), want_grads):
            np.testing.assert_allclose(got, w, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not hasattr(gallery.masks, "document"), reason="symattn.masks.document not there yet")
def test_the_document_mask_keeps_documents_apart(rng):
    ids = [0, 0, 1, 1, 1]
    mask = gallery.generate_doc_mask(ids)
    visible = np.array([[mask.visible(i, j) for j in range(5)] for i in range(5)])
    expected = (np.equal.outer(ids, ids)) & np.tril(np.ones((5, 5), bool))
    np.testing.assert_array_equal(visible, expected)
    q, k, v = rng.normal(size=(3, 5, 2)), rng.normal(size=(3, 5, 2)), rng.normal(size=(3, 5, 2))
    np.testing.assert_allclose(reference.attention(q, k, v, mask_mod=mask), reference.attention(q, k, v, mask=expected))
