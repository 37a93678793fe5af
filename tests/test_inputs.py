"""`symattn run --inputs FILE`: your own exact numbers (JSON or .npz), bad files refused by field before any
derivation, the inputs printed before step 1, and the shipped 2-D example checked step by step against NumPy."""
import json
import re

import numpy as np
import pytest
import sympy

from symattn.app import run as run_module
from symattn.app.cli import main
from symattn.app.example import example
from symattn.app.inputs import MAX_BYTES, inputs_example, read_inputs, shipped
from symattn.errors import InputError

QKV = {"tokens": ["x", "y", "z"], "Q": [[1, "1/2"], [0, 1], ["0.25", -1]], "K": [[1, 0], [0, 1], [1, 1]],
       "V": [["1/3"], [2], [0]]}


def _write(tmp_path, data, name="inputs.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_the_default_sentence_file_is_the_default_example():
    a, b = read_inputs(shipped("the-cat-sat")), example()
    assert (a.tokens, a.query) == (b.tokens, b.query)
    assert a.X == b.X and a.Q == b.Q and a.K == b.K and a.V == b.V and a.W_O == b.W_O


def test_entries_stay_exact(tmp_path):
    path = _write(tmp_path, '{"Q": [[0.1, "-3/4"], ["1e-2", 7]], "K": [[1, 2], [3, 4]], "V": [[1], [2]]}')
    ex = read_inputs(path)
    assert ex.tokens == ("t0", "t1") and ex.query == 0 and ex.X is None
    assert list(ex.Q) == [sympy.Rational(1, 10), sympy.Rational(-3, 4), sympy.Rational(1, 100), 7]


def test_npz_reads_like_json(tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, tokens=np.array(["x", "y", "z"]), Q=np.array([[1, 0.5], [0, 1], [0.25, -1]]),
             K=np.array(QKV["K"]), V=np.array([[0.1], [2], [0]]))
    ex = read_inputs(path, query="Y")
    assert ex.tokens == ("x", "y", "z") and ex.query == 1
    assert ex.Q == inputs_example(QKV).Q and ex.V[0] == sympy.Rational(1, 10)


def test_embeddings_form_projects_exactly():
    ex = inputs_example({"tokens": ["a", "b"], "X": [[1, 2], [3, 4]], "W_Q": [[1, 0], [0, 1]],
                         "W_K": [[0, 1], [1, 0]], "W_V": [["1/2"], [0]]}, query="b")
    assert ex.query == 1 and ex.K == sympy.Matrix([[2, 1], [4, 3]]) and ex.V == sympy.Matrix([["1/2"], ["3/2"]])


@pytest.mark.parametrize("data, message", [
    ({"X": [[1, 0, 0, 1]] * 2, "W_Q": [[1]] * 3, "W_K": [[1]] * 4, "W_V": [[1]] * 4},
     "inputs.json: W_Q must have d_model = 4 rows, got 3"),
    ({**QKV, "K": [[1, 0], [0, 1]]}, "inputs.json: K must have n = 3 rows"),
    ({**QKV, "K": [[1], [0], [1]]}, "inputs.json: K must have d_k = 2 columns"),
    ({**QKV, "tokens": ["x", "y"]}, "inputs.json: tokens has 2 entries but Q has 3 rows"),
    ({**QKV, "V": [["1/3"], ["__import__('os')"], [0]]}, "inputs.json: V[1][0] = \"__import__('os')\" is not an exact"),
    ({**QKV, "V": [[True], [2], [0]]}, "inputs.json: V[0][0] = True is not an exact number"),
    ({**QKV, "V": [["1/0"], [2], [0]]}, "V[0][0] = '1/0' is not an exact number"),
    ({**QKV, "V": [["1e999"], [2], [0]]}, "more than 20 digits"),
    ({**QKV, "Q": [[1, 2], [3]]}, "Q row 1 has 1 entries, row 0 has 2"),
    ({**QKV, "X": [[1]]}, "give X, W_Q, W_K, W_V or Q, K, V, not both"),
    ({"Q": [[1]], "K": [[1]]}, "missing V"),
    ({**QKV, "Wq": 1}, "unknown field(s) 'Wq'"),
    ({**QKV, "query": "w"}, "query token 'w' is not in the sentence"),
    ({"Q": [[1]] * 9, "K": [[1]] * 9, "V": [[1]] * 9}, "inputs.json: the file has 9 tokens"),
    ({"Q": [[1] * 9], "K": [[1] * 9], "V": [[1]]}, "d_model 9 is over the worked example's limit of 8"),
    ([1, 2], "must hold a JSON object"),
    ("{\"Q\": [[NaN]]}", "NaN is not an exact number"),
    ("{\"Q\": [[1]", "not valid JSON"),
])
def test_bad_files_are_refused_by_field_before_any_derivation(data, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, data)
    monkeypatch.setattr(run_module, "derive", lambda *a, **k: pytest.fail("derive ran for a bad inputs file"))
    assert main(["run", "-q", "--inputs", "inputs.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("symattn: error: ") and message in err, err


def test_file_size_and_conflicting_options(tmp_path, capsys):
    big = _write(tmp_path, " " * (MAX_BYTES + 1) + json.dumps(QKV))
    assert main(["run", "-q", "--inputs", str(big)]) == 2
    assert f"over the limit of {MAX_BYTES}" in capsys.readouterr().err
    small = _write(tmp_path, QKV, "small.json")
    assert main(["run", "-q", "--inputs", str(small), "--sentence", "a b"]) == 2
    assert "leave out the sentence" in capsys.readouterr().err
    with pytest.raises(InputError, match="not a readable .npz"):
        read_inputs(_write(tmp_path, "PK not a zip", "bad.npz"))


def _softmax(S):
    E = np.exp(S - S.max(axis=1, keepdims=True))
    return E / E.sum(axis=1, keepdims=True)


def test_two_d_example_every_step_against_numpy():
    """The shipped 2-D example: query "sat" = [1, 1], keys = embeddings, values = X diag(1, 2); every forward
    step's exact value against NumPy written here, and the numbers the document prints for "sat"."""
    lines = []
    result = run_module.run(inputs="two-d", say=lines.append, kernels=False)
    X = np.array([[0, 1], [1, 0], [1, 1], [-1, 0], [0, 1], [0.5, 1]])  # (6, 2), as in two-d.json
    Q, K, V = X, X, X @ np.diag([1.0, 2.0])  # (6, 2) each
    St = Q @ K.T  # (6, 6)
    S = St / np.sqrt(2)
    P = _softmax(S)
    Vt = P[:, :, None] * V[None, :, :]  # (6, 6, 2)
    O = Vt.sum(axis=1)  # (6, 2)
    ex, d = result.example, result.derivation
    assert ex.tokens[ex.query] == "sat" and list(ex.Q.row(ex.query)) == [1, 1] and ex.K == ex.X
    values = run_module.exact_values(d, {"Q": ex.Q, "K": ex.K, "V": ex.V})
    for tensor, expected in (("St", St), ("S", S), ("P", P), ("Vt", Vt), ("O", O)):
        got = np.array([float(values[d.table[tensor][ix]]) for ix in np.ndindex(*expected.shape)])
        np.testing.assert_allclose(got, expected.ravel(), rtol=0, atol=1e-14, err_msg=tensor)
    assert result.derivation.proved and result.layer is not None and result.layer.proved
    text = "\n".join(lines)
    rows = re.findall(r"^\s+(\d)\s+(\S+)\s+(-?\d+\.\d+)\s+(\d\.\d+)$", text.split("Two heads:")[0], re.M)
    assert rows == [(str(j), t, f"{S[2, j]:.4f}", f"{P[2, j]:.4f}") for j, t in enumerate(ex.tokens)]
    assert "o_{2,1} = " in text and f"= {O[2, 1]:.4g}" in text  # step 7/8's number for "sat"


@pytest.mark.parametrize("fmt, first_input, first_step", [
    ("text", "X, the embeddings", "% 1. The query vectors"),
    ("markdown", "$X$, the embeddings", "### 1. The query vectors"),
    ("latex", "$X$, the embeddings", r"\subsubsection*{1. The query vectors}"),
])
def test_inputs_are_printed_before_step_1(fmt, first_input, first_step):
    result = run_module.run(inputs={"tokens": ["a", "b"], "X": [[1, 0], [0, 1]], "W_Q": [[1, 0], [0, 1]],
                                    "W_K": [[1, 0], [0, 1]], "W_V": [[1, 0], [0, 1]]},
                            say=lambda line: None, kernels=False)
    doc = result.document.render(fmt)
    assert 0 <= doc.index(first_input) < doc.rindex("V = X W_V") < doc.index(first_step)
    assert "(two-head layer skipped: the inputs file gives no output projection" in doc
