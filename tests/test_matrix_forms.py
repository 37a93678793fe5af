"""Matrix forms of the score gradients (review round 7: the general score, and the dot product under a score mod,
printed none): each printed form, evaluated with NumPy matrices at random inputs, equals the numeric API's gradient."""
import numpy as np
import pytest
import sympy

import symattn
from symattn import AttentionSpec
from symattn.symbolic.tensors import SIZES, TENSORS


def _value(eq: sympy.Eq, arrays: dict, d_k: int) -> np.ndarray:
    """The right-hand side of a printed matrix form (products, transposes and scalar factors of matrices) with
    NumPy arrays for its matrices."""
    names = {TENSORS[n].matrix_symbol(): x for n, x in arrays.items()}

    def value(e):
        if isinstance(e, sympy.MatrixSymbol):
            return names[e]
        if isinstance(e, sympy.Transpose):
            return value(e.arg).T
        if isinstance(e, sympy.MatMul):
            out = 1.0
            for factor in e.args:
                out = out @ value(factor) if factor.is_Matrix and not np.isscalar(out) else out * value(factor)
            return out
        return float(e.subs(SIZES["d_k"], d_k))
    return value(eq.rhs)


def _dS(P, V, dO):
    O = P @ V
    return P * (dO @ V.T - (dO * O).sum(axis=1, keepdims=True))


def test_general_score_matrix_forms(rng):
    n_q, n_k, d = 3, 4, 2
    q, k, v, dO, W = rng.normal(size=(n_q, d)), rng.normal(size=(n_k, d)), rng.normal(size=(n_k, d)), \
        rng.normal(size=(n_q, d)), rng.normal(size=(d, d))
    tau = 1 / np.sqrt(d)
    S = tau * q @ W @ k.T
    P = np.exp(S - S.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    dS = _dS(P, v, dO)
    grads = symattn.attention_vjp(q, k, v, score="general", params={"W_a": W})[1](dO)
    d_ = symattn.derive(AttentionSpec(n_q, n_k, d, score="general"), explicit=False, prove=False)
    arrays = {"Q": q, "K": k, "Wg": W, "dS": dS}
    for step, want in (("dQ", grads["q"]), ("dK", grads["k"]), ("dWg", grads["W_a"])):
        assert d_.step(step).matrix is not None, step
        np.testing.assert_allclose(_value(d_.step(step).matrix, arrays, d), want, rtol=1e-10, atol=1e-12)


def test_modded_dot_matrix_forms_use_the_gradient_before_the_mod(rng):
    n_q, n_k, d, c = 3, 4, 2, 5.0
    q, k, v, dO = rng.normal(size=(n_q, d)) * 3, rng.normal(size=(n_k, d)) * 3, rng.normal(size=(n_k, d)), \
        rng.normal(size=(n_q, d))
    tau = 1 / np.sqrt(d)
    Sbar = tau * q @ k.T
    S = c * np.tanh(Sbar / c)
    P = np.exp(S - S.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    dSbar = _dS(P, v, dO) * (1 - np.tanh(Sbar / c) ** 2)
    grads = symattn.attention_vjp(q, k, v, score_mod=symattn.mods.softcap(5))[1](dO)
    d_ = symattn.derive(AttentionSpec(n_q, n_k, d, score_mod="softcap:5"), explicit=False, prove=False)
    arrays = {"Q": q, "K": k, "dSr": dSbar}
    for step, want in (("dQ", grads["q"]), ("dK", grads["k"])):
        np.testing.assert_allclose(_value(d_.step(step).matrix, arrays, d), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("score", [dict(score="additive", hidden=2), dict(score="cosine")], ids=["additive", "cosine"])
def test_scores_that_are_not_bilinear_claim_no_matrix_form(score):
    d = symattn.derive(AttentionSpec(2, 2, 2, **score), explicit=False, prove=False)
    assert d.step("dQ").matrix is None and d.step("dK").matrix is None


def test_every_printed_matrix_form_is_proven_and_a_wrong_one_fails(monkeypatch):
    """The proofs now include each matrix form at the sizes; one that forgets W_aᵀ in dQ = τ dS K W_aᵀ fails."""
    spec = AttentionSpec(2, 3, 2, score="general")
    d = symattn.derive(spec)
    proven = {p.step for p in d.proofs if p.kind == "matrix"}
    assert {"dV", "dP", "dS", "dQ", "dK", "dWg", "similarity", "scaling", "output"} <= proven and d.proved
    from symattn.symbolic import derive as derive_module
    real = derive_module._matrix_gradient

    def wrong(spec, score, tensor):
        eq = real(spec, score, tensor)
        if tensor != "Q":
            return eq
        M = {n: TENSORS[n].matrix_symbol() for n in ("dS", "K", "dQ")}
        return sympy.Eq(M["dQ"], eq.rhs.args[0] * M["dS"] * M["K"], evaluate=False)  # W_aᵀ left out
    monkeypatch.setattr(derive_module, "_matrix_gradient", wrong)
    bad = symattn.derive(spec)
    assert not bad.proved
    assert [p.step for p in bad.proofs if not p.passed] == ["dQ"]
