"""`symattn run` with a variant (score, score mod, mask): exact weights against plain NumPy written here,
proofs, verified kernels; bad variants refused before any derivation."""
import numpy as np
import pytest

from symattn.app import run as run_module
from symattn.app.cli import main
from symattn.app.run import run
from symattn.errors import SymattnError

SMALL = dict(sentence="a b c", query="c", d_model=2, d_k=2, say=lambda line: None)


def _softmax(S: np.ndarray, visible: np.ndarray) -> np.ndarray:
    E = np.where(visible, np.exp(S - S.max(axis=1, keepdims=True)), 0.0)  # (n, n)
    return E / E.sum(axis=1, keepdims=True)


def _floats(result) -> tuple[np.ndarray, np.ndarray, dict]:
    Q, K = (np.array(M, dtype=float) for M in (result.example.Q, result.example.K))
    return Q, K, {name: x.astype(float) for name, x in result.params.items()}


def test_general_score_run_is_proved_verified_and_exact():
    result = run(score="general", **SMALL)
    Q, K, theta = _floats(result)
    assert set(theta) == {"W_a"} and theta["W_a"].shape == (2, 2)
    S = Q @ theta["W_a"] @ K.T / np.sqrt(2)  # (3, 3): scale q_i W_a k_j^T
    np.testing.assert_allclose(result.P, _softmax(S, np.ones((3, 3), bool)), rtol=0, atol=1e-13)
    assert result.derivation.proved and result.report.passed and result.passed
    assert result.layer.proved and result.layer.spec.score == "general"  # the two-head layer computes it too
    assert result.agreement < 1e-12


def test_additive_score_with_relative_bias_and_window_mask():
    result = run(score="additive", hidden=2, score_mod="relative-bias:1", mask="window:1", **SMALL)
    Q, K, t = _floats(result)
    hidden = np.tanh((Q @ t["W_a"])[:, None, :] + (K @ t["U_a"])[None, :, :] + t["b_a"])  # (3, 3, d_a)
    i, j = np.indices((3, 3))
    S = hidden @ t["v_a"] + t["B_rel"][np.clip(j - i, -1, 1) + 1]  # (3, 3), not scaled
    visible = (j <= i) & (i - j <= 1)  # window:1: keys i - 1 .. i
    np.testing.assert_allclose(result.P, _softmax(S, visible), rtol=0, atol=1e-13)
    assert np.all(result.P[~visible] == 0)
    assert result.passed and result.agreement < 1e-12
    assert [c.path for c in result.report.comparisons if c.tensor == "dBrel"]  # the table's gradient is verified


def test_params_are_exact_deterministic_rationals():
    spec = run_module.variant_spec(3, 2, 2, score="additive", hidden=3)
    docs = [run_module.Document(say=lambda line: None) for _ in range(2)]
    a, b = (run_module._parameters(spec, doc) for doc in docs)
    assert {k: v.shape for k, v in a.items()} == {"W_a": (2, 3), "U_a": (2, 3), "v_a": (3,), "b_a": (3,)}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert {float(x) for v in a.values() for x in v.flat} <= {-1, -0.5, 0, 0.5, 1}
    shown = [block for block in docs[0].blocks if block[0] == "matrix"]  # each θ shown as a matrix, exact
    assert [block[1] for block in shown] == ["W_a", "U_a", "v_a", "b_a"]
    assert all(block[3].shape == (a[name].shape[0] if a[name].ndim == 2 else 1, a[name].shape[-1]) and
               list(block[3]) == list(a[name].flat) for block, name in zip(shown, a))


def test_cli_run_with_a_variant(capsys):
    assert main(["run", "-q", "--sentence", "a b", "--d-model", "2", "--d-k", "2", "--score-mod", "softcap:2",
                 "--causal"]) == 0
    out = capsys.readouterr().out
    assert "score mod softcap:2, causal mask" in out and "all paths agree" in out
    assert "two-head layer skipped" not in out
    assert "each head computes the single head's variant: score mod softcap:2, causal mask." in out


@pytest.mark.parametrize("argv, message", [
    (["--hidden", "2"], "hidden"),  # hidden without the additive score
    (["--score", "additive"], "hidden"),  # the additive score without hidden
    (["--causal", "--mask", "window:2"], "disagree"),
    (["--score-mod", "bogus"], "unknown score mod"),
    (["--mask", "window:x"], "mask"),
    (["--score", "additive", "--hidden", "8", "--d-model", "6", "--d-k", "6"],  # too large for the worked example
     "--hidden 8 is over the worked example's limit"),
])
def test_bad_variants_are_refused_before_any_derivation(argv, message, capsys, monkeypatch):
    def no_derivation(*args, **kwargs):
        raise AssertionError("derive ran for a variant that should have been refused")
    monkeypatch.setattr(run_module, "derive", no_derivation)
    assert main(["run", "-q", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("symattn: error:") and message in err


def test_variant_spec_refuses_by_name():
    with pytest.raises(SymattnError, match="disagree"):
        run_module.variant_spec(3, 2, 2, causal=True, mask="prefix:1")
