"""`symattn run` shows the two-head layer for every variant: each head computes the single head's score, score mod
and mask, with θ shared by both heads (the example's values at the heads' shapes). Each head's exact weights are
checked against plain NumPy of the variant written here; the layer's output against symattn.multihead_attention."""
import numpy as np
import pytest

from symattn.app.cli import main
from symattn.app.run import run
from symattn.masks import document

SMALL = dict(sentence="a b c", query="c", d_model=2, d_k=2, say=lambda line: None, kernels=False)
I, J = np.indices((3, 3))  # query i, key j
EVERY = np.ones((3, 3), bool)
CAUSAL = J <= I


def _softmax(S: np.ndarray, visible: np.ndarray) -> np.ndarray:
    E = np.where(visible, np.exp(S - S.max(axis=1, keepdims=True)), 0.0)  # (n, n)
    return E / E.sum(axis=1, keepdims=True)


def _unit(A: np.ndarray) -> np.ndarray:
    return A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-12)


SCORES = {  # (Q_h, K_h, θ) -> S (n, n) of one head, d_k = Q_h.shape[1]
    "dot": lambda Q, K, t: Q @ K.T / np.sqrt(Q.shape[1]),
    "general": lambda Q, K, t: Q @ t["W_a"] @ K.T / np.sqrt(Q.shape[1]),
    "additive": lambda Q, K, t: np.tanh((Q @ t["W_a"])[:, None, :] + (K @ t["U_a"])[None, :, :] + t["b_a"]) @ t["v_a"],
    "cosine": lambda Q, K, t: float(t["tau"][0]) * _unit(Q) @ _unit(K).T,
}


def _head_weights(result, h: int, score: str, mod, visible: np.ndarray) -> np.ndarray:
    """P of head h: its columns of Q = X W_Q and K = X W_K, the score, the mod f(S, h), the mask, the softmax."""
    X, W_Q, W_K = (np.array(M, dtype=float) for M in (result.example.X, result.example.W_Q, result.example.W_K))
    d_k = W_Q.shape[1] // 2
    Q, K = X @ W_Q[:, h * d_k:(h + 1) * d_k], X @ W_K[:, h * d_k:(h + 1) * d_k]  # (n, d_k) each
    theta = {name: x.astype(float) for name, x in result.layer_params.items()}
    return _softmax(mod(SCORES[score](Q, K, theta), h), visible)


CASES = {  # id -> (run options, score, mod (S, h) -> S', visible)
    "additive": (dict(score="additive", hidden=2), "additive", lambda S, h: S, EVERY),
    "general": (dict(score="general", d_model=2, d_k=4), "general", lambda S, h: S, EVERY),
    "cosine": (dict(score="cosine", d_model=2, d_k=4), "cosine", lambda S, h: S, EVERY),
    "alibi+window": (dict(score_mod="alibi", mask="window:2"), "dot", lambda S, h: S + (J - I) / 256,
                     CAUSAL & (I - J <= 2)),
    "alibi-heads+window": (dict(score_mod="alibi:heads=2", mask="window:1"), "dot",
                           lambda S, h: S + 2.0 ** (-8 * (h + 1) / 2) * (J - I), CAUSAL & (I - J <= 1)),
    "softcap+causal": (dict(score_mod="softcap:5", causal=True), "dot", lambda S, h: 5 * np.tanh(S / 5), CAUSAL),
}


@pytest.mark.parametrize("case", CASES)
def test_the_layer_of_every_variant_matches_numpy_head_by_head(case):
    options, score, mod, visible = CASES[case]
    result = run(**(SMALL | options))
    assert result.layer is not None and result.layer.proved and result.passed
    assert result.layer.spec.head.score == score and result.layer.spec.mask == result.derivation.spec.mask
    for h, P in enumerate(result.head_P):
        np.testing.assert_allclose(P, _head_weights(result, h, score, mod, visible), rtol=0, atol=1e-13,
                                   err_msg=f"head {h}")
        assert np.all(P[~visible] == 0)
    assert result.layer_agreement < 1e-12  # the exact output = symattn.multihead_attention's
    text = result.document.render("text")
    assert "Two heads: a multi-head self-attention layer" in text and "head 1 p_ij" in text
    assert "Layer output z for" in text and "two-head layer skipped" not in text
    assert ("the score mod's h being the head's index (0 or 1)" in text) == (case == "alibi-heads+window")


def test_the_heads_share_theta_at_their_own_width():
    """General at d_k = 4: the single head's W_a is 4 × 4, each head's (d_k = 2) is 2 × 2, shown in the document;
    the relative-bias table does not depend on d_k: the heads use the single head's."""
    general = run(**(SMALL | dict(score="general", d_model=2, d_k=4)))
    assert general.params["W_a"].shape == (4, 4) and general.layer_params["W_a"].shape == (2, 2)
    assert "at the heads' width d_k = 2" in general.document.render("text")
    table = run(**(SMALL | dict(score_mod="relative-bias:1")))
    assert np.array_equal(table.layer_params["B_rel"], table.params["B_rel"])
    assert "the values above" in table.document.render("text")


def test_a_run_time_document_mask_goes_through_the_layer():
    """document(ids) (its ids given in Python, not on the command line): both heads see only their document."""
    mask = document([[0, 0, 1]])
    result = run(**(SMALL | dict(mask=mask)))
    visible = np.array([[0, 0, 1]]).T == np.array([[0, 0, 1]])  # (3, 3): same document
    for h, P in enumerate(result.head_P):
        np.testing.assert_allclose(P, _head_weights(result, h, "dot", lambda S, h: S, visible), rtol=0, atol=1e-13)
    assert result.layer.proved and result.layer_agreement < 1e-12


def test_per_head_slopes_for_more_heads_than_the_layer_are_refused_by_name():
    result = run(**(SMALL | dict(score_mod="alibi:heads=4")))
    assert result.layer is None and result.head_P == () and result.layer_agreement is None
    assert ("two-head layer skipped: MultiHeadSpec.score_mod 'alibi:heads=4' has one slope per head of 4 heads, but "
            "the layer has 2: use alibi:heads=2") in result.document.render("text")


def test_cli_run_shows_the_layer_of_a_variant_and_its_kernels_agree(capsys):
    assert main(["run", "-q", "--sentence", "a b", "--d-model", "2", "--d-k", "2", "--score", "additive",
                 "--hidden", "1", "--score-mod", "softcap:2", "--mask", "window:1"]) == 0
    out = capsys.readouterr().out
    assert "each head computes the single head's variant: additive score (d_a = 1), score mod softcap:2, mask " \
           "window:1." in out
    assert "Exact symbolic layer vs numeric layer" in out and out.rstrip().endswith("all paths agree")
