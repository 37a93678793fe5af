"""Queries that see no key (a window or prefix mask with n_q > n_k): the derivation follows masked_rows as the
numeric API does, says so, proves it and verifies it four ways (found by review round 7: the derivation printed
weights 0 under masked_rows='uniform' and called itself proved)."""
import numpy as np
import pytest
import sympy

import symattn
from symattn import AttentionSpec, SpecError
from symattn.app.cli import main
from symattn.check.verification import verify_multihead
from symattn.symbolic import derive as derive_module

WINDOW = dict(n_q=4, n_k=2, d_k=1, mask="window:1")  # query 3 sees keys 2 and 3: none of the two


def test_the_zero_policy_is_stated_and_its_row_is_zero():
    d = symattn.derive(AttentionSpec(**WINDOW))
    assert d.proved
    assert list(d.step("softmax").explicit.tolist()[3]) == [0, 0]
    text = d.step("softmax").explanation
    assert "query 3 (numbered from 0) sees no key" in text and "masked_rows='zero'" in text and "visible keys" in text


def test_uniform_rows_have_constant_weights_and_no_score_gradient():
    d = symattn.derive(AttentionSpec(**WINDOW, masked_rows="uniform"))
    assert d.proved, [p.failure for p in d.proofs if not p.passed]
    assert list(d.step("softmax").explicit.tolist()[3]) == [sympy.Rational(1, 2)] * 2
    assert list(d.step("dS").explicit.tolist()[3]) == [0, 0]
    assert "masked_rows='uniform'" in d.step("softmax").explanation
    assert d.step("dS").rhs.has(sympy.Contains)  # the indexed dS names the constant rows


def test_the_closed_form_without_the_uniform_branch_fails_its_proof(monkeypatch):
    """P ∘ (dP − D) is not the gradient of constant weights: the proof must catch a dS that forgets the branch."""
    real = derive_module._zero_uniform_rows
    monkeypatch.setattr(derive_module, "_zero_uniform_rows",
                        lambda spec, rows: real(spec, rows) if len(np.shape(rows)) == 3 else sympy.Array(rows))
    d = symattn.derive(AttentionSpec(**WINDOW, masked_rows="uniform"))
    assert not d.proved


@pytest.mark.parametrize("masked_rows", ["zero", "uniform"])
@pytest.mark.parametrize("variant", [dict(), dict(score="general"), dict(score_mod="softcap:5")],
                         ids=["dot", "general", "softcap"])
def test_keyless_rows_are_verified_four_ways(masked_rows, variant):
    report = symattn.verify(AttentionSpec(**WINDOW, masked_rows=masked_rows, **variant))
    assert report.passed, report.failures()
    assert {"unrolled kernel f64", "loop kernel f64", "loop kernel f32", "NumPy reference f64"} <= \
        {c.path for c in report.comparisons}


def test_the_policies_are_different_kernels_and_options():
    zero, uniform = AttentionSpec(**WINDOW), AttentionSpec(**WINDOW, masked_rows="uniform")
    assert zero.name != uniform.name and "--masked-rows uniform" in uniform.cli_args()
    assert "--masked-rows" not in zero.cli_args()


def test_nan_rows_have_no_derivation(capsys):
    with pytest.raises(SpecError, match=r"masked_rows 'nan'.*query 3 \(numbered from 0\) sees no key"):
        symattn.derive(AttentionSpec(**WINDOW, masked_rows="nan"))
    symattn.derive(AttentionSpec(3, 3, 1, mask="window:1", masked_rows="nan"))  # every query sees a key: fine
    assert main(["verify", "--n-q", "4", "--n-k", "2", "--d-k", "1", "--mask", "window:1", "--masked-rows", "nan",
                 "-q"]) == 2
    assert "symattn: error: masked_rows 'nan': under mask 'window:1'" in capsys.readouterr().err


def test_a_layer_takes_the_policy():
    spec = symattn.MultiHeadSpec(4, 4, 2, n_k=2, cross=True, mask="window:1", masked_rows="uniform")
    assert spec.head.masked_rows == "uniform" and "--masked-rows uniform" in spec.cli_args()
    report = verify_multihead(spec)
    assert report.passed, report.failures()


def test_uniform_rows_claim_no_jacobian_line_they_break():
    """The Jacobian p(δ − p), its matrix form and dS = P∘(dP − D) hold only where a key is seen (review): with a
    constant row they are not printed as identities, and the prose says where they hold."""
    d = symattn.derive(AttentionSpec(**WINDOW, masked_rows="uniform"))
    for key in ("jacobian", "dS"):
        assert d.step(key).matrix is None and "holds for a query that sees a key" in d.step(key).explanation
    assert len(d.step("dS").chain) == 2  # Σ_l dP_il ∂P_il/∂S_ij, then the result with its constant branch
    zero = symattn.derive(AttentionSpec(**WINDOW))
    assert zero.step("dS").matrix is not None and len(zero.step("dS").chain) == 4


def test_keyless_rows_are_found_over_index_grids_at_any_size():
    """Above 2^16 pairs the rows were not looked for: a window mask that leaves no query keyless was refused
    under 'nan', and hundreds of rows were listed one by one (review)."""
    big = AttentionSpec(300, 300, 4, mask="window:3", masked_rows="nan")
    assert "no key" not in symattn.derive(big, explicit=False, prove=False).step("softmax").explanation  # not refused
    d = symattn.derive(AttentionSpec(512, 128, 4, mask="window:3", masked_rows="uniform"), explicit=False,
                       prove=False)
    text = d.step("softmax").explanation
    assert "queries 131 to 511 (381 of them, numbered from 0) see no key" in text
    assert d.step("softmax").rhs.has(sympy.Range)  # one range, not 381 numbers
