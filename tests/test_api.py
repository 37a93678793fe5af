"""The numeric API: PyTorch semantics, broadcasting, masks, fully masked rows, errors that name the argument."""
import numpy as np
import pytest

import symattn
from symattn import reference
from symattn.numeric import kernels

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=2e-4, atol=2e-5)}


def _data(rng, shapes, dtype=np.float64):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_reference_with_broadcasting(rng, dtype):
    q, k, v, dO = _data(rng, [(2, 3, 5, 4), (3, 7, 4), (1, 3, 7, 6), (2, 3, 5, 6)], dtype)
    out = symattn.attention(q, k, v)
    assert out.shape == (2, 3, 5, 6) and out.dtype == dtype
    np.testing.assert_allclose(out, reference.attention(q, k, v), **TOL[dtype])
    grads = symattn.attention_backward(q, k, v, dO)
    for g, x, want in zip(grads, (q, k, v), reference.attention_backward(q, k, v, dO)):
        assert g.shape == x.shape and g.dtype == dtype
        np.testing.assert_allclose(g, want, **TOL[dtype])


def test_non_contiguous_inputs(rng):
    q, k, v = _data(rng, [(4, 6, 2), (4, 8, 2), (4, 8, 3)])
    qt = np.asfortranarray(q)
    ks = np.repeat(k, 2, axis=0)[::2]
    vt = np.swapaxes(np.swapaxes(v, 1, 2).copy(), 1, 2)
    assert not vt.flags.c_contiguous
    np.testing.assert_allclose(symattn.attention(qt, ks, vt), reference.attention(q, k, v), rtol=1e-12)


@pytest.mark.parametrize("n_q, n_k", [(5, 3), (3, 5)])
def test_causal_is_top_left_aligned(rng, n_q, n_k):
    q, k, v = _data(rng, [(n_q, 4), (n_k, 4), (n_k, 2)])
    P = symattn.attention_weights(q, k, is_causal=True)
    assert np.all(P[np.triu_indices(n_q, 1, n_k)] == 0)
    np.testing.assert_allclose(P.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(symattn.attention(q, k, v, is_causal=True),
                               reference.attention(q, k, v, is_causal=True), rtol=1e-12, atol=1e-14)


def test_boolean_and_float_masks(rng):
    q, k, v, dO = _data(rng, [(2, 4, 3), (2, 6, 3), (2, 6, 2), (2, 4, 2)])
    keep = rng.random((4, 6)) > 0.4
    bias = rng.standard_normal((2, 1, 6))
    for mask in (keep, bias, np.where(keep, 0.0, -np.inf)):
        np.testing.assert_allclose(symattn.attention(q, k, v, mask=mask), reference.attention(q, k, v, mask=mask),
                                   rtol=1e-12, atol=1e-14)
        for got, want in zip(symattn.attention_backward(q, k, v, dO, mask=mask),
                             reference.attention_backward(q, k, v, dO, mask=mask)):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    P = symattn.attention_weights(q, k, mask=keep)
    assert np.all(P[:, ~keep] == 0)


@pytest.mark.parametrize("policy", ["zero", "uniform", "nan"])
def test_fully_masked_rows(rng, policy):
    q, k, v, dO = _data(rng, [(4, 3), (5, 3), (5, 2), (4, 2)])
    mask = np.ones((4, 5), dtype=bool)
    mask[2] = False
    out = symattn.attention(q, k, v, mask=mask, masked_rows=policy)
    grads = symattn.attention_backward(q, k, v, dO, mask=mask, masked_rows=policy)
    want = reference.attention(q, k, v, mask=mask, masked_rows=policy)
    want_grads = reference.attention_backward(q, k, v, dO, mask=mask, masked_rows=policy)
    for got, expected in zip((out, *grads), (want, *want_grads)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(expected), rtol=1e-10, atol=1e-12)
    if policy == "zero":  # PyTorch: output 0 and no gradient through the row
        assert np.all(out[2] == 0) and np.all(grads[0][2] == 0)
    if policy == "uniform":
        np.testing.assert_allclose(out[2], v.mean(axis=0), rtol=1e-12)
    if policy == "nan":
        assert np.all(np.isnan(out[2])) and not np.isnan(out[[0, 1, 3]]).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_stay_finite(rng, dtype):
    q, k, v, dO = _data(rng, [(3, 6, 8), (3, 9, 8), (3, 9, 4), (3, 6, 4)], dtype)
    q = (q * 1e4).astype(dtype)
    out = symattn.attention(q, k, v)
    grads = symattn.attention_backward(q, k, v, dO)
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
    np.testing.assert_allclose(out, reference.attention(q.astype(np.float64), k, v), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_propagates_like_numpy(rng, where):
    q, k, v, dO = _data(rng, [(3, 2), (4, 2), (4, 2), (3, 2)])
    {"q": q, "k": k, "v": v}[where][1, 0] = np.nan
    out, want = symattn.attention(q, k, v), reference.attention(q, k, v)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    assert np.isnan(out).any() and not np.isnan(out).all() or where == "k"
    for got, expected in zip(symattn.attention_backward(q, k, v, dO), reference.attention_backward(q, k, v, dO)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))


def test_a_positive_infinite_mask_entry_makes_its_row_nan(rng):
    """An additive mask entry of +inf gives the score +inf and the row NaN (inf - inf), as in PyTorch's SDPA; only
    -inf masks. The reference once took +inf for masked (weight 0) and disagreed with the kernels."""
    q, k, v = _data(rng, [(2, 2), (3, 2), (3, 2)])
    mask = np.zeros((2, 3))
    mask[0, 1] = np.inf
    out, want = symattn.attention(q, k, v, mask=mask), reference.attention(q, k, v, mask=mask)
    assert np.isnan(out[0]).all() and np.isnan(want[0]).all()
    np.testing.assert_allclose(out[1], want[1], rtol=1e-12)


def test_a_masked_array_with_masked_entries_is_refused(rng):
    """np.asarray drops a masked array's mask: its masked entries would count as data, silently."""
    q = np.ma.masked_array(rng.standard_normal((3, 2)), mask=[[0, 0], [1, 0], [0, 0]])
    with pytest.raises(symattn.InputError, match="q is a masked array with masked entries"):
        symattn.attention(q, q.data, q.data)
    np.testing.assert_allclose(symattn.attention(np.ma.masked_array(q.data), q.data, q.data),
                               reference.attention(q.data, q.data, q.data), rtol=1e-12)  # nothing masked: fine


@pytest.mark.parametrize("policy", ["zero", "uniform", "nan"])
def test_scores_that_are_all_minus_infinity_make_a_nan_row_whatever_the_policy(rng, monkeypatch, policy):
    """Scores of -inf from the data (q_i . k_j overflowing) on every visible key: softmax is 0/0, NaN as in NumPy.
    masked_rows is for rows the mask leaves without a key; the plain kernels once took such rows for masked (0 or
    the mean of V), while an all-True mask gave NaN. Serial and tile kernels, plain and masked."""
    q, k, v = rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 4, 2)), rng.standard_normal((2, 4, 2))
    q[0, 1] = [-1e200, -1e200]
    k[0] = np.abs(k[0]) * 1e200 + 1.0  # row (0, 1): every score -inf
    for small in (1 << 62, 0):
        monkeypatch.setattr(kernels, "SMALL", small)
        for options in ({}, {"mask": np.ones((3, 4), bool)}, {"is_causal": True}):
            out = symattn.attention(q, k, v, masked_rows=policy, **options)
            want = reference.attention(q, k, v, masked_rows=policy, **options)
            assert np.isnan(out[0, 1]).all() and not np.isnan(np.delete(out.reshape(-1, 2), 1, 0)).any()
            np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)


def test_empty_query_batch():
    q, k, v = np.zeros((0, 3)), np.ones((2, 3)), np.ones((2, 4))
    assert symattn.attention(q, k, v).shape == (0, 4)


@pytest.mark.parametrize("call, message", [
    (lambda q, k, v: symattn.attention(q, k[:, :2], v), "same last dim d_k"),
    (lambda q, k, v: symattn.attention(q, k, v[:3]), "same number of keys"),
    (lambda q, k, v: symattn.attention(q.astype(int), k, v), "q must be a float32 or float64"),
    (lambda q, k, v: symattn.attention(q, k.astype(np.float16), v), "k has dtype float16"),
    (lambda q, k, v: symattn.attention(q, k.astype(np.float32), v), "share one dtype"),
    (lambda q, k, v: symattn.attention(q[0], k, v), "q must have shape"),
    (lambda q, k, v: symattn.attention(q, k, v, mask=np.ones((3, 3), bool)), "mask of shape (3, 3)"),
    (lambda q, k, v: symattn.attention(q, k, v, mask=np.ones((4, 5), int)), "mask must be boolean"),
    (lambda q, k, v: symattn.attention(q, k, v, scale=-1.0), "scale must be a positive"),
    (lambda q, k, v: symattn.attention(q, k, v, masked_rows="drop"), "masked_rows must be one of"),
    (lambda q, k, v: symattn.attention(q[None].repeat(2, 0), k[None].repeat(3, 0), v), "do not broadcast"),
    (lambda q, k, v: symattn.attention_backward(q, k, v, np.ones((4, 3))), "dO must have the output's shape"),
    (lambda q, k, v: symattn.attention_backward(q, k, v, np.ones((4, 2), np.float32)), "dO must have the dtype"),
    # extra batch dims in dO are refused, as torch.autograd.grad refuses a gradient of another shape (they were
    # broadcast against the output and summed away)
    (lambda q, k, v: symattn.attention_backward(q, k, v, np.ones((3, 4, 2))), "dO must have the output's shape (4, 2)"),
])
def test_bad_input_names_the_argument(rng, call, message):
    q, k, v = _data(rng, [(4, 3), (5, 3), (5, 2)])
    with pytest.raises(symattn.InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(q, k, v)
