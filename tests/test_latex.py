"""Printers: every step appears in every format; the standalone document compiles with pdflatex."""
import re
import shutil
import subprocess

import pytest

from symattn import AttentionSpec, derive
from symattn.render.latex import tex_escape
from symattn.render.notation import explanation_latex, explanation_markdown, explanation_text


@pytest.fixture(scope="module")
def d():
    return derive(AttentionSpec(3, 4, 2, 3, mask="causal"))


def test_every_step_is_printed_in_every_format(d):
    for text in (d.to_text(), d.to_latex(), d.to_markdown(), d.to_tex_document()):
        for step in d.steps:
            assert any(form(step.title) in text for form in (explanation_text, explanation_latex, explanation_markdown))


def test_latex_uses_printer_names_not_code_names(d):
    latex = d.to_latex(max_entries=None)
    assert r"\mathrm{d}q_{0,0}" in latex and r"\mathrm{d}Q" in latex
    assert r"\tilde{s}_{2,1}" in latex
    assert "dq_{0,0}" not in latex.replace(r"\mathrm{d}q_{0,0}", "")
    assert r"\frac{e^{s_{1,0}}}{e^{s_{1,0}} + e^{s_{1,1}}}" in latex  # causal: masked keys absent


def test_markdown_uses_display_math(d):
    md = d.to_markdown()
    assert md.count("```math\n") >= len(d.steps) and "$$" not in md
    assert md.startswith("# Scaled dot-product attention")


def test_query_restriction_and_omission_notice():
    d8 = derive(AttentionSpec(8, 8, 8), prove=False)
    text = d8.to_text()
    assert "further entries omitted" in text
    row = d8.to_text(query=3)
    assert re.search(r"(?<![a-z])s_\{3,7\}", row) and not re.search(r"(?<![a-z])s_\{2,7\}", row)
    assert "further entries omitted" not in d8.to_text(max_entries=None)


def test_tex_escape_handles_specials():
    assert tex_escape("a_b <= 5% & {x}") == r"a\_b \textless{}= 5\% \& \{x\}"


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (CI installs it)")
def test_standalone_document_compiles_with_pdflatex(d, tmp_path):
    (tmp_path / "derivation.tex").write_text(d.to_tex_document())
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "derivation.tex"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]
    assert (tmp_path / "derivation.pdf").stat().st_size > 10_000


def test_layer_latex_uses_math_names():
    from symattn import MultiHeadSpec, derive_multihead
    latex = derive_multihead(MultiHeadSpec(2, 4, 2, bias=True), prove=False).to_latex()
    assert r"W_Q &= \begin{bmatrix}w^{Q}_{0,0}" in latex and r"\hat{Q} &= x W_Q" in latex
    assert "Wq" not in latex and "dWq" not in latex
