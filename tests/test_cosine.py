"""The cosine score (issue 8): s = tau·(q_i/max(‖q_i‖, eps))·(k_j/max(‖k_j‖, eps)), eps = 1e-12 as
torch.nn.functional.normalize; derived, proven, printed, generated and verified, and the NumPy reference
against PyTorch's autograd (the clamp's gradient included)."""
import re
import shutil
import subprocess

import numpy as np
import pytest
import sympy

import symattn
from conftest import reference_gradcheck, tampered
from symattn import AttentionSpec, SpecError, reference
from symattn.app.cli import main
from symattn.symbolic.score import NORM_EPS, SCORES, derivative


@pytest.mark.parametrize("sizes", [(1, 2, 1, 1), (2, 3, 2, 2)])
def test_cosine_gradients_are_proven(sizes):
    d = symattn.derive(AttentionSpec(*sizes, score="cosine"))
    assert d.proved, [p.failure for p in d.proofs if not p.passed]
    assert {p.step for p in d.proofs if p.kind == "gradient"} == {"dV", "dP", "dS", "dQ", "dK", "dtau"}
    assert "similarity" not in {s.key for s in d.steps}  # tau is the temperature: no 1/sqrt(d_k) step


def test_a_wrong_tau_gradient_fails_its_proof():
    d = symattn.derive(AttentionSpec(2, 2, 2, score="cosine"), prove=False)
    d = tampered(d, "dtau", explicit=d.step("dtau").explicit * 2)
    failed = {p.step for p in symattn.prove(d).proofs if not p.passed}
    assert "dtau" in failed and "dQ" not in failed


def test_the_formula_is_the_normalised_dot_product():
    d = symattn.derive(AttentionSpec(1, 1, 2, score="cosine"), prove=False)
    t = d.table
    s = d.step("score").explicit[0, 0]
    q, k, tau = (3, 4), (-1, 1), sympy.Rational(5, 2)
    value = s.xreplace({t["Q"][0, 0]: q[0], t["Q"][0, 1]: q[1], t["K"][0, 0]: k[0], t["K"][0, 1]: k[1],
                        t["tau"][0]: tau})
    assert sympy.simplify(value - tau * (q[0] * k[0] + q[1] * k[1]) / (5 * sympy.sqrt(2))) == 0
    zero = s.xreplace({t["Q"][0, 0]: 0, t["Q"][0, 1]: 0})  # the clamp: 0 / eps, not 0 / 0
    assert zero == 0 and AttentionSpec(2, 2, 2, score="cosine").sizes["one"] == 1


def test_the_clamp_passes_no_gradient_to_the_norm_where_it_holds():
    x, y = sympy.symbols("x y", real=True)
    norm = sympy.sqrt(x ** 2 + y ** 2)
    g = derivative(x / sympy.Max(norm, NORM_EPS), x)
    assert g.xreplace({x: 0, y: 0}) == 1 / NORM_EPS  # inside the clamp: x / eps
    assert sympy.simplify(g.xreplace({x: 3, y: 4}) - sympy.Rational(16, 125)) == 0  # (1 - x²/r²) / r


def test_cosine_is_a_spec_choice_without_a_scale():
    assert "cosine" in SCORES and AttentionSpec(2, 2, 2, score="cosine").name == "attn_q2_k2_dk2_dv2_cosine"
    with pytest.raises(SpecError, match="does not apply to score='cosine'"):
        AttentionSpec(2, 2, 2, score="cosine", scale=0.5)


def _torch_cosine(q, k, v, tau, dO, mask=None):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    q, k, v, tau = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v, tau))
    S = tau * F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
    if mask is not None:
        S = S.masked_fill(~torch.tensor(mask), float("-inf"))
    O = torch.softmax(S, dim=-1) @ v
    (O * torch.tensor(dO)).sum().backward()
    return O.detach().numpy(), {"q": q.grad.numpy(), "k": k.grad.numpy(), "v": v.grad.numpy(), "tau": tau.grad.numpy()}


@pytest.mark.parametrize("zero_row", [False, True], ids=["plain", "a zero query and key (the clamp)"])
def test_reference_matches_torch_autograd(zero_row, rng):
    q, k, v = rng.normal(size=(2, 3, 4, 3)), rng.normal(size=(2, 3, 5, 3)), rng.normal(size=(2, 3, 5, 2))
    if zero_row:
        q[0, 1, 2], k[1, 0, 3] = 0.0, 0.0
    tau, dO = np.array(3.5), rng.normal(size=(2, 3, 4, 2))
    mask = np.tril(np.ones((4, 5), bool), 1)
    O, grads = _torch_cosine(q, k, v, tau, dO, mask)
    kw = dict(score="cosine", params={"tau": tau}, mask=mask)
    np.testing.assert_allclose(reference.attention(q, k, v, **kw), O, rtol=1e-12, atol=1e-14)
    ours = reference.gradients(q, k, v, dO, **kw)
    for name in ("q", "k", "v", "tau"):
        np.testing.assert_allclose(ours[name], grads[name], rtol=1e-10, atol=1e-12, err_msg=name)
    assert np.shape(ours["tau"]) == ()


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
def test_kernels_match_the_reference_through_the_clamp(dtype, tol, rng):
    """The numeric API runs cosine on the dot kernels (normalised rows, scale tau, the norms' pullback after):
    it agrees with the reference, zero rows (the clamp: gradients of order 1/eps) and a mask included."""
    q, k, v, dO = (rng.normal(size=(2, 3, n, 3)).astype(dtype) for n in (4, 5, 5, 4))
    q[0, 1, 2], k[1, 0, 3] = 0.0, 0.0
    tau, mask = np.array(3.5, dtype), np.tril(np.ones((4, 5), bool), 1)
    O, pullback = symattn.attention_vjp(q, k, v, score="cosine", params={"tau": tau}, mask=mask)
    kw = dict(score="cosine", params={"tau": np.float64(tau)}, mask=mask)
    wide = [x.astype(np.float64) for x in (q, k, v, dO)]
    np.testing.assert_allclose(O, reference.attention(*wide[:3], **kw), rtol=tol, atol=tol)
    got, want = pullback(dO), reference.gradients(*wide, **kw)
    for name in ("q", "k", "v", "tau"):
        scale = np.abs(want[name]).max()  # the clamped rows' gradients are ~1e12: compare relative to the largest
        np.testing.assert_allclose(got[name] / scale, want[name] / scale, rtol=tol, atol=tol, err_msg=name)


def test_reference_agrees_with_finite_differences(rng):
    tau = np.array([2.0])
    arrays = {"q": rng.normal(size=(2, 3, 2)), "k": rng.normal(size=(2, 4, 2)), "v": rng.normal(size=(2, 4, 3)),
              "tau": tau}
    report = reference_gradcheck(arrays, {"tau": tau}, score="cosine")
    assert report.passed, [c.failure() for c in report.comparisons if not c.passed]


def test_verify_cosine(capsys):
    assert main(["verify", "--score", "cosine", "--n-q", "3", "--n-k", "4", "--d-k", "2", "-q"]) == 0
    out = capsys.readouterr().out
    assert "all paths agree" in out
    assert len([line for line in out.splitlines() if line.split()[:1] == ["dtau"]]) == 5  # unrolled, loop f64 and f32, NumPy, finite differences


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (CI installs it)")
def test_cosine_document_compiles_and_fits_the_page(tmp_path):
    assert main(["derive", "--score", "cosine", "--n-q", "3", "--n-k", "3", "--d-k", "2", "--format", "tex",
                 "-o", str(tmp_path / "d.tex"), "-q"]) == 0
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "d.tex"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    assert r"\max" in (tmp_path / "d.tex").read_text()
    overfull = [float(x) for x in re.findall(r"Overfull \\hbox \(([0-9.]+)pt", (tmp_path / "d.log").read_text())]
    assert max(overfull, default=0) < 30, overfull  # the named norms keep dq on the page (it was 340 pt over)


def test_the_kernels_clamp_is_the_derivations():
    from symattn.numeric import cosine
    assert cosine.NORM_EPS == float(NORM_EPS)
