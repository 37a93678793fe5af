"""The multi-head layer: spec, derivation and proofs, numeric API, generated kernels, verification, CLI."""
import dataclasses
import shutil
import subprocess

import numpy as np
import pytest

import symattn
from symattn import MultiHeadSpec, SpecError, reference
from symattn.numeric import kernels
from symattn.app.cli import main
from symattn.codegen import render
from conftest import evaluate_steps

SPECS = [MultiHeadSpec(3, 4, 2, kv_heads=1), MultiHeadSpec(3, 4, 2, kv_heads=2),
         MultiHeadSpec(3, 4, 2, kv_heads=1, bias=True, mask="causal"),
         MultiHeadSpec(2, 4, 2, n_k=3, cross=True, bias=True)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_q=3, d_model=6, heads=4), r"d_model \(6\) is not divisible by heads \(4\)"),
    (dict(n_q=3, d_model=4, heads=2, kv_heads=3), r"kv_heads must divide heads \(2\)"),
    (dict(n_q=3, d_model=4, heads=2, n_k=5), "use cross=True"),
    (dict(n_q=3, d_model=4, heads=0), r"MultiHeadSpec\.heads must be a positive integer"),
    (dict(n_q=3, d_model=4, heads=2, mask="diag"), r"MultiHeadSpec\.mask: unknown mask 'diag'"),
])
def test_spec_errors_name_the_field(kwargs, message):
    with pytest.raises(SpecError, match=message):
        MultiHeadSpec(**kwargs)


def test_spec_defaults_and_names():
    spec = MultiHeadSpec(3, 8, 4, kv_heads=2)
    assert (spec.d_k, spec.d_v, spec.n_k) == (2, 2, 3)
    assert [spec.group(h) for h in range(4)] == [0, 0, 1, 1]
    assert spec.name == "mha_q3_dm8_h4_kv2_dk2_dv2" and "--kv-heads 2" in spec.cli_args()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_layer_proofs_pass(spec):
    d = symattn.derive_multihead(spec)
    assert d.proved, [p.failure for p in d.proofs if not p.passed]
    gradients = {p.step for p in d.proofs if p.kind == "gradient"}
    expected = {"dWq", "dWk", "dWv", "dWo", "dX"} | ({"dY"} if spec.cross else set()) | (
        {"dbq", "dbk", "dbv", "dbo"} if spec.bias else set())
    assert gradients == expected
    assert {p.step for p in d.proofs if p.kind == "indexed"} >= {"concat", "dKp", "h1.softmax", "h0.dS"}


def test_a_wrong_layer_gradient_fails():
    spec = MultiHeadSpec(3, 4, 2, kv_heads=1)
    d = symattn.derive_multihead(spec, prove=False)
    dx = d.step("dX")
    broken = dataclasses.replace(dx, explicit=dx.explicit * 2)  # a factor 2 too many
    d = dataclasses.replace(d, steps=tuple(broken if s.key == "dX" else s for s in d.steps))
    failed = {(p.kind, p.step) for p in symattn.prove(d).proofs if not p.passed}
    assert ("gradient", "dX") in failed and ("gradient", "dWq") not in failed


def _layer_inputs(spec, rng, dtype=np.float64, batch=()):
    s = spec.sizes
    x = rng.standard_normal(batch + (spec.n_q, spec.d_model)).astype(dtype)
    y = rng.standard_normal(batch + (spec.n_k, spec.d_model)).astype(dtype) if spec.cross else None
    w = [rng.standard_normal(shape).astype(dtype) for shape in ((spec.d_model, s["hd_k"]), (spec.d_model, s["gd_k"]),
                                                                (spec.d_model, s["gd_v"]), (s["hd_v"], spec.d_model))]
    b = {n: rng.standard_normal(k).astype(dtype) for n, k in
         (("b_q", s["hd_k"]), ("b_k", s["gd_k"]), ("b_v", s["gd_v"]), ("b_o", spec.d_model))} if spec.bias else {}
    return x, y, w, b


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_layer_step_matches_numeric_evaluation(spec, rng):
    d = symattn.derive_multihead(spec, prove=False)
    x, y, w, b = _layer_inputs(spec, rng)
    dOut = rng.standard_normal((spec.n_q, spec.d_model))
    inputs = {"X": x, "Wq": w[0], "Wk": w[1], "Wv": w[2], "Wo": w[3], "dOut": dOut}
    inputs.update({"Yin": y} if spec.cross else {})
    inputs.update({"bq": b["b_q"], "bk": b["b_k"], "bv": b["b_v"], "bo": b["b_o"]} if spec.bias else {})
    steps = evaluate_steps(d, inputs)
    kw = dict(heads=spec.heads, kv_heads=spec.kv_heads, y=y, is_causal=spec.causal, **b)
    np.testing.assert_allclose(steps["project_out"], reference.multihead_attention(x, *w, **kw), rtol=1e-10)
    grads = reference.multihead_attention_backward(x, *w, dOut, **kw)
    names = {"dX": "x", "dY": "y", "dWq": "w_q", "dWk": "w_k", "dWv": "w_v", "dWo": "w_o", "dbq": "b_q",
             "dbk": "b_k", "dbv": "b_v", "dbo": "b_o"}
    for key, arg in names.items():
        if arg in grads:
            np.testing.assert_allclose(steps[key], grads[arg], rtol=1e-9, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(steps["dbk"] if spec.bias else 0.0, 0.0, atol=1e-12)  # softmax ignores a key bias


@pytest.mark.parametrize("tiles", [True, False], ids=["blas-tiles", "loop-kernels"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("policy", ["zero", "uniform", "nan"])
def test_numeric_layer_matches_reference(rng, monkeypatch, tiles, dtype, policy):
    monkeypatch.setattr(kernels, "SMALL", 0 if tiles else 1 << 62)  # both kernel families at this small size
    spec = MultiHeadSpec(5, 8, 4, kv_heads=2, bias=True)
    x, _, w, b = _layer_inputs(spec, rng, dtype, batch=(2,))
    mask = rng.random((5, 5)) > 0.3
    mask[2] = False
    kw = dict(heads=4, kv_heads=2, mask=mask, is_causal=True, masked_rows=policy, **b)
    out = symattn.multihead_attention(x, *w, **kw)
    want = reference.multihead_attention(x, *w, **kw)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_allclose(np.nan_to_num(out), np.nan_to_num(want), **tol)
    d_out = rng.standard_normal(out.shape).astype(dtype)
    got = symattn.multihead_attention_backward(x, *w, d_out, **kw)
    expected = reference.multihead_attention_backward(x, *w, d_out, **kw)
    assert set(got) == set(expected) == {"x", "w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o"}
    for name in got:
        assert got[name].shape == expected[name].shape and got[name].dtype == dtype
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(expected[name]))
        np.testing.assert_allclose(np.nan_to_num(got[name]), np.nan_to_num(expected[name]), **tol, err_msg=name)


def test_cross_attention_with_broadcast_batches(rng):
    spec = MultiHeadSpec(3, 6, 3, n_k=4, cross=True, kv_heads=1)
    x, y, w, _ = _layer_inputs(spec, rng, batch=(2, 1))
    y = np.broadcast_to(y, (2, 3, 4, 6)).copy()[0]  # y (3, 4, 6) broadcasts against x (2, 1, 3, 6)
    kw = dict(heads=3, kv_heads=1, y=y)
    np.testing.assert_allclose(symattn.multihead_attention(x, *w, **kw), reference.multihead_attention(x, *w, **kw),
                               rtol=1e-10)
    d_out = rng.standard_normal((2, 3, 3, 6))
    got = symattn.multihead_attention_backward(x, *w, d_out, **kw)
    for name, value in reference.multihead_attention_backward(x, *w, d_out, **kw).items():
        assert got[name].shape == value.shape
        np.testing.assert_allclose(got[name], value, rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("change, message", [
    (dict(w_q=np.ones((8, 7))), r"w_q must have shape \(d_model, heads·d_k\) = \(8, 4·d_k\), got \(8, 7\)"),
    (dict(w_k=np.ones((8, 6))), r"w_k must have shape \(d_model, kv_heads·d_k\) = \(8, 4\), got \(8, 6\)"),
    (dict(w_v=np.ones((7, 4))), r"w_v must have shape \(d_model, kv_heads·d_v\)"),
    (dict(w_o=np.ones((8, 7))), r"w_o must have shape \(heads·d_v, d_model\) = \(8, 8\)"),
    (dict(b_q=np.ones(3)), r"b_q must have shape \(8,\), got \(3,\)"),
    (dict(kv_heads=3), "kv_heads must be a positive integer dividing heads"),
    (dict(heads=0), "heads must be a positive integer"),
    (dict(w_o=np.ones((8, 8), np.float32)), "must share one dtype"),
    (dict(masked_rows="drop"), "masked_rows must be one of"),
])
def test_layer_errors_name_the_argument_and_expected_shape(rng, change, message):
    args = dict(x=rng.standard_normal((5, 8)), w_q=np.ones((8, 8)), w_k=np.ones((8, 4)), w_v=np.ones((8, 4)),
                w_o=np.ones((8, 8)), heads=4, kv_heads=2)
    args.update(change)
    with pytest.raises(symattn.InputError, match=message):
        symattn.multihead_attention(args.pop("x"), args.pop("w_q"), args.pop("w_k"), args.pop("w_v"),
                                    args.pop("w_o"), **args)


def test_backward_checks_d_out(rng):
    x, w = rng.standard_normal((5, 8)), [np.ones((8, 8)), np.ones((8, 8)), np.ones((8, 8)), np.ones((8, 8))]
    with pytest.raises(symattn.InputError, match=r"d_out must have the output's shape \(5, 8\)"):
        symattn.multihead_attention_backward(x, *w, np.ones((5, 4)), heads=2)


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[3]], ids=lambda s: s.name)
def test_layer_verifies_four_ways(spec):
    report = symattn.verify_multihead(spec)
    assert report.passed, str(report)
    assert {c.path for c in report.comparisons} == {"unrolled kernel f64", "loop kernel f64", "loop kernel f32",
                                                    "NumPy reference f64"}
    assert "dWq" in {c.tensor for c in report.gradcheck.comparisons}


def test_generated_layer_file_layout():
    text = render(SPECS[2])[f"{SPECS[2].name}.py"]
    assert "do not edit" in text and f"symattn generate {SPECS[2].cli_args()} -o generated/" in text
    assert text.count("@numba.njit(cache=True") == 2 and "for z in range(X.shape[0]):" in text
    assert "dWq[...] = 0.0" in text and "dX[z, 0, 0] = " in text  # weights accumulate over the batch


def test_cli_layer_derive_verify_generate(tmp_path, capsys):
    tex = tmp_path / "layer.tex"
    argv = ["--n-q", "3", "--d-model", "4", "--heads", "2", "--kv-heads", "1"]
    assert main(["derive", *argv, "--format", "tex", "-o", str(tex), "-q"]) == 0
    assert "Head 1: Softmax normalisation" in tex.read_text()
    if shutil.which("pdflatex"):
        run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name], cwd=tmp_path,
                             capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stdout[-2000:]
    assert main(["verify", *argv, "--cross", "--n-k", "2", "-q"]) == 0
    assert "all paths agree" in capsys.readouterr().out
    assert main(["generate", *argv, "-o", str(tmp_path / "k"), "-q"]) == 0
    assert (tmp_path / "k" / "mha_q3_dm4_h2_kv1_dk2_dv2.py").exists()


def test_one_pool_layer_forward_matches_the_reference_and_gives_blas_its_threads_back(rng, monkeypatch):
    """The plain layer forward runs its projections as Numba tiles (numeric/projections.py) under a hold of BLAS
    at one thread that nests the attention kernels' own hold: results equal the reference (GQA, cross-attention,
    biases, causal) and every BLAS library has its thread count back afterwards."""
    from symattn.numeric import kernels, layer, projections
    calls = []
    monkeypatch.setattr(projections, "merge_project", lambda *a, f=projections.merge_project: (calls.append(1), f(*a)))
    before = [lib.get_num_threads() for lib in kernels.one_blas_thread.libs()]
    x, y = rng.standard_normal((2, 6, 8)), rng.standard_normal((2, 9, 8))
    w = [rng.standard_normal(s) for s in ((8, 8), (8, 4), (8, 4), (8, 8))]
    b = dict(b_q=rng.standard_normal(8), b_k=rng.standard_normal(4), b_v=rng.standard_normal(4), b_o=rng.standard_normal(8))
    got = layer.multihead_attention(x, *w, heads=4, kv_heads=2, y=y, is_causal=True, **b)
    want = reference.multihead_attention(x, *w, heads=4, kv_heads=2, y=y, is_causal=True, **b)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert calls  # the one-pool path ran
    assert [lib.get_num_threads() for lib in kernels.one_blas_thread.libs()] == before


@pytest.mark.parametrize("tiles", [True, False], ids=["blas-tiles", "loop-kernels"])
@pytest.mark.parametrize("case", ["self-gqa-bias-causal", "cross-bias", "2d-x-dv", "batch-of-one-mqa"])
def test_one_pool_layer_backward_matches_the_reference(rng, monkeypatch, tiles, case):
    """The plain layer's vjp runs forward and backward in one thread pool (numeric/one_pool.py): dO into the
    heads, the attention backward, dx (dy) as one product of the concatenated dQ, dK, dV, weight gradients as
    per-head batch sums. Every gradient equals the reference's (float64 and float32), repeated calls give
    bitwise the same gradients (the parameter sums have a fixed order), and BLAS gets its threads back."""
    from symattn.numeric import layer, one_pool
    monkeypatch.setattr(kernels, "SMALL", 0 if tiles else 1 << 62)
    ran = []
    monkeypatch.setattr(one_pool, "backward", lambda *a, f=one_pool.backward: (ran.append(1), f(*a))[1])
    H, G, d_model, d_v, batch, n_q, n_k, bias, causal = {
        "self-gqa-bias-causal": (4, 2, 8, 2, (3,), 7, 7, True, True),
        "cross-bias": (2, 2, 6, 3, (2,), 5, 9, True, False),
        "2d-x-dv": (3, 3, 6, 4, (), 6, 6, False, True),
        "batch-of-one-mqa": (4, 1, 8, 2, (1,), 10, 10, False, False)}[case]
    d_k = d_model // H
    before = [lib.get_num_threads() for lib in kernels.one_blas_thread.libs()]
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 2e-4)):
        x = rng.standard_normal(batch + (n_q, d_model)).astype(dtype)
        y = rng.standard_normal(batch + (n_k, d_model)).astype(dtype) if case.startswith("cross") else None
        w = [(rng.standard_normal(s) / 2).astype(dtype) for s in
             ((d_model, H * d_k), (d_model, G * d_k), (d_model, G * d_v), (H * d_v, d_model))]
        b = {} if not bias else {name: rng.standard_normal(width).astype(dtype) for name, width in
                                 (("b_q", H * d_k), ("b_k", G * d_k), ("b_v", G * d_v), ("b_o", d_model))}
        kw = dict(heads=H, kv_heads=G, y=y, is_causal=causal, **b)
        out, pullback = layer.multihead_attention_vjp(x, *w, **kw)
        np.testing.assert_allclose(out, reference.multihead_attention(x, *w, **kw), rtol=tol, atol=tol)
        d_out = rng.standard_normal(out.shape).astype(dtype)
        got, again = pullback(d_out), pullback(d_out)
        want = reference.multihead_attention_backward(x, *w, d_out, **kw)
        assert set(got) == set(want)
        for name in want:
            assert got[name].shape == want[name].shape and got[name].dtype == dtype, name
            np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol, err_msg=name)
            np.testing.assert_array_equal(got[name], again[name], err_msg=name)
    assert len(ran) == 4  # two pullbacks per dtype, each through the one-pool path
    assert [lib.get_num_threads() for lib in kernels.one_blas_thread.libs()] == before


@pytest.mark.parametrize("one_pool", [True, False], ids=["one-pool", "general"])
def test_the_layer_pullback_reads_what_the_forward_saw(rng, monkeypatch, one_pool):
    """x *= 2; w_q *= 2 after multihead_attention_vjp once moved dx by 20: the pullback keeps its own copies of
    every array it reads (inputs, weights, biases, mask: a mask array takes the general path)."""
    from symattn.numeric import one_pool as pool
    took = []
    monkeypatch.setattr(pool, "forward", lambda c, real=pool.forward: took.append(c) or real(c))
    x, d_out = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
    w = [rng.standard_normal((8, 8)) for _ in range(4)]
    b_q, mask = rng.standard_normal(8), None if one_pool else rng.random((5, 5)) < 0.8
    want = symattn.multihead_attention_vjp(x.copy(), *(a.copy() for a in w), heads=2, b_q=b_q.copy(),
                                           mask=None if mask is None else mask.copy())[1](d_out)
    out, pullback = symattn.multihead_attention_vjp(x, *w, heads=2, b_q=b_q, mask=mask)
    assert bool(took) == one_pool
    for a in (x, *w, b_q):
        a *= 2.0
    if mask is not None:
        np.logical_not(mask, out=mask)
    got = pullback(d_out)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
