"""Score mods (issue 8): ALiBi, soft-cap and a learned relative-position bias, applied to any score, derived (their
slope ∂f/∂s and parameter gradients by SymPy), proven, printed, generated and verified."""
import dataclasses
from fractions import Fraction

import numpy as np
import pytest

import symattn
from conftest import reference_gradcheck
from symattn import AttentionSpec, SpecError, reference
from symattn.app.cli import main
from symattn.symbolic.mods import alibi, mod_of, parse, relative_bias, softcap


@pytest.mark.parametrize("mod", ["alibi", "alibi:1/8", "softcap:5", "relative-bias:1"])
@pytest.mark.parametrize("score", [dict(), dict(score="additive", hidden=2)], ids=["dot", "additive"])
def test_modded_derivations_are_proven(mod, score):
    spec = AttentionSpec(2, 3, 2, score_mod=mod, mask="causal", **score)
    d = symattn.derive(spec)
    assert d.proved, [p.failure for p in d.proofs if not p.passed]
    keys = [s.key for s in d.steps]
    assert keys.index("mod") < keys.index("softmax") and keys.index("dS") < keys.index("dSr") < keys.index("dQ")
    gradients = {p.step for p in d.proofs if p.kind == "gradient"}
    assert ("dBrel" in gradients) == mod.startswith("relative-bias")


def test_the_mods_formulas():
    d = symattn.derive(AttentionSpec(2, 3, 1, score_mod="relative-bias:1"), prove=False)
    s, sr, B = d.step("mod").explicit, d.table["Sr"], d.table["Brel"]
    assert s[0, 2] == sr[0, 2] + B[2] and s[1, 0] == sr[1, 0] + B[0] and s[1, 1] == sr[1, 1] + B[1]  # clip(j - i)
    a = symattn.derive(AttentionSpec(2, 3, 1, score_mod="alibi"), prove=False).step("mod").explicit
    assert a[1, 0] - sr[1, 0] == Fraction(-1, 256) and a[0, 2] - sr[0, 2] == Fraction(2, 256)  # slope·(j − i)


def test_a_wrong_mod_gradient_fails_its_proof():
    d = symattn.derive(AttentionSpec(2, 2, 1, score_mod="relative-bias:1"), prove=False)
    step = d.step("dBrel")
    d = dataclasses.replace(d, steps=tuple(dataclasses.replace(step, explicit=step.explicit * 2) if s.key == "dBrel"
                                           else s for s in d.steps))
    failed = {p.step for p in symattn.prove(d).proofs if not p.passed}
    assert "dBrel" in failed and "dQ" not in failed


@pytest.mark.parametrize("mod", ["alibi", "softcap:2", "relative-bias:2"])
def test_reference_mods_agree_with_finite_differences(mod, rng):
    m = parse(mod)
    params = {"B_rel": rng.normal(size=5)} if mod.startswith("relative") else {}
    arrays = {"q": rng.normal(size=(2, 3, 2)), "k": rng.normal(size=(2, 5, 2)), "v": rng.normal(size=(1, 5, 3)),
              **params}
    report = reference_gradcheck(arrays, params, score_mod=m, mask=np.tril(np.ones((3, 5), bool), 1))
    assert report.passed, [c.failure() for c in report.comparisons if not c.passed]


def test_softcap_bounds_the_scores(rng):
    q, k = rng.normal(size=(4, 3)) * 100, rng.normal(size=(5, 3)) * 100
    S = reference.modded(reference.scores(q, k), softcap(5))
    assert np.abs(S).max() <= 5 and np.abs(reference.scores(q, k)).max() > 50  # tanh saturates to 1.0 in floats


@pytest.mark.parametrize("argv", [
    ["--score-mod", "alibi", "--mask", "window:2", "--n-q", "4", "--n-k", "4", "--d-k", "2"],
    ["--score-mod", "relative-bias:2", "--score", "general", "--n-q", "3", "--n-k", "4", "--d-k", "2"],
    ["--score-mod", "softcap:3", "--causal", "--n-q", "3", "--n-k", "3", "--d-k", "2"]])
def test_verify_modded(argv, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SYMATTN_CACHE", str(tmp_path))
    assert main(["verify", *argv, "-q"]) == 0
    out = capsys.readouterr().out
    assert "all paths agree" in out
    if "relative-bias:2" in argv:  # the table's gradient: symbolic vs unrolled vs NumPy, and finite differences
        assert len([line for line in out.splitlines() if line.split()[:1] == ["dBrel"]]) == 3


def test_mod_texts_and_errors():
    assert alibi() == parse("alibi") and alibi("1/8").text == "alibi:1/8" and relative_bias(3).text == "relative-bias:3"
    assert mod_of("none") is None and AttentionSpec(2, 2, 2, score_mod=softcap(30)).score_mod == "softcap:30"
    assert AttentionSpec(2, 2, 2, score_mod="relative-bias:3").sizes["n_rel"] == 7
    for bad, message in (("bogus", "unknown score mod"), ("softcap:0", "positive number"),
                         ("relative-bias:99999", "unknown score mod")):
        with pytest.raises(SpecError, match=message):
            AttentionSpec(2, 2, 2, score_mod=bad)
    assert main(["derive", "--n-q", "2", "--d-model", "4", "--heads", "2", "--score-mod", "alibi"]) == 2
