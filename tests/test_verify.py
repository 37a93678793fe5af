"""verify (four paths + finite differences), gradcheck, and the generate/verify/bench commands."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import symattn
from symattn import AttentionSpec
from symattn.check import verification as verify_module
from symattn.app.cli import main
from symattn.check.finite_differences import gradcheck


@pytest.mark.parametrize("spec", [AttentionSpec(3, 4, 2, 3), AttentionSpec(4, 3, 3, 2, mask="causal"),
                                  AttentionSpec(2, 2, 2, scale="1/4")], ids=lambda s: s.name)
def test_all_paths_agree(spec):
    report = symattn.verify(spec)
    assert report.passed, str(report)
    paths = {c.path for c in report.comparisons}
    assert paths == {"unrolled kernel f64", "loop kernel f64", "loop kernel f32", "NumPy reference f64"}
    assert {c.tensor for c in report.comparisons} == {"O", "dQ", "dK", "dV"}
    assert {c.tensor for c in report.gradcheck.comparisons} == {"dQ", "dK", "dV"}


def test_a_broken_kernel_is_caught_and_named(monkeypatch):
    real = verify_module.attention_vjp

    def broken(q, k, v, **kw):
        O, pullback = real(q, k, v, **kw)

        def wrong(dO):
            g = dict(pullback(dO))
            g["k"] = g["k"].copy()
            g["k"][1, 0] += 1e-3
            return g
        return O, wrong
    monkeypatch.setattr(verify_module, "attention_vjp", broken)
    report = symattn.verify(AttentionSpec(3, 4, 2))
    assert not report.passed
    failures = report.failures()
    assert any(f.startswith("dK (loop kernel f64): worst at index (1, 0)") for f in failures), failures
    assert "verification FAILED" in str(report)


def test_gradcheck_reports_the_worst_element():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2))

    def f(x):
        return np.tanh(x @ w)

    def grads(x, dO):
        return ((dO * (1 - np.tanh(x @ w) ** 2)) @ w.T,)
    x = rng.standard_normal((4, 3))
    assert gradcheck(f, {"x": x}, grads).passed

    def wrong(x, dO):
        g = grads(x, dO)[0].copy()
        g[2, 1] *= 1.01
        return (g,)
    report = gradcheck(f, {"x": x}, wrong)
    assert not report.passed
    assert report.comparisons[0].index == (2, 1) and "dx (finite differences): worst at index (2, 1)" in str(report)


def test_gradcheck_float32_policy_and_bad_inputs():
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    assert gradcheck(np.sin, {"x": x}, lambda x, dO: (dO * np.cos(x),)).passed
    with pytest.raises(symattn.InputError, match="share one float32 or float64 dtype"):
        gradcheck(np.sin, {"x": x.astype(int)}, lambda x, dO: (dO,))


def test_cli_generate_verify_and_check(tmp_path, capsys):
    out = tmp_path / "kernels"
    assert main(["generate", "--n-q", "3", "--n-k", "2", "--d-k", "2", "--causal", "-o", str(out), "-q"]) == 0
    assert (out / "attn_q3_k2_dk2_dv2_causal.py").exists() and (out / "attention_loops.py").exists()
    assert main(["verify", "--n-q", "3", "--n-k", "2", "--d-k", "2", "--causal", "-q"]) == 0
    assert "all paths agree" in capsys.readouterr().out
    assert main(["generate", "--check", "-q"]) == 0
    assert main(["generate", "-q"]) == 2
    assert "needs --n-q" in capsys.readouterr().err


def test_bench_writes_table_json_and_plot(tmp_path):
    from symattn.app.bench import bench
    lines = []
    result = bench(((1, 5, 2),), (np.float64,), out_dir=tmp_path, say=lines.append)
    assert {"NumPy", "symattn", "unrolled kernel"} <= set(result["rows"][0]["seconds"])
    assert json.loads((tmp_path / "bench.json").read_text())["environment"]["numpy"] == np.__version__
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert any("unrolled forward" in line for line in lines)


def test_bench_keeps_each_times_best_round(monkeypatch):
    """A row is measured in rounds, symattn and its peers in turn; each time (and each peer's best variant) is the
    best over the rounds, so a drift that slowed one side in one round does not make the ratio."""
    from symattn.app import bench
    rounds = iter([{"symattn": (3.0, 1.0), "JAX": {"forward": (2.0, "einsum")}, "empty": 5.0},
                   {"symattn": (1.0, 2.0), "JAX": {"forward": (1.5, "dot_product_attention")}, "empty": 4.0}])
    monkeypatch.setattr(bench, "ROUNDS", 2)
    assert bench._rounds(lambda: next(rounds)) == {"symattn": (1.0, 1.0), "JAX": {"forward": (1.5,
                                                   "dot_product_attention")}, "empty": 4.0}


def test_kernels_run_without_jit_for_coverage(tmp_path):
    code = """
import numpy as np, numba
assert numba.config.DISABLE_JIT
import symattn
from symattn import reference, AttentionSpec
from symattn.numeric.kernels import load_unrolled
rng = np.random.default_rng(0)
q, k, v, dO = (rng.standard_normal(s) for s in ((2, 5, 3), (2, 4, 3), (2, 4, 2), (2, 5, 2)))
mask = np.ones((5, 4), bool); mask[3] = False
for policy in ("zero", "uniform", "nan"):
    kw = dict(mask=mask, masked_rows=policy)
    np.testing.assert_allclose(symattn.attention(q, k, v, **kw), reference.attention(q, k, v, **kw), atol=1e-12)
    for g, w in zip(symattn.attention_backward(q, k, v, dO, **kw), reference.attention_backward(q, k, v, dO, **kw)):
        np.testing.assert_allclose(g, w, atol=1e-12)
m = load_unrolled(AttentionSpec(5, 4, 3, 2, mask="causal"), __import__("pathlib").Path(%r))
O = np.empty((5, 2)); m.attn_q5_k4_dk3_dv2_causal_forward(q[0], k[0], v[0], O)
np.testing.assert_allclose(O, reference.attention(q[0], k[0], v[0], is_causal=True), atol=1e-12)
print("ok")
""" % str(tmp_path)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "NUMBA_DISABLE_JIT": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_unrolled_kernels_reload_from_numba_cache(tmp_path):
    code = ("import numpy as np, pathlib; from symattn import AttentionSpec; from symattn.numeric.kernels import load_unrolled;"
            f"m = load_unrolled(AttentionSpec(2, 3, 2), pathlib.Path({str(tmp_path)!r})); x = np.ones((3, 2));"
            "o = np.empty((2, 2)); m.attn_q2_k3_dk2_dv2_forward(x[:2], x, x, o); print(o.sum())")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True) for _ in range(2)]
    assert all(o.returncode == 0 and o.stdout.strip() == "4.0" for o in outs), [o.stderr[-2000:] for o in outs]
    assert list((tmp_path / "__pycache__").glob("*.nbi"))  # the second run loaded the cache


def test_bench_names_the_blas_kernels_and_warns_when_an_env_variable_forces_older_ones():
    from symattn.app.bench import blas_note, environment
    env = environment()
    assert env["blas_kernels"] and env["blas_kernels"] != "unknown"  # threadpoolctl found SciPy's OpenBLAS
    assert blas_note({k: v for k, v in env.items() if k != "OPENBLAS_CORETYPE"}) is None
    note = blas_note(env | {"OPENBLAS_CORETYPE": "Haswell", "blas_kernels": "Haswell"})
    assert "OPENBLAS_CORETYPE=Haswell" in note and "Haswell kernels" in note


def test_bench_sets_pytorchs_threads_only_where_they_differ(monkeypatch):
    """torch.set_num_threads after Numba's OpenMP pool has started slowed PyTorch's layer 4-7x for the rest of the
    process (peers.setup): setup leaves an equal thread count alone and sets a different one."""
    import types
    from symattn.app import peers
    calls = []
    fake = types.SimpleNamespace(get_num_threads=lambda: 2, set_num_threads=calls.append)
    monkeypatch.setitem(sys.modules, "torch", fake)
    monkeypatch.setitem(sys.modules, "jax", None)  # not installed, as far as setup can tell
    peers.setup(2)
    assert calls == []
    peers.setup(1)
    assert calls == [1]


def test_verify_takes_a_per_head_mod_as_head_0_of_its_heads(capsys):
    """alibi:heads=2 reads h: the numeric API wants (B, 2, n, d), so verify runs the spec's head as head 0 (the
    head its derivation computes, slope 1/16); it used to stop at the shape check with exit 2."""
    assert main(["verify", "--score-mod", "alibi:heads=2", "--n-q", "3", "--n-k", "3", "--d-k", "2", "-q"]) == 0
    assert "all paths agree" in capsys.readouterr().out
