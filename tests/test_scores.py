"""Scores as data (issue 8): dot, general (Luong) and additive (Bahdanau) scores, their parameters, gradients
derived by SymPy and proven against plain differentiation, unrolled kernels, the NumPy reference and verify."""
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
from symattn.symbolic import masks, mods
from symattn.symbolic.score import SCORES, contract
from symattn.symbolic.spec import SCORES as SPEC_SCORES
from symattn.symbolic.tensors import TENSORS, a, i, j

SPECS = {"general": dict(score="general"), "additive": dict(score="additive", hidden=3)}


def test_the_spec_knows_every_score():
    assert set(SPEC_SCORES) == set(SCORES)


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("sizes", [(1, 2, 1, 1), (2, 3, 2, 2)], ids=["exact", "random points"])
def test_every_gradient_of_every_score_is_proven(name, sizes):
    d = symattn.derive(AttentionSpec(*sizes, **SPECS[name]))
    assert d.proved, [p.failure for p in d.proofs if not p.passed]
    params = {"d" + p.tensor for p in SCORES[name].params}
    proven = {p.step for p in d.proofs if p.kind == "gradient"}
    assert proven == {"dV", "dP", "dS", "dQ", "dK"} | params
    assert {p.method for p in d.proofs if p.kind == "gradient"} == {
        "exact simplification" if sizes[0] == 1 else "random rational points"}


@pytest.mark.parametrize("name, broken", [("additive", "dva"), ("additive", "dWa"), ("general", "dWg")])
def test_a_wrong_parameter_gradient_fails_its_proof(name, broken):
    spec = AttentionSpec(2, 2, 2, **SPECS[name])
    d = symattn.derive(spec, prove=False)
    d = tampered(d, broken, explicit=d.step(broken).explicit * 2)
    failed = {(p.kind, p.step) for p in symattn.prove(d).proofs if not p.passed}
    assert ("gradient", broken) in failed and ("gradient", "dQ") not in failed


def test_general_with_the_identity_is_the_dot_product():
    spec = AttentionSpec(2, 3, 2, score="general")
    d, dot = symattn.derive(spec, prove=False), symattn.derive(AttentionSpec(2, 3, 2), prove=False)
    W = d.table["Wg"]  # element symbols are named as the dot product's (q_{0,1}, ...), so they are equal
    general = d.step("similarity").explicit.xreplace({W[x, y]: int(x == y) for x in range(2) for y in range(2)})
    assert sympy.Matrix(general.tolist()).expand() == sympy.Matrix(dot.step("similarity").explicit.tolist()).expand()
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 3))
    np.testing.assert_allclose(reference.attention(q, k, v, score="general", params={"W_a": np.eye(4)}),
                               reference.attention(q, k, v), rtol=1e-13)


def test_indexed_gradients_are_contracted():
    d = symattn.derive(AttentionSpec(2, 2, 2, score="general"), explicit=False)
    rhs = d.step("dWg").rhs
    assert not rhs.atoms(sympy.KroneckerDelta) and not rhs.atoms(sympy.Piecewise)
    Q, W = TENSORS["Q"].base, TENSORS["Wg"].base
    x = sympy.Symbol("x", integer=True)
    assert contract(sympy.Sum(sympy.KroneckerDelta(a, x) * Q[i, x], (x, 0, 3))) == Q[i, a]
    assert contract(sympy.Piecewise((W[a, j], a <= 3), (0, True))) == W[a, j]


def _params(spec, rng):
    return {p.name: rng.normal(size=TENSORS[p.tensor].shape(spec)) for p in SCORES[spec.score].params}


@pytest.mark.parametrize("name", SPECS)
def test_reference_gradients_agree_with_finite_differences(name, rng):
    """The oracle itself, with broadcast batch dims and a causal mask, for inputs and every parameter."""
    spec = AttentionSpec(3, 4, 2, 3, **SPECS[name])
    theta = _params(spec, rng)
    arrays = {"q": rng.normal(size=(2, 3, 2)), "k": rng.normal(size=(1, 4, 2)), "v": rng.normal(size=(2, 4, 3)),
              **theta}
    report = reference_gradcheck(arrays, theta, score=name, is_causal=True)
    assert report.passed, [c.failure() for c in report.comparisons if not c.passed]


@pytest.mark.parametrize("name", SPECS)
def test_unrolled_kernels_match_the_reference(name, rng, tmp_path):
    from symattn.check.verification import _unrolled_call
    from symattn.numeric.kernels import load_unrolled
    spec = AttentionSpec(3, 4, 2, 3, mask="causal", **SPECS[name])
    theta = _params(spec, rng)
    q, k, v, dO = rng.normal(size=(3, 2)), rng.normal(size=(4, 2)), rng.normal(size=(4, 3)), rng.normal(size=(3, 3))
    f, g = _unrolled_call(spec, load_unrolled(spec, tmp_path))
    arrays = [q, k, v, *theta.values()]
    kw = dict(score=name, params=theta, is_causal=True)
    np.testing.assert_allclose(f(*arrays), reference.attention(q, k, v, **kw), rtol=1e-12, atol=1e-14)
    want = reference.gradients(q, k, v, dO, **kw)
    for got, key in zip(g(*arrays, dO), ("q", "k", "v", *theta)):
        np.testing.assert_allclose(got, want[key], rtol=1e-10, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("argv", [["--score", "additive", "--hidden", "4", "--n-q", "3", "--n-k", "4", "--d-k", "2"],
                                  ["--score", "general", "--n-q", "2", "--n-k", "3", "--d-k", "2", "--causal"]])
def test_verify_command(argv, capsys):
    assert main(["verify", *argv, "-q"]) == 0
    out = capsys.readouterr().out
    assert "all paths agree" in out
    params = ["dWa", "dUa", "dva", "dba"] if "additive" in argv else ["dWg"]
    for name in params:  # each parameter: symbolic vs unrolled vs NumPy, and finite differences
        assert len([line for line in out.splitlines() if line.split()[:1] == [name]]) == 5  # unrolled, loop f64 and f32, NumPy, finite differences


@pytest.mark.parametrize("kwargs, message", [
    (dict(score="bogus"), "score must be one of"), (dict(score="additive"), "hidden .* is required"),
    (dict(hidden=2), "applies to score='additive' only"),
    (dict(score="additive", hidden=2, scale=0.5), "does not apply to score='additive'"),
    (dict(score="additive", hidden=0), "hidden must be a positive integer")])
def test_bad_scores_are_spec_errors(kwargs, message):
    with pytest.raises(SpecError, match=message):
        AttentionSpec(2, 2, 2, **kwargs)


def test_cli_score_errors(capsys):
    assert main(["derive", "--n-q", "2", "--d-model", "4", "--heads", "2", "--score", "additive"]) == 2
    assert "MultiHeadSpec.hidden (the additive score's d_a tanh units) is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["derive", "--n-q", "2", "--n-k", "2", "--d-k", "2", "--score", "nope"])


@pytest.mark.parametrize("fmt, marks", [("text", ["dWa[a, r] =", "tanh"]),
                                        ("latex", [r"{\mathrm{d}W_a}_{a,r}", r"\tanh"]),
                                        ("markdown", [r"{\mathrm{d}v_a}_{r}", "```math"])])
def test_derive_prints_the_parameter_gradients(fmt, marks, capsys):
    assert main(["derive", "--score", "additive", "--hidden", "2", "--n-q", "2", "--n-k", "2", "--d-k", "1",
                 "--format", fmt, "-q"]) == 0
    out = capsys.readouterr().out
    for mark in marks:
        assert mark in out, mark


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (CI installs it)")
@pytest.mark.parametrize("variant", [*SPECS.values(), dict(score_mod="relative-bias:1", mask="window:1"),
                                     dict(score_mod="alibi", mask="prefix:1|causal"),
                                     dict(score="additive", hidden=2, score_mod="softcap:3"),
                                     dict(score="cosine", score_mod="alibi:heads=4")], ids=repr)
def test_variant_documents_compile(variant, tmp_path):
    spec = AttentionSpec(2, 3, 2, **variant)
    (tmp_path / "d.tex").write_text(symattn.derive(spec).to_tex_document())
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "d.tex"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    assert (tmp_path / "d.pdf").stat().st_size > 10_000


def test_adding_a_score_needs_only_its_formula_and_its_name(monkeypatch, tmp_path):
    """README's "Adding a variant": a scaled bilinear score with a key bias, declared here, is derived, proven
    (its new parameter too) and generated as kernels that agree with its exact symbolic values."""
    from symattn.check.verification import _unrolled_call, evaluate
    from symattn.numeric.kernels import load_unrolled
    _add_biased(monkeypatch)
    spec = AttentionSpec(2, 3, 2, score="biased")
    d = symattn.derive(spec)
    assert d.proved and {"dWg", "dwb"} <= {p.step for p in d.proofs if p.kind == "gradient"}
    rng = np.random.default_rng(3)
    x = {n: rng.integers(-8, 9, size=shape) / 8 for n, shape in
         {"Q": (2, 2), "K": (3, 2), "V": (3, 2), "Wg": (2, 2), "wb": (2,), "dO": (2, 2)}.items()}
    exact = evaluate(d, x, [s.key for s in d.steps if not s.is_input and s.key not in ("jacobian", "weighted_values", "sum")])
    f, g = _unrolled_call(spec, load_unrolled(spec, tmp_path))
    arrays = [x[n] for n in ("Q", "K", "V", "Wg", "wb")]
    np.testing.assert_allclose(f(*arrays), exact["O"], rtol=1e-12)
    for got, name in zip(g(*arrays, x["dO"]), ("dQ", "dK", "dV", "dWg", "dwb")):
        np.testing.assert_allclose(got, exact[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_the_oracle_names_each_scores_parameters_as_the_derivation_declares_them():
    """symattn.reference checks a score's parameters by name without SymPy (symbolic.spec.PARAMS): the table must
    be the declared one."""
    from symattn.symbolic.spec import PARAMS
    assert PARAMS == {name: tuple(p.name for p in s.params) for name, s in SCORES.items()}


@pytest.mark.parametrize("options, words", [(dict(score="general"), "score 'general' needs params 'W_a'"),
                                            (dict(score="bogus"), "score must be one of"),
                                            (dict(score="additive", params={"W_a": 1}), "'U_a', 'v_a', 'b_a'")])
def test_the_oracle_names_a_missing_score_or_parameter(options, words):
    """It once failed inside NumPy (KeyError 'W_a' for an unknown score too); library mod and mask texts are
    taken, as symattn.attention takes them."""
    q = np.ones((2, 3))
    with pytest.raises(symattn.SpecError, match=re.escape(words)):
        reference.attention(q, q, q, **options)
    np.testing.assert_allclose(reference.attention(q, q, q, score_mod="softcap:5", mask_mod="causal"),
                               reference.attention(q, q, q, score_mod=mods.softcap(5), mask_mod=masks.causal))


@pytest.mark.parametrize("score", ["general", "additive", "cosine"])
def test_the_oracle_checks_each_parameters_shape_as_the_derivation_declares_it(score):
    """Shapes from the declared dims (d_k = 3, d_a = 2, one = 1) are taken; one dim off in any parameter is named
    (a wrong shape failed inside NumPy's matmul, or broadcast into a wrong answer)."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 3))
    sizes = {"d_k": 3, "d_a": 2, "one": 1}
    good = {p.name: rng.standard_normal(tuple(sizes[d] for d in p.dims)) for p in SCORES[score].params}
    assert reference.attention(q, q, q, score=score, params=good).shape == (2, 3)
    for p in SCORES[score].params:
        shape = list(good[p.name].shape)
        shape[-1] += 1
        with pytest.raises(SpecError, match=f"parameter '{p.name}' of score '{score}' must have shape"):
            reference.attention(q, q, q, score=score, params={**good, p.name: np.ones(shape)})


def test_the_oracle_gives_a_nan_row_where_a_visible_score_is_plus_infinity():
    """torch.softmax of [0, inf, 0] is NaN throughout, as the kernels give; the oracle gave [0, NaN, 0]."""
    q, k, v = np.ones((1, 2)), np.ones((3, 2)), np.ones((3, 2))
    mask = np.array([[0.0, np.inf, 0.0]])
    assert np.isnan(reference.weights(q, k, mask=mask)).all()
    assert np.isnan(symattn.attention(q, k, v, mask=mask)).all() and np.isnan(reference.attention(q, k, v, mask=mask)).all()


def _add_biased(monkeypatch) -> None:
    """The README's worked example as a contributor makes it: the score in score.py, the regenerated name table
    (score_names.py as `symattn generate --all` renders it, loaded in place of the committed one) and the NumPy
    formula in reference.py, nothing else."""
    from symattn.codegen import names
    from symattn.numeric import reference as ref
    from symattn.symbolic import score as scores, score_names, spec as specs

    def biased(q, k, theta, total):  # score.py, the README's example verbatim
        W, w = theta["W_a"], theta["w_a"]
        return total(lambda a: q(a) * total(lambda b: W(a, b) * k(b), "d_k"), "d_k") + \
            total(lambda a: w(a) * k(a), "d_k")
    w_a = scores.Param("w_a", "wb", "w_a", "wb", "w^{b}", ("d_k",))
    new = scores.Score("biased", "Bilinear similarities with a key bias",
                       r"s_{ij} = \tau(q_i W_a k_j^\top + w_a k_j^\top)",
                       "A learned bilinear form plus a learned preference for some keys.",
                       (scores.W_GENERAL, w_a), biased, lambda n: n["d_k"] ** 2 + n["d_k"],
                       text="scale (q W_a k^T + w_a.k)")
    monkeypatch.setitem(scores.SCORES, "biased", new)
    table = {}
    exec(names.render(), table)  # the regenerated score_names.py
    for name, value in table["PARAMS"].items():
        monkeypatch.setitem(score_names.PARAMS, name, value)  # the one dict spec, reference and limits read
    monkeypatch.setattr(specs, "SCORES", tuple(table["PARAMS"]))
    assert table["PARAMS"]["biased"] == ("W_a", "w_a") and "biased" not in table["UNSCALED"]
    scores_of, backward_of = ref.scores, ref.score_backward

    def numpy_scores(q, k, *, score="dot", params=None, scale=None):  # reference.py, the README's example
        if score != "biased":
            return scores_of(q, k, score=score, params=params, scale=scale)
        scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
        return scale * (q @ params["W_a"] @ np.swapaxes(k, -1, -2) + (k @ params["w_a"])[..., None, :])

    def numpy_backward(q, k, dS, *, score="dot", params=None, scale=None):
        if score != "biased":
            return backward_of(q, k, dS, score=score, params=params, scale=scale)
        scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
        W, w, dST = params["W_a"], params["w_a"], np.swapaxes(dS, -1, -2)
        return {"q": scale * dS @ k @ W.T, "k": scale * (dST @ q @ W + dS.sum(axis=-2)[..., None] * w),
                "W_a": scale * np.einsum("...ia,...ij,...jb->ab", q, dS, k),
                "w_a": scale * np.einsum("...j,...jb->b", dS.sum(axis=-2), k)}
    monkeypatch.setattr(ref, "scores", numpy_scores)
    monkeypatch.setattr(ref, "score_backward", numpy_backward)
    monkeypatch.setattr(ref, "WRITTEN", ref.WRITTEN + ("biased",))


def test_an_added_score_is_verified_four_ways(monkeypatch):
    """With its formula, its regenerated name and its NumPy formula, the README's new score passes verify:
    exact values, unrolled and loop kernels (f64, f32), the reference, finite differences of every parameter."""
    from symattn.check.verification import verify
    _add_biased(monkeypatch)
    report = verify(AttentionSpec(2, 3, 2, score="biased"))
    assert report.passed, report.failures()
    assert {"dWg", "dwb"} <= {c.tensor for c in report.gradcheck.comparisons}
    assert {"loop kernel f32", "NumPy reference f64"} <= {c.path for c in report.comparisons}


def test_a_score_without_its_numpy_formula_is_named(monkeypatch):
    """A score added to score.py but not to the reference: verify's oracle says where the formula goes (it once
    fell into the additive branch: KeyError 'U_a')."""
    from symattn.numeric import reference as ref
    _add_biased(monkeypatch)
    monkeypatch.setattr(ref, "WRITTEN", tuple(n for n in ref.WRITTEN if n != "biased"))
    q = np.ones((2, 2))
    with pytest.raises(SpecError, match=r"no NumPy formula for score 'biased'.*reference\.py"):
        reference.attention(q, q, q, score="biased", params={"W_a": np.eye(2), "w_a": np.ones(2)})
