"""Score mods (issue 8): ALiBi, soft-cap and a learned relative-position bias, applied to any score, derived (their
slope ∂f/∂s and parameter gradients by SymPy), proven, printed, generated and verified."""
import math
import re
import shutil
import subprocess
import warnings
from fractions import Fraction

import numpy as np
import pytest
import sympy

import symattn
from conftest import reference_gradcheck, tampered
from symattn import AttentionSpec, InputError, SpecError, reference
from symattn.app.cli import main
from symattn.numeric import kernels
from symattn.symbolic import masks
from symattn.symbolic.mods import alibi, mod_of, ops, parse, relative_bias, score_mod, softcap, table


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
    d = tampered(d, "dBrel", explicit=d.step("dBrel").explicit * 2)
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
def test_verify_modded(argv, capsys):
    assert main(["verify", *argv, "-q"]) == 0
    out = capsys.readouterr().out
    assert "all paths agree" in out
    if "relative-bias:2" in argv:  # the table's gradient: symbolic vs unrolled vs NumPy, and finite differences
        assert len([line for line in out.splitlines() if line.split()[:1] == ["dBrel"]]) == 5  # unrolled, loop f64 and f32, NumPy, finite differences


def test_mod_texts_and_errors():
    assert alibi() == parse("alibi") and alibi("1/8").text == "alibi:1/8" and relative_bias(3).text == "relative-bias:3"
    assert mod_of("none") is None and AttentionSpec(2, 2, 2, score_mod=softcap(30)).score_mod == "softcap:30"
    assert AttentionSpec(2, 2, 2, score_mod="relative-bias:3").sizes["n_rel"] == 7
    for bad, message in (("bogus", "unknown score mod"), ("softcap:0", "positive number"),
                         ("relative-bias:99999", "unknown score mod")):
        with pytest.raises(SpecError, match=message):
            AttentionSpec(2, 2, 2, score_mod=bad)
    assert main(["derive", "--n-q", "2", "--d-model", "4", "--heads", "2", "--score-mod", "alibi:heads=4"]) == 2


# -- per-head ALiBi ---------------------------------------------------------------------------------------------

def test_per_head_alibi_slopes(rng):
    mod = alibi(heads=8)
    assert mod.text == "alibi:heads=8" and parse("alibi:heads=8").text == mod.text and alibi().text == "alibi"
    assert [mod.slope(h) for h in (0, 7)] == [0.5, 2.0 ** -8] and alibi().slope(3) == 2.0 ** -8
    q, k, v = rng.normal(size=(2, 3, 4, 2)), rng.normal(size=(2, 3, 5, 2)), rng.normal(size=(2, 3, 5, 2))
    O = reference.attention(q, k, v, score_mod=alibi(heads=3))
    distance = np.arange(5)[None, :] - np.arange(4)[:, None]
    for h in range(3):  # head h: the float mask 2^(-8(h+1)/3)·(j − i), written independently
        np.testing.assert_allclose(O[:, h], reference.attention(q[:, h], k[:, h], v[:, h],
                                                                mask=2.0 ** (-8 * (h + 1) / 3) * distance), rtol=1e-13)
    np.testing.assert_allclose(reference.attention(q, k, v, score_mod=alibi(heads=1))[:, 0],
                               reference.attention(q[:, 0], k[:, 0], v[:, 0], score_mod=alibi()), rtol=1e-13)


def test_per_head_alibi_derivation_shows_m_h():
    d = symattn.derive(AttentionSpec(2, 3, 1, score_mod="alibi:heads=8"))
    assert d.proved
    from symattn.symbolic.tensors import HEAD
    assert HEAD in d.step("mod").rhs.free_symbols and "m_h" in d.step("mod").explanation
    sr = d.table["Sr"]
    assert d.step("mod").explicit[1, 0] - sr[1, 0] == Fraction(-1, 2)  # head 0 of 8: m_0 = 2^-1


# -- a user's score mod, traced ---------------------------------------------------------------------------------

def _clipped_bias(score, b, h, q_idx, kv_idx):
    return score + _TABLE[ops.minimum(ops.maximum(kv_idx - q_idx, -1), 1) + 1]


_TABLE = None


def test_a_traced_bias_is_the_library_relative_bias(rng):
    global _TABLE
    _TABLE = table("rb", 3)
    mod = score_mod(_clipped_bias)
    assert mod.kind == "user" and mod.text.startswith("user_") and score_mod(_clipped_bias).text == mod.text
    assert mod_of(_clipped_bias).text == mod.text and AttentionSpec(2, 2, 1, score_mod=mod).score_mod == mod.text
    d = symattn.derive(AttentionSpec(2, 3, 1, score_mod=mod, mask="causal"))
    assert d.proved and "dthrb" in {p.step for p in d.proofs if p.kind == "gradient"}
    q, k, v, dO = (rng.normal(size=s) for s in ((2, 3, 2), (2, 4, 2), (2, 4, 3), (2, 3, 3)))
    B = rng.normal(size=3)
    ours = reference.gradients(q, k, v, dO, score_mod=mod, params={"rb": B})
    library = reference.gradients(q, k, v, dO, score_mod=relative_bias(1), params={"B_rel": B})
    for name, other in (("q", "q"), ("k", "k"), ("v", "v"), ("rb", "B_rel")):
        np.testing.assert_allclose(ours[name], library[other], rtol=1e-12, err_msg=name)


def test_a_traced_mod_with_where_and_a_per_head_table_agrees_with_finite_differences(rng):
    def mod(score, b, h, q_idx, kv_idx, theta):  # declared params, FlexAttention's bias[h, distance]
        boosted = ops.where(kv_idx > q_idx, 2 * score, ops.maximum(score, -1))
        return boosted + theta["hb"][h, kv_idx - q_idx + 3]
    traced = score_mod(mod, params={"hb": (2, 7)}, name="gated_bias")
    assert traced.text == "gated_bias" and mod_of("gated_bias") is traced
    hb = rng.normal(size=(2, 7))
    arrays = {"q": rng.normal(size=(1, 2, 3, 2)), "k": rng.normal(size=(1, 2, 4, 2)),
              "v": rng.normal(size=(1, 2, 4, 2)), "hb": hb}
    report = reference_gradcheck(arrays, {"hb": hb}, score_mod=traced)
    assert report.passed, [c.failure() for c in report.comparisons if not c.passed]
    d = symattn.derive(AttentionSpec(2, 3, 1, score_mod=traced))
    assert d.proved, [p.failure for p in d.proofs if not p.passed]


def test_a_traced_mod_is_verified_four_ways():
    mod = score_mod(lambda score, b, h, q_idx, kv_idx: 3 * ops.tanh(score / 3) - abs(kv_idx - q_idx) / 4)
    report = symattn.verify(AttentionSpec(3, 3, 2, score_mod=mod))
    assert report.passed, report.failures()
    assert {c.path for c in report.comparisons} >= {"unrolled kernel f64", "NumPy reference f64"}


def test_the_identity_mod_is_a_score(rng):
    """FlexAttention's noop score_mod returns the score unchanged: a SymPy Symbol, which SymPy also counts as a
    Boolean, was refused as 'not a score'. It is the plain attention, values and gradients, and is verified."""
    def noop(score, b, h, q_idx, kv_idx):
        return score
    q, k, v, dO = (rng.normal(size=(2, 4, 3)) for _ in range(4))
    np.testing.assert_allclose(symattn.attention(q, k, v, score_mod=noop), symattn.attention(q, k, v), rtol=1e-13)
    O, pullback = symattn.attention_vjp(q, k, v, score_mod=noop)
    for got, want in zip((pullback(dO)[x] for x in "qkv"), symattn.attention_backward(q, k, v, dO)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    report = symattn.verify(AttentionSpec(3, 3, 2, score_mod=score_mod(noop)))
    assert report.passed, report.failures()


@pytest.mark.parametrize("fn, operation", [
    (lambda s, b, h, q, kv: math.sin(s), "math.sin"),
    (lambda s, b, h, q, kv: s if s > 0 else -s, "truth value"),
    (lambda s, b, h, q, kv: sympy.sin(s), "uses sin"),
    (lambda s, b, h, q, kv: q >= kv, "not a score"),
    (lambda s, b, h, q, kv: ops.where(q >= kv, s, -math.inf), "mask_mod"),
    (lambda s, b, h, q, kv: ops.where(q == kv, 2 * s, s), "ops.eq"),
])
def test_unsupported_operations_are_named(fn, operation):
    with pytest.raises(SpecError, match=re.escape(operation)) as error:
        score_mod(fn)
    assert "ops.where" in str(error.value) or "mask_mod" in operation or "not a score" in operation


def test_a_torch_function_is_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(SpecError, match="torch.tanh") as error:
        score_mod(lambda s, b, h, q, kv: torch.tanh(s))
    assert "ops.tanh" in str(error.value)


def test_a_table_read_out_of_range_is_refused(rng):
    small = table("small", 2)
    mod = score_mod(lambda score, b, h, q_idx, kv_idx: score + small[kv_idx - q_idx])
    with pytest.raises(SpecError, match="outside the table"):
        symattn.derive(AttentionSpec(2, 3, 1, score_mod=mod), prove=False)
    with pytest.raises(IndexError, match="outside its shape"):
        reference.gradients(*(rng.normal(size=(3, 1)),) * 4, score_mod=mod, params={"small": np.zeros(2)})


def test_the_numeric_api_refuses_a_table_read_out_of_range_before_any_kernel(rng, monkeypatch):
    """kv_idx - q_idx + 2 fits a 5-entry table for n <= 3 only: at n = 4 the kernels would read and scatter outside
    the table (found: wrong, changing outputs, then a heap corruption). Refused with the first read outside, in the
    API (head dims included) and the layer, before any kernel; in range it runs and agrees with the reference."""
    bias5 = table("bias5", 5)
    mod = score_mod(lambda score, b, h, q_idx, kv_idx: score + bias5[kv_idx - q_idx + 2 + h])
    theta = {"bias5": rng.normal(size=5)}
    q, k, v = rng.normal(size=(2, 1, 3, 2)), rng.normal(size=(2, 1, 3, 2)), rng.normal(size=(2, 1, 3, 2))
    np.testing.assert_allclose(symattn.attention(q, k, v, score_mod=mod, params=theta),
                               reference.attention(q, k, v, score_mod=mod, params=theta), rtol=1e-10)
    monkeypatch.setattr(kernels, "load_variant", lambda *a: pytest.fail("a kernel was loaded"))
    for shapes, where in [(((4, 2),) * 3, "bias5[5] at b=0, h=0, q_idx=0, kv_idx=3"),
                          (((1, 2, 3, 2),) * 3, "bias5[5] at b=0, h=1, q_idx=0, kv_idx=2")]:
        with pytest.raises(InputError, match=re.escape(where) + ".*outside its shape"):
            symattn.attention_vjp(*(rng.normal(size=s) for s in shapes), score_mod=mod, params=theta)
    x = rng.normal(size=(1, 4, 4))
    w = [rng.normal(size=(4, 4)) for _ in range(4)]
    with pytest.raises(InputError, match="outside its shape"):
        symattn.multihead_attention(x, *w, heads=1, score_mod=mod, params=theta)


@pytest.mark.parametrize("fn, words", [
    (lambda s, b, h, q, kv: s + _BY[s], "bybias[score]"),
    (lambda s, b, h, q, kv: s + _BY[q / 2], "no division"),
    (lambda s, b, h, q, kv: s + _BY[_BY[q]], "no other table"),
    (lambda s, b, h, q, kv: s + 10 ** 400, "401 digits, beyond float64"),
    (lambda s, b, h, q, kv: s * 10 ** 400, "401 digits, beyond float64"),
    (lambda s, b, h, q, kv: s * 1e300 * 1e300, "beyond float64's range (about 1.8e308): 1.000e+600"),
    (lambda s, b, h, q, kv: s + _BY[kv + 2 ** 64], "constants below 2^31"),
])
def test_table_indices_and_constants_the_kernels_cannot_compute_are_refused_at_trace(fn, words):
    """Once traced, T[score] failed inside the printer (a raw ValueError) and 10**400 inside Numba (a TypingError,
    with a broken file left in the kernel cache)."""
    with pytest.raises(SpecError, match=re.escape(words)):
        score_mod(fn)


_BY = table("bybias", 4)


@pytest.mark.parametrize("fn, words", [(lambda s, b, h, q, kv: s + ops.exp(1000.0), "gives oo"),
                                       (lambda s, b, h, q, kv: s + ops.log(0.0), "gives -oo")])
def test_a_constant_that_overflows_is_named_without_a_numpy_warning(fn, words):
    """ops.exp(1000.0) on a plain number went through NumPy, which printed a RuntimeWarning before the error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SpecError, match=words):
            score_mod(fn)


def test_reference_mask_mod_over_index_grids(rng):
    q, k, v = rng.normal(size=(2, 3, 4, 2)), rng.normal(size=(2, 3, 4, 2)), rng.normal(size=(2, 3, 4, 2))
    window = masks.sliding_window(1)
    banded = AttentionSpec(4, 4, 2, mask="window:1").mask_array()
    np.testing.assert_array_equal(reference.attention(q, k, v, mask_mod=window), reference.attention(q, k, v, mask=banded))

    def per_head(b, h, q_idx, kv_idx):  # head h sees h keys back, batch 1 also the first key
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= h) | ((b == 1) & (kv_idx == 0))
    O = reference.attention(q, k, v, mask_mod=per_head)
    for b_, h_ in np.ndindex(2, 3):
        visible = np.array([[bool(per_head(b_, h_, i, j)) for j in range(4)] for i in range(4)])
        np.testing.assert_allclose(O[b_, h_], reference.attention(q[b_, h_], k[b_, h_], v[b_, h_], mask=visible))


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (CI installs it)")
def test_a_traced_mod_document_compiles(tmp_path):
    gate = table("gate", 3)

    def gated(score, b, h, q_idx, kv_idx):
        return ops.where(kv_idx >= q_idx, ops.maximum(score, -2), score * gate[kv_idx]) + ops.exp(-abs(kv_idx - q_idx))
    d = symattn.derive(AttentionSpec(2, 3, 2, score_mod=score_mod(gated)))
    assert d.proved, [p.failure for p in d.proofs if not p.passed]
    (tmp_path / "d.tex").write_text(d.to_tex_document())
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "d.tex"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]


# -- descriptions: mathematics, typeset in LaTeX and Markdown, Unicode in text -------------------------------------

@pytest.mark.parametrize("text, unicode", [
    ("alibi", "f(s) = s + m (j − i) with slope m = 1/256"), ("alibi:1/8", "slope m = 1/8"),
    ("alibi:heads=4", "f(s) = s + m_h (j − i)"), ("softcap:3", "f(s) = c tanh(s/c) with c = 3"),
    ("relative-bias:2", "f(s) = s + B_rel[clip(j − i, −d, d) + d], d = 2")])
def test_library_mod_descriptions_are_mathematics(text, unicode):
    from symattn.render.notation import explanation_latex, explanation_parts, explanation_text
    description = parse(text).description
    formulas = [piece for math, piece in explanation_parts(description) if math]
    assert any(piece.startswith("f(s) = ") for piece in formulas), description
    latex = explanation_latex(description)
    assert "*" not in latex and "^(" not in latex and r"\$" not in latex, latex  # no ASCII formula left in prose
    shown = explanation_text(description)
    assert unicode in shown and not any(c in shown for c in "$\\{}"), shown


def test_a_traced_mods_description_is_its_expression_typeset():
    from symattn.render.notation import explanation_latex, explanation_text
    bias = table("descr", 5)
    mod = score_mod(lambda score, b, h, q_idx, kv_idx: ops.where(kv_idx <= q_idx, score, score / 2)
                    + bias[kv_idx - q_idx + 2], name="described_bias")
    latex = explanation_latex(mod.description)
    assert r"\theta_{\mathrm{descr}}[j - i + 2]" in latex and r"\text{ if }j \leq i" in latex, latex
    assert "kv" not in latex and "begin{cases}" not in latex  # the derivation's letters, on one line of prose
    shown = explanation_text(mod.description)
    assert "s if j ≤ i, else s/2" in shown and "[j − i + 2]" in shown and "$" not in shown, shown


def test_a_mod_sympy_cannot_print_still_gets_a_description(monkeypatch):
    from sympy.printing.latex import LatexPrinter

    from symattn.render.notation import explanation_parts

    class Odd:  # a callable whose name holds a $ (which must not open math)
        __name__ = "cost$5"

        def __call__(self, score, b, h, q_idx, kv_idx):
            return 2 * score - kv_idx

    def refuse(self, expr):
        raise TypeError("this printer prints nothing")
    monkeypatch.setattr(LatexPrinter, "doprint", refuse)
    mod = score_mod(Odd(), name="unprintable_mod")
    monkeypatch.undo()
    assert "cost5" in mod.description and "kv_idx" in mod.description and "$" not in mod.description
    assert explanation_parts(mod.description) == [(False, mod.description)]  # all prose
    d = symattn.derive(AttentionSpec(2, 2, 1, score_mod=mod), prove=False)
    assert "cost5" in d.to_text() and "cost5" in d.to_latex() and "cost5" in d.to_markdown()
    printed = score_mod(lambda score, b, h, q_idx, kv_idx: 2 * score - kv_idx, name="printable_mod")
    assert printed.description.endswith("$f(s) = - j + 2 s$")  # the same expression, printed: mathematics


def test_a_long_parameter_table_prints_its_ends():
    """A 300-entry bias table (for n up to 300) printed whole made a 5617-character text line and ran 2900 pt off
    the PDF page: vectors past VECTOR_SHOWN entries print their first and last ones around ⋮."""
    from symattn.render.latex import VECTOR_SHOWN
    bias = table("longbias", 300)
    spec = AttentionSpec(3, 3, 2, score_mod=score_mod(lambda s, b, h, q, kv: s + bias[ops.abs(q - kv)], name="long"))
    d = symattn.derive(spec, prove=False)
    line = next(x for x in d.to_text().splitlines() if "thlongbias =" in x)
    assert line.count("thlongbias_") == VECTOR_SHOWN - 1 and "⋮" in line and "thlongbias_{299}" in line
    assert r"\vdots" in d.to_latex() and "thlongbias_{150}" not in line


BLOCK_BIAS = table("blockbias", 8)


@pytest.mark.parametrize("name, fn", [
    ("same block", lambda s, b, h, q, kv: s + ops.where(ops.eq(q // 2, kv // 2), 1.0, 0.0)),
    ("bucketed table", lambda s, b, h, q, kv: s + BLOCK_BIAS[ops.minimum(ops.abs(q - kv) // 2, 7)]),
    ("stride", lambda s, b, h, q, kv: s - 0.5 * ((q - kv) % 3))])
def test_score_mods_take_integer_division_of_the_indices(rng, monkeypatch, name, fn):
    """// and % of the indices (a bucketed relative-position table, T5-style) in a score_mod, as a mask_mod takes
    them (they were refused: floor, Mod): derived and proven, four-way verified (the table's gradient included),
    and the loop and tile kernels agree with the reference at n = 40."""
    mod = score_mod(fn, name=f"int_{name.replace(' ', '_')}")
    report = symattn.verify(AttentionSpec(3, 3, 2, score_mod=mod))
    assert report.passed, report.failures()
    params = {"blockbias": rng.standard_normal(8)} if "table" in name else None
    q, k, v, dO = (rng.standard_normal((2, 40, 4)) for _ in range(4))
    want = reference.gradients(q, k, v, dO, score_mod=mod, params=params)
    for small in (1 << 62, 0):
        monkeypatch.setattr(kernels, "SMALL", small)
        O, pullback = symattn.attention_vjp(q, k, v, score_mod=mod, params=params)
        np.testing.assert_allclose(O, reference.attention(q, k, v, score_mod=mod, params=params), rtol=1e-12)
        for key, g in pullback(dO).items():
            np.testing.assert_allclose(g, want[key], rtol=1e-9, atol=1e-12, err_msg=key)
