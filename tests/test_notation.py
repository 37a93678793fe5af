"""The documents' notation: 1-based indices mean the same formulas, labels and fragments compile, long lines fit
the page (checked from pdflatex's log), and symattn.latex prints steps and expressions in the documents' names."""
import re
import shutil
import subprocess

import pytest
import sympy

import symattn
from symattn.app.cli import main
from symattn.errors import SpecError
from symattn.render.notation import Notation, one_based
from symattn.symbolic.derive import derive
from symattn.symbolic.layer import derive_multihead
from symattn.symbolic.spec import AttentionSpec, MultiHeadSpec
from symattn.symbolic.tensors import SIZES

pdflatex = pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (CI installs it)")


def _at(expr, values: dict, sizes: dict, shift: int):
    """expr at concrete indices, with every tensor read I[k] turned into an element I_(k - shift) symbol, so a
    1-based formula (shift 1) and a 0-based one (shift 0) can be compared entry by entry."""
    concrete = expr.xreplace({**{SIZES[n]: v for n, v in sizes.items()}, **values}).doit()
    return concrete.replace(lambda x: isinstance(x, sympy.Indexed),
                            lambda x: sympy.Symbol(f"{x.base.label}_" + "_".join(str(int(k) - shift) for k in x.indices)))


@pytest.mark.parametrize("variant", [dict(), dict(score_mod="relative-bias:2", mask="prefix:1"),
                                     dict(score="additive", hidden=2, mask="window:1"), dict(score_mod="alibi")])
def test_one_based_formulas_say_the_same_as_zero_based(variant):
    d = derive(AttentionSpec(3, 4, 2, **variant), explicit=False)
    sizes = {"n_q": 3, "n_k": 4, "d_k": 2, "d_v": 2, "d_a": 2, "n_rel": 5}
    size_symbols = set(SIZES.values())
    checked = 0
    for step in d.steps:
        if step.rhs is None:
            continue
        free = sorted((s for s in step.rhs.free_symbols - size_symbols if isinstance(s, sympy.Symbol) and s.is_integer),
                      key=str)  # the free indices i, j, a, b, l, t, ...
        for point in ({"i": 0, "j": 1, "a": 1, "b": 0, "l": 2, "t": 3, "r": 1},
                      {"i": 2, "j": 3, "a": 0, "b": 1, "l": 0, "t": 0, "r": 0}):
            zero = {s: point[s.name] for s in free}
            one = {s: v + 1 for s, v in zero.items()}
            left = _at(step.rhs, zero, sizes, 0)
            right = _at(one_based(step.rhs), one, sizes, 1)
            assert sympy.simplify(left - right) == 0, (step.key, left, right)
            checked += 1
    assert checked >= 20


def test_one_based_sums_and_offsets_print_from_one():
    d = derive(AttentionSpec(3, 3, 2, score_mod="relative-bias:2"), explicit=False)
    one = Notation(index_base=1)
    assert r"\sum_{j=1}^{n_{k}}" in symattn.latex(d.step("dQ"), one)
    assert "+ 3}" in symattn.latex(d.step("mod"), one) and "+ 2}" in symattn.latex(d.step("mod"))


def test_latex_prints_steps_equations_and_expressions_in_document_names():
    d = derive(AttentionSpec(2, 2, 2), explicit=False)
    assert r"\tilde{S}" in symattn.latex(d.step("similarity"))
    assert r"\mathrm{d}S" in symattn.latex(d.step("dS"))
    assert symattn.latex(d.step("dQ").rhs).startswith(r"\frac{")
    renamed = symattn.latex(d.step("similarity"), Notation(names={"Q": "X"}))
    assert "{X}_{i,a}" in renamed and "{Q}" not in renamed
    with pytest.raises(TypeError, match="prints a Step"):
        symattn.latex(object())


def test_scale_prints_as_division_by_a_root():
    d = derive(AttentionSpec(2, 2, 8), prove=False)
    assert r"{\sqrt{8}}" in d.to_latex() and r"\frac{\sqrt{2}" not in d.to_latex()


def test_bad_notation_is_refused_with_the_option_named(capsys):
    for args, words in ((["--entries", "some"], "--entries"), (["--name", "Q"], "--name"),
                        (["--name", r"Q=\input{/etc/passwd}"], "name of Q"), (["--section-level", "7"], "level"),
                        (["--label", "a b"], "label"), (["--name", "Q=K"], "name 'K' of Q is also the name of K"),
                        (["--name", "Q=X", "--name", "K=X"], "also the name of")):
        assert main(["derive", "--n-q", "2", "--n-k", "2", "--d-k", "2", "--no-prove", *args]) == 2
        assert words in capsys.readouterr().err


def test_names_may_swap_but_never_print_alike():
    """Q=K alone printed queries and keys as one K (no error); swapping them is fine."""
    latex = derive(AttentionSpec(2, 2, 1), prove=False).to_latex(notation=Notation(names={"Q": "K", "K": "Q"}))
    assert r"K &= \begin{bmatrix}q_{0,0}" in latex and r"Q &= \begin{bmatrix}k_{0,0}" in latex  # renamed both ways
    with pytest.raises(SpecError, match=r"name 'W_a' of V is also the name of Wg, Wa"):
        Notation(names={"V": "W_a"})
    for spelled in ("{Q}", "{{Q}}", "Q^{}", " Q"):  # print as Q: equal after braces that only group (review)
        with pytest.raises(SpecError, match="also the name of Q"):
            Notation(names={"K": spelled})
    # the general and the additive score's W_a never meet in one derivation: either may take the other's name
    assert Notation(names={"Wg": "W_a"}) and Notation(names={"Wg": "W", "Wa": "W"})


def test_sample_entries_by_default_and_all_on_request():
    d = derive(AttentionSpec(3, 3, 2), prove=False)
    sample, full = d.to_latex(), d.to_latex(notation=Notation(entries="all"))
    assert "further entries omitted" in sample and "further entries omitted" not in full
    assert r"\tilde{s}_{2,2}" in full and r"\tilde{s}_{1,1}" not in sample  # first two and the last


def _compile(tmp_path, name: str, tex: str) -> str:
    (tmp_path / f"{name}.tex").write_text(tex)
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"{name}.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:]
    return (tmp_path / f"{name}.log").read_text(errors="replace")


def _overfull(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"Overfull \\hbox \(([0-9.]+)pt too wide\)", log)]


@pdflatex
@pytest.mark.parametrize("name, make", [
    ("dot8", lambda: derive(AttentionSpec(8, 8, 8), prove=False)),
    ("layer", lambda: derive_multihead(MultiHeadSpec(4, 8, 2), prove=False)),
    ("additive", lambda: derive(AttentionSpec(3, 4, 2, score="additive", hidden=2), prove=False)),
    ("general", lambda: derive(AttentionSpec(3, 3, 2, score="general", score_mod="relative-bias:2", mask="window:1"),
                               prove=False)),
    ("softcap", lambda: derive(AttentionSpec(3, 4, 3, score_mod="softcap:30", mask="prefix:1"), prove=False)),
])
def test_no_display_line_runs_past_the_margin(tmp_path, name, make):
    d = make()
    for notation in (Notation(), Notation(entries="all", numbered=True, index_base=1)):
        log = _compile(tmp_path, name, d.to_tex_document(notation=notation))
        assert not [w for w in _overfull(log) if w > 5.0], (name, notation)


@pdflatex
def test_numbered_fragment_compiles_inside_a_document_and_labels_resolve(tmp_path):
    d = derive(AttentionSpec(2, 3, 2), prove=False)
    fragment = d.to_tex_document(notation=Notation(numbered=True, label="attn", standalone=False, level=2))
    assert r"\documentclass" not in fragment and r"\label{attn:dQ}" in fragment and r"\subsection{" in fragment
    (tmp_path / "derivation.tex").write_text(fragment)
    doc = ("\\documentclass{article}\\usepackage{amsmath}\\begin{document}\\section{Attention}\n"
           "\\input{derivation}\nEquation~\\eqref{attn:dQ} gives dQ.\n\\end{document}\n")
    _compile(tmp_path, "main", doc)
    log = _compile(tmp_path, "main", doc)  # second run resolves references
    assert "undefined" not in log.lower() or "Reference `attn:dQ' on page" not in log


def test_indexed_formulas_and_mask_conditions_are_never_elided_or_cut():
    d = derive(AttentionSpec(3, 3, 2, mask="window:2"), prove=False)
    softmax = d.to_latex().split("Softmax normalisation")[1].split(r"\end{align*}")[0]
    assert r"i - j \leq 2" in softmax and r"i - l \leq 2" in softmax and r"\sum_{l=0}^{n_{k} - 1}" in softmax
    assert r"\cdots" not in softmax.split("\n")[2]  # the indexed line


def test_wrap_cuts_only_top_level_sums():
    from symattn.render.notation import wrap
    tex = r"a_{1} + \left(b + c\right) - \begin{cases} x - y & z \end{cases} + e"
    assert wrap(tex, 3) == ["a_{1}", r"+ \left(b + c\right)", r"- \begin{cases} x - y & z \end{cases}", "+ e"]
    assert wrap(tex, 1000) == [tex]


def test_layer_documents_show_heads_as_superscripts_and_explanations_as_mathematics():
    d = derive_multihead(MultiHeadSpec(2, 4, 2), prove=False)
    latex, markdown, text = d.to_latex(), d.to_markdown(), d.to_text()
    assert r"{Q^{(1)}}_{i,a}" in latex and r"\tilde{S}^{(1)} &= Q^{(1)}" in latex  # indexed and matrix lines
    assert r"$Z = \operatorname{MultiHead}(x) = C W_O" in latex and r"$\hat{Q} = x W_Q" in markdown
    assert "Q̂ = x W_Q" in text and "$" not in text and "\\hat" not in text


def test_explanations_become_unicode_in_text_and_stay_escaped_prose_in_latex():
    from symattn.render.notation import explanation_latex, explanation_markdown, explanation_text
    src = r"With $\frac{1}{\sqrt{d_k}}$ and $\mathrm{d}S = P \odot (\mathrm{d}P - D \mathbf{1}^\top)$, n_q & 50%"
    assert explanation_text(src) == "With 1/√d_k and dS = P ∘ (dP − D 1ᵀ), n_q & 50%"
    assert explanation_latex(src).endswith(r"$, n\_q \& 50\%")
    assert explanation_markdown(src).endswith(r"$, n\_q & 50%")
    assert explanation_text("costs $5") == "costs $5"  # a lone $ is prose


def test_combined_masks_read_as_one_sentence():
    from symattn.render.notation import explanation_text
    from symattn.symbolic import masks
    text = explanation_text(masks.parse("causal&window:2|prefix:1").description)
    assert text.startswith("key j is visible to query i when either holds: (1) both hold: (a) j ≤ i; and (b) query i "
                           "sees keys i − 2 to i (a causal sliding window); or (2) the keys j < 1 (the prefix)"), text
    three = explanation_text(masks.and_masks("causal", "window:1", "prefix:1").description)
    assert "when all hold: (a) j ≤ i; (b) query i sees" in three and "; and (c) the keys j < 1" in three
    assert masks.and_masks("causal").description == masks.causal.description


def test_the_worked_example_writes_sizes_and_headings_as_mathematics():
    from symattn.app.run import run
    r = run("a b", d_model=2, d_k=2, kernels=False, say=lambda line: None)
    latex, markdown, text = (r.document.render(f) for f in ("latex", "markdown", "text"))
    for typeset in (latex, markdown):
        assert "At $n_q = n_k = 2$, $d_k = 2$, $d_v = 2$:" in typeset
        assert r"$d_{\text{model}} = 2$, $d_k = 2$, $d_v = 2$, no mask." in typeset  # the sizes line
        assert "on $d_{\\text{model}} = 2$, each with $d_k = 1$ and $d_v = 1$" in typeset  # the two-head layer
        assert not re.search(r"\b[nd]\\_(q|k|v|model)\b", typeset)  # no ASCII size names as escaped prose
    assert "At n_q = n_k = 2, d_k = 2, d_v = 2:" in text and "Layer output z for" in text and "$d" not in text


@pdflatex
def test_mod_and_mask_descriptions_compile(tmp_path):
    from symattn.render.notation import explanation_latex
    from symattn.symbolic import masks
    from symattn.symbolic.mods import ops, parse, score_mod
    mods = [parse(t) for t in ("alibi", "alibi:heads=4", "softcap:1/2", "relative-bias:2")]
    mods.append(score_mod(lambda score, b, h, q_idx, kv_idx: ops.where(q_idx >= kv_idx, ops.tanh(score), score / 3)
                          - abs(kv_idx - q_idx), name="compiled_mod"))
    shown = [m.description for m in mods] + [masks.parse("causal&window:2|prefix:1").description]
    body = "\n\n".join(explanation_latex(x) for x in shown)
    _compile(tmp_path, "descriptions", "\\documentclass{article}\\usepackage{amsmath}\\begin{document}\n"
             + body + "\n\\end{document}\n")


@pytest.mark.parametrize("tex", [r"^^5cinput{secret}", r"X^^41", "}", "{", "X__", r"\hat", r"\alphabet", "X_a_b",
                                 "X^1^2", "$x$", "X%", "X" * 41, "X^", "α"])
def test_names_pdflatex_would_run_or_choke_on_are_refused(tex):
    """^^5c is TeX's own escape for a backslash: it let \\input{secret} (and \\openout/\\write) through the old
    pattern; '}', 'X__', \\hat without its argument and \\alphabet passed it and stopped pdflatex."""
    with pytest.raises(symattn.SpecError, match="name of Q must be a short LaTeX symbol"):
        Notation(names={"Q": tex})


@pdflatex
def test_every_kind_of_name_the_check_takes_compiles(tmp_path):
    names = {"Q": r"\hat{X}_{i}", "K": r"\mathbf{k}'", "V": r"\operatorname{val}^{2}", "S": r"\Sigma_{q k}",
             "P": r"\boldsymbol{\theta}", "O": r"\mathrm{Out}"}
    d = derive(AttentionSpec(2, 2, 2), prove=False)
    _compile(tmp_path, "names", d.to_tex_document(notation=Notation(names=names)))


def test_a_name_given_twice_is_refused(capsys):
    assert main(["derive", "--n-q", "2", "--n-k", "2", "--d-k", "2", "--no-prove", "--name", "Q=X", "--name",
                 "Q=Y"]) == 2
    assert "--name gives Q twice" in capsys.readouterr().err
