"""MultiHeadSpec takes AttentionSpec's variant (score, score_mod, mask): every head computes it, the score's and
the mod's parameters θ are shared by all heads (dθ sums the heads' contributions), a mod's h is the head. Derived,
proven, verified four ways with finite differences, generated and printed from the command line.

Small on purpose (the suite's time budget): n_q 2-3, d_model 4, 2 heads, d_a 2; the additive case uses the
score, mod and mask of the CLI command, so its kernels compile once for both tests."""
import shutil
import subprocess

import numpy as np
import pytest
import sympy

import symattn
from symattn import MultiHeadSpec, SpecError, reference
from symattn.app.cli import main
from symattn.check.verification import verify_multihead
from symattn.mods import mod_of
from symattn.masks import mask_of
from symattn.symbolic.tensors import flat
from conftest import tampered

CLI = ["--d-model", "4", "--heads", "2", "--n-q", "3", "--score", "additive", "--hidden", "2",
       "--score-mod", "alibi:heads=2", "--mask", "window:2"]
CLI_SPEC = MultiHeadSpec(3, 4, 2, score="additive", hidden=2, score_mod="alibi:heads=2", mask="window:2")
#: (a) additive score, (b) per-head ALiBi with the causal mask, (c) Luong's general score under a window
DERIVED = {"additive": MultiHeadSpec(2, 4, 2, score="additive", hidden=2),
           "alibi": MultiHeadSpec(2, 4, 2, score_mod="alibi:heads=2", mask="causal"),
           "general": MultiHeadSpec(2, 4, 2, score="general", mask="window:1")}
THETA = {"additive": {"dWa", "dUa", "dva", "dba"}, "alibi": set(), "general": {"dWg"}}


@pytest.fixture(scope="module")
def derived():
    return {key: symattn.derive_multihead(spec) for key, spec in DERIVED.items()}


def test_the_layer_spec_takes_the_variant_and_gives_it_to_every_head():
    spec = CLI_SPEC
    assert spec.head == symattn.AttentionSpec(3, 3, 2, 2, score="additive", hidden=2, score_mod="alibi:heads=2",
                                              mask="window:2")
    assert spec.name == "mha_q3_dm4_h2_kv2_dk2_dv2_additive_da2_alibiheads2_window2"
    assert "additive score, d_a=2, alibi heads=2, window 2 mask" in spec.title
    assert spec.sizes["d_a"] == 2 and not spec.visible(0, 1) and spec.visible(2, 0)
    from symattn.app.cli import _spec, build_parser  # cli_args rebuilds the spec
    assert _spec(build_parser().parse_args(["derive", *spec.cli_args().replace("'", "").split()])) == spec
    assert "score=" not in repr(MultiHeadSpec(3, 4, 2)) and "score='additive'" in repr(spec)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask="diag"), r"MultiHeadSpec\.mask: unknown mask 'diag'"),
    (dict(score="bogus"), r"MultiHeadSpec\.score must be one of"),
    (dict(score="additive"), r"MultiHeadSpec\.hidden .* is required"),
    (dict(hidden=2), r"MultiHeadSpec\.hidden applies to score='additive' only"),
    (dict(score="cosine", scale=2), r"MultiHeadSpec\.scale does not apply to score='cosine'"),
    (dict(score_mod="softcap"), r"MultiHeadSpec\.score_mod: unknown score mod"),
    (dict(score_mod="alibi:heads=4"), r"MultiHeadSpec\.score_mod 'alibi:heads=4' has one slope per head of 4 heads"),
])
def test_bad_variant_fields_name_the_field(kwargs, message):
    with pytest.raises(SpecError, match=message):
        MultiHeadSpec(3, 4, 2, **kwargs)


@pytest.mark.parametrize("key", DERIVED)
def test_layer_variants_are_proven_parameter_gradients_included(derived, key):
    d = derived[key]
    assert d.proved, [p.failure for p in d.proofs if not p.passed]
    gradients = {p.step for p in d.proofs if p.kind == "gradient"}
    assert gradients == {"dWq", "dWk", "dWv", "dWo", "dX"} | THETA[key]
    for name in THETA[key]:  # one step sums the heads' contributions, over shared symbols
        theta = name[1:]
        assert [s.key for s in d.steps if s.tensor == theta] == [theta]  # θ is a layer input, listed once
        assert all(child[theta] is d.table[theta] for child in d.table.children.values())
        step, heads = d.step(name), d.table.children.values()
        assert flat(step.explicit) == [sum(x) for x in zip(*(flat(child[name]) for child in heads))]
        assert [s.key for s in d.steps if s.tensor == name] == ["h0." + name, "h1." + name, name]
        assert isinstance(step.rhs, sympy.Sum) and step.matrix is not None
        assert "$" in step.explanation and "shared by all heads" in step.explanation


def test_alibi_heads_gives_each_head_its_slope(derived):
    """Head h's mod is s + 2^(-8(h+1)/2)(j - i): slopes 1/16 and 1/256, b = 0, as FlexAttention's h."""
    d = derived["alibi"]
    for h, slope in ((0, sympy.Rational(1, 16)), (1, sympy.Rational(1, 256))):
        step = d.step(f"h{h}.mod")
        sbar = d.table.children[str(h)]["Sr"]
        assert step.explicit[1, 0] - sbar[1, 0] == -slope  # key 0 is one before query 1


def test_a_wrong_parameter_gradient_fails_its_proof(derived):
    d = derived["general"]
    wrong = tampered(d, "dWg", explicit=d.step("dWg").explicit * 2)
    failed = {(p.kind, p.step) for p in symattn.prove(wrong).proofs if not p.passed}
    assert ("gradient", "dWg") in failed and ("gradient", "dWq") not in failed


@pytest.mark.parametrize("spec", [CLI_SPEC, DERIVED["alibi"], DERIVED["general"]], ids=lambda s: s.name)
def test_verify_multihead_checks_every_parameter_four_ways(spec):
    report = verify_multihead(spec)
    assert report.passed, report.failures()
    theta = {"d" + p.tensor for p in symattn.symbolic.derive.parameters(spec)}
    paths = {(c.tensor, c.path) for c in report.comparisons}
    for name in theta | {"dX", "dWq"}:
        assert {(name, "unrolled kernel f64"), (name, "loop kernel f32"), (name, "NumPy reference f64")} <= paths
    assert theta | {"dX"} <= {c.tensor for c in report.gradcheck.comparisons}  # finite differences


def test_the_numeric_layer_returns_shared_parameter_gradients(rng):
    """Batched x, the CLI's variant: the numeric layer's output and gradients (θ summed over heads and batch) match
    the NumPy reference, and θ's gradients match finite differences."""
    x = rng.standard_normal((2, 3, 4))
    w = [rng.standard_normal((4, 4)) / 2 for _ in range(4)]
    theta = {"W_a": rng.standard_normal((2, 2)), "U_a": rng.standard_normal((2, 2)), "v_a": rng.standard_normal(2),
             "b_a": rng.standard_normal(2)}
    options = dict(heads=2, score="additive", score_mod="alibi:heads=2", mask_mod="window:2")
    out, pullback = symattn.multihead_attention_vjp(x, *w, params=theta, **options)
    dO = rng.standard_normal(out.shape)
    grads = pullback(dO)
    ref = dict(options, score_mod=mod_of("alibi:heads=2"), mask_mod=mask_of("window:2"), params=theta)
    np.testing.assert_allclose(out, reference.multihead_attention(x, *w, **ref), rtol=1e-12, atol=1e-12)
    want = reference.multihead_attention_backward(x, *w, dO, **ref)
    assert sorted(grads) == sorted(want) == sorted(["x", "w_q", "w_k", "w_v", "w_o", *theta])
    for name in want:
        np.testing.assert_allclose(grads[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)
    names = list(theta)

    def f(*values):
        return symattn.multihead_attention(x, *w, params=dict(zip(names, values)), **options)

    def g(*values):
        *values, d = values
        g = symattn.multihead_attention_backward(x, *w, d, params=dict(zip(names, values)), **options)
        return [g[n] for n in names]
    report = symattn.gradcheck(f, theta, g)
    assert report.passed, str(report)


@pytest.mark.parametrize("fmt, marks", [("text", ["Head 1: Score mod: alibi:heads=2", "dWa[a, r] = Sum(dWa[h', a, r]"]),
                                        ("latex", [r"\mathrm{d}W_a &= \mathrm{d}W_a^{(0)} + \mathrm{d}W_a^{(1)}"]),
                                        ("markdown", [r"{\mathrm{d}v_a}_{r} &= \sum_{h'=0}^{H - 1}"])])
def test_derive_prints_the_layer_variant(fmt, marks, capsys):
    assert main(["derive", *CLI, "--format", fmt, "-q", "--no-prove"]) == 0
    out = capsys.readouterr().out
    for mark in marks:
        assert mark in out, mark


def test_the_cli_derives_verifies_and_generates_the_layer_variant(tmp_path, capsys):
    tex = tmp_path / "layer.tex"
    assert main(["derive", *CLI, "--format", "tex", "-o", str(tex), "-q", "--no-prove"]) == 0  # proofs: above
    assert main(["verify", *CLI, "-q"]) == 0
    assert "all paths agree" in capsys.readouterr().out
    assert main(["generate", *CLI, "-o", str(tmp_path), "-q"]) == 0
    assert (tmp_path / f"{CLI_SPEC.name}.py").is_file()
    assert main(["verify", *CLI[:-2], "--mask", "nope", "-q"]) == 2
    assert "symattn: error: MultiHeadSpec.mask: unknown mask 'nope'" in capsys.readouterr().err
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed (CI installs it)")
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
