import sympy

from symattn.app.example import example
from symattn.app.run import run


def test_default_example_is_the_documented_sentence():
    ex = example()
    assert ex.tokens == ("The", "cat", "sat", "on", "the", "mat") and ex.query == 2
    assert ex.X.shape == (6, 4) and ex.Q.shape == (6, 4)
    assert all(isinstance(x, sympy.Rational) for x in ex.Q)
    assert ex.X[0, :] == ex.X[4, :]  # "The" and "the" share one embedding


def test_unknown_words_are_deterministic():
    a, b = example("hello world", d_model=5, d_k=3), example("hello world", d_model=5, d_k=3)
    assert a.X == b.X and a.W_Q == b.W_Q and a.X.shape == (2, 5) and a.W_V.shape == (5, 3)
    assert a.X[0, :] != a.X[1, :]


def test_run_agrees_with_reference():
    result = run(say=lambda line: None)
    assert result.agreement < 1e-12
    assert result.derivation.proved
    assert abs(result.P.sum(axis=1) - 1).max() < 1e-12
