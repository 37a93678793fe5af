"""The dot-product kernels for score mods and index masks (kernels.variant_forward / variant_backward): rendered
per (mod, mask) from the derivation, checked against the NumPy reference (the visible array built from
Mask.mod), finite differences for the relative-bias table, determinism, masked tiles and input errors."""
import numpy as np
import pytest

from symattn.errors import InputError, SpecError
from symattn.numeric import kernel_cache, kernels, reference
from symattn.symbolic import masks as M
from symattn.symbolic import mods

IDS = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 4, 5],
                [0] * 5 + [1] * 13])  # (2, 18): packed sequences per batch index b
MASKS = {"causal": M.causal, "window": M.sliding_window(3), "prefix": M.prefix_lm(4), "document": M.document(IDS),
         "key_padding": M.key_padding(np.array([11, 4])),
         "and_or": M.or_masks(M.and_masks(M.sliding_window(2), M.key_padding(np.array([9, 13]))), M.prefix_lm(2))}
MODS = {"alibi": mods.alibi(), "softcap": mods.softcap(2), "relative_bias": mods.relative_bias(3)}
PAIRS = [("alibi", "causal"), ("softcap", "window"), ("relative_bias", "prefix"), ("alibi", "document"),
         ("softcap", "key_padding"), ("relative_bias", "and_or")]  # every mask, every mod twice


def _params(mod, dtype):
    return {"B_rel": np.linspace(-1.0, 1.5, 7).astype(dtype)} if mod.kind == "relative-bias" else None


def _problem(B, n, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    Q, K, V, dO = (rng.standard_normal((B, n, d)).astype(dtype) for _ in range(4))
    batch = np.repeat(np.arange(B)[:, None], 4, axis=1).astype(np.int64)  # (B, 4): unbroadcast
    bh = np.stack([np.arange(B), np.zeros(B, dtype=int)], axis=1).astype(np.int64)  # (B, 2): b = z, h = 0
    return Q, K, V, dO, batch, bh


def _kernels(mod, mask, Q, K, V, dO, batch, bh, params, masked_rows="zero"):
    B, n_q, d_v = batch.shape[0], Q.shape[1], V.shape[2]
    bias = np.zeros((0, 0, 0), Q.dtype)
    scale, code = 1 / np.sqrt(Q.shape[2]), kernels.MASKED_ROWS[masked_rows]
    O, LSE = np.empty((B, n_q, d_v), Q.dtype), np.empty((B, n_q), Q.dtype)
    kernels.variant_forward(Q, K, V, bias, batch, bh, scale, code, mod, mask, params, O, LSE)
    dQ, dK, dV = np.empty_like(Q), np.empty_like(K), np.empty_like(V)
    grads = kernels.variant_backward(Q, K, V, bias, batch, bh, scale, code, mod, mask, params, O, LSE, dO, dQ, dK,
                                     dV)
    return {"O": O, "q": dQ, "k": dK, "v": dV, **grads}


def _visible(mask, B, n) -> np.ndarray:
    """(B, n, n) boolean: Mask.mod on integers, per batch index b."""
    return np.array([[[bool(mask.mod(b, 0, i, j)) for j in range(n)] for i in range(n)] for b in range(B)])


def _reference(mod, mask, Q, K, V, dO, params, masked_rows="zero"):
    Q, K, V, dO = (x.astype(np.float64) for x in (Q, K, V, dO))
    params = None if params is None else {k: v.astype(np.float64) for k, v in params.items()}
    visible = _visible(mask, Q.shape[0], Q.shape[1])
    options = dict(mask=visible, score_mod=mod, params=params, masked_rows=masked_rows)
    return {"O": reference.attention(Q, K, V, **options), **reference.gradients(Q, K, V, dO, **options)}


def _check(mod_name, mask_name, B=2, n=18, d=3, dtype=np.float64, tol=1e-10, masked_rows="zero"):
    mod, mask = MODS[mod_name], MASKS[mask_name]
    Q, K, V, dO, batch, bh = _problem(B, n, d, dtype)
    params = _params(mod, dtype)
    got = _kernels(mod, mask, Q, K, V, dO, batch, bh, params, masked_rows)
    want = _reference(mod, mask, Q, K, V, dO, params, masked_rows)
    assert set(got) == {"O", "q", "k", "v"} | set(params or ())
    for key, value in got.items():
        np.testing.assert_allclose(value, want[key], rtol=tol, atol=tol, err_msg=f"{mod_name} x {mask_name}: {key}")


@pytest.mark.parametrize("mod_name, mask_name", PAIRS)
def test_each_mask_and_mod_match_the_reference(mod_name, mask_name):
    _check(mod_name, mask_name)


@pytest.mark.slow
@pytest.mark.parametrize("mod_name, mask_name", [(m, k) for m in MODS for k in MASKS if (m, k) not in PAIRS])
def test_every_mod_and_mask_match_the_reference(mod_name, mask_name):
    _check(mod_name, mask_name)


def test_tile_kernels_cross_tile_boundaries_float64():
    """n = 300 > the 128/256 tiles: partial tiles, window tiles skipped, a key-padding cut mid-tile."""
    MASKS["tiles"] = M.and_masks(M.sliding_window(150), M.key_padding(np.array([290])))
    try:
        _check("relative_bias", "tiles", B=1, n=300, d=8)  # 1 * 300 * 300 entries: the tile kernels
    finally:
        del MASKS["tiles"]


def test_tile_kernels_float32():
    MASKS["tiles32"] = M.sliding_window(100)
    try:
        _check("softcap", "tiles32", B=1, n=260, d=8, dtype=np.float32, tol=2e-4)
    finally:
        del MASKS["tiles32"]


def test_fully_masked_rows_follow_the_policy():
    """key_padding(0) masks every key of b = 1: uniform weights there, and no gradient through the scores."""
    MASKS["empty"] = M.key_padding(np.array([5, 0]))
    try:
        _check("relative_bias", "empty", masked_rows="uniform")
    finally:
        del MASKS["empty"]


@pytest.mark.parametrize("B, n", [(2, 12), (1, 300)])  # loop kernels; tile kernels with per-task partials
def test_relative_bias_gradient_is_finite_differences_and_deterministic(B, n):
    mod, mask = MODS["relative_bias"], M.sliding_window(40)
    Q, K, V, dO, batch, bh = _problem(B, n, 4, np.float64, seed=3)
    table = np.linspace(-0.5, 0.7, 7)
    first = _kernels(mod, mask, Q, K, V, dO, batch, bh, {"B_rel": table})
    second = _kernels(mod, mask, Q, K, V, dO, batch, bh, {"B_rel": table})
    assert first["B_rel"].shape == (7,) and np.array_equal(first["B_rel"], second["B_rel"])  # bit-identical
    eps, numeric = 1e-6, np.empty(7)
    for t in range(7):
        up, down = table.copy(), table.copy()
        up[t] += eps
        down[t] -= eps
        loss = [np.sum(dO * _kernels(mod, mask, Q, K, V, dO, batch, bh, {"B_rel": x})["O"]) for x in (up, down)]
        numeric[t] = (loss[0] - loss[1]) / (2 * eps)
    np.testing.assert_allclose(first["B_rel"], numeric, rtol=1e-6, atol=1e-7)


def test_bad_inputs_are_named():
    mod, mask = MODS["relative_bias"], MASKS["document"]
    Q, K, V, dO, batch, bh = _problem(2, 18, 3, np.float64)
    with pytest.raises(InputError, match="needs the parameter 'B_rel'"):
        _kernels(mod, mask, Q, K, V, dO, batch, bh, None)
    with pytest.raises(InputError, match=r"'B_rel' .* shape \(7,\), got \(5,\)"):
        _kernels(mod, mask, Q, K, V, dO, batch, bh, {"B_rel": np.zeros(5)})
    Q2, K2, V2, dO2, batch2, bh2 = _problem(2, 10, 3, np.float64)
    with pytest.raises(InputError, match="document mask: 18 ids for n_q=10"):
        _kernels(mods.alibi(), mask, Q2, K2, V2, dO2, batch2, bh2, None)
    with pytest.raises(InputError, match=r"lengths must lie in 0..n_k=10"):
        _kernels(mods.alibi(), M.key_padding(np.array([3, 11])), Q2, K2, V2, dO2, batch2, bh2, None)
    with pytest.raises(InputError, match="has 2 rows; give 1 or one per batch index b \\(3\\)"):
        _problem3 = _problem(3, 18, 3, np.float64)
        _kernels(mods.alibi(), mask, *_problem3, None)


def test_a_variant_module_is_rendered_once_and_checked_when_loaded(tmp_path, capsys):
    mod, mask = mods.alibi(), M.sliding_window(2)
    module = kernels.load_variant(mod, mask, folder=tmp_path)
    path = tmp_path / f"variant_{kernels.variant_tag(mod, mask)}.py"
    assert module.__file__ == str(path) and kernels.load_variant(mod, mask, folder=tmp_path) is module
    assert kernels.variant_tag(mod, M.document(IDS)) == kernels.variant_tag(mod, M.document(IDS[:, ::-1]))
    path.write_text(path.read_text().replace("(tiles outside are", "(tiles outside ARE"))  # a hand edit
    kernel_cache._VARIANTS.pop((tmp_path, kernels.variant_tag(mod, mask)))
    kernels.load_variant(mod, mask, folder=tmp_path)
    assert "was edited; regenerated" in capsys.readouterr().err
    assert "(tiles outside are" in path.read_text()


def test_run_time_masks_refuse_bad_data():
    with pytest.raises(SpecError, match="must hold integers"):
        M.document(np.array([0.0, 1.0]))
    with pytest.raises(SpecError, match=r"1 or 2 dimensions"):
        M.document(np.zeros((1, 2, 3), dtype=int))
    with pytest.raises(SpecError, match="every length must lie in 0..4, got 5"):
        M.key_padding([2, 5], n=4)
    with pytest.raises(SpecError, match="got -1"):
        M.key_padding([-1])
    with pytest.raises(SpecError, match="run-time arrays of one name"):
        M.and_masks(M.document([0, 1]), M.document([1, 1]))


def test_per_head_alibi_reads_h_from_bh():
    """alibi(heads=H): slope 2^(-8(h+1)/H) of head h = bh[z, 1]; the reference gets it as an additive bias."""
    if "heads" not in mods.alibi.__kwdefaults__:
        pytest.skip("alibi(heads=H) is not in symattn.mods yet")
    H, n = 4, 14
    mod, mask = mods.alibi(heads=H), M.causal
    Q, K, V, dO, batch, _ = _problem(H, n, 3, np.float64, seed=5)  # (B·H, n, d), b = 0
    bh = np.stack([np.zeros(H, dtype=int), np.arange(H)], axis=1).astype(np.int64)
    got = _kernels(mod, mask, Q, K, V, dO, batch, bh, None)
    slopes = 2.0 ** (-8.0 * (np.arange(H) + 1) / H)  # (H,)
    distance = np.arange(n)[None, :] - np.arange(n)[:, None]  # (n, n): j - i
    bias = np.where(distance <= 0, slopes[:, None, None] * distance, -np.inf)  # (H, n, n) alibi + causal
    want = reference.gradients(Q, K, V, dO, mask=bias)
    np.testing.assert_allclose(got["O"], reference.attention(Q, K, V, mask=bias), rtol=1e-10, atol=1e-10)
    for key in ("q", "k", "v"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-10)


def test_no_mod_with_causal_takes_the_flag_kernels():
    """mask_mod=causal and nothing else runs today's causal kernels (the same numbers, no variant rendered)."""
    mask = M.causal
    Q, K, V, dO, batch, bh = _problem(2, 9, 3, np.float64)
    got = _kernels(None, mask, Q, K, V, dO, batch, bh, None)
    want = _reference(None, mask, Q, K, V, dO, None)
    for key in ("O", "q", "k", "v"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-12)


def test_a_cached_variant_runs_without_sympy(tmp_path):
    """Rendering needs SymPy; a process that finds the rendered module in the cache only loads it."""
    import os
    import subprocess
    import sys
    mod, mask = mods.alibi(), M.and_masks(M.causal, M.key_padding([3]))
    kernel_cache._fingerprint.cache_clear()  # the cache folder of the source as it is now, as the child sees it
    kernels.load_variant(mod, mask, folder=kernels.cache_dir())  # rendered here (SymPy is loaded anyway)
    script = ("import sys, numpy as np\n"
              "from symattn.numeric import kernels\n"
              "from symattn.symbolic import masks, mods\n"
              "Q = np.random.default_rng(0).standard_normal((1, 5, 2))\n"
              "O, LSE = np.empty((1, 5, 2)), np.empty((1, 5))\n"
              "kernels.variant_forward(Q, Q, Q, np.zeros((0, 0, 0)), np.zeros((1, 4), np.int64), "
              "np.zeros((1, 2), np.int64), 0.5, 0, mods.alibi(), masks.and_masks(masks.causal, "
              "masks.key_padding([3])), None, O, LSE)\n"
              "assert np.isfinite(O).all() and 'sympy' not in sys.modules, sorted(sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-2000:]


def test_an_additive_bias_adds_after_the_mod():
    """The old mask= array (bias (Bm, n_q, n_k)) still adds to the modded scores, with the mask on top."""
    mod, mask = MODS["alibi"], MASKS["causal"]
    Q, K, V, dO, batch, bh = _problem(2, 18, 3, np.float64, seed=7)
    bias = np.random.default_rng(8).standard_normal((1, 18, 18))
    batch[:, 3] = 0  # one bias for both batch elements
    O, LSE = np.empty_like(Q), np.empty((2, 18))
    kernels.variant_forward(Q, K, V, bias, batch, bh, 1 / np.sqrt(3), 0, mod, mask, None, O, LSE)
    dQ, dK, dV = np.empty_like(Q), np.empty_like(K), np.empty_like(V)
    kernels.variant_backward(Q, K, V, bias, batch, bh, 1 / np.sqrt(3), 0, mod, mask, None, O, LSE, dO, dQ, dK, dV)
    additive = np.where(_visible(mask, 2, 18), bias, -np.inf)  # (2, n, n)
    want = reference.gradients(Q, K, V, dO, mask=additive, score_mod=mod)
    np.testing.assert_allclose(O, reference.attention(Q, K, V, mask=additive, score_mod=mod), rtol=1e-10, atol=1e-10)
    for got, key in ((dQ, "q"), (dK, "k"), (dV, "v")):
        np.testing.assert_allclose(got, want[key], rtol=1e-10, atol=1e-10)
