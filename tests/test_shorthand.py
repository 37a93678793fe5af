"""Named norms in print (render.shorthand, review round 7: the cosine derivation repeated
max(1/1000000000000, sqrt(...)) six times per term and ran 340 pt off the page)."""
import shutil
import subprocess

import pytest
import sympy

import symattn
from symattn import AttentionSpec
from symattn.app.cli import main
from symattn.render.shorthand import EPSILON, abbreviator
from symattn.symbolic.score import NORM_EPS
from symattn.symbolic.tensors import TENSORS


def _definitions(table) -> tuple[dict, dict]:
    """ν -> max(ε, r) and r -> ‖row‖, for every row of Q and K, in the table's element symbols."""
    clamped, norms = {}, {}
    for X, R, N in (("Q", "r_q", "nu_q"), ("K", "r_k", "nu_k")):
        for x in range(table[X].shape[0]):
            clamped[table[N][x]] = sympy.Max(table[R][x], NORM_EPS)
            norms[table[R][x]] = sympy.sqrt(sum(e ** 2 for e in table[X][x, :]))
    return clamped, norms


def _printed_entries(d):
    """(step key, explicit entry, the entry as printed) for every computed step."""
    for step in d.steps:
        if step.explicit is not None and not step.is_input:
            short = abbreviator(d, step)
            yield from ((step.key, entry, short(entry)) for entry in sympy.flatten(step.explicit.tolist()))


def test_the_names_only_rename():
    """Every explicit entry of every step, printed with the names, is the entry itself once the names are
    replaced by their definitions."""
    d = symattn.derive(AttentionSpec(2, 3, 2, score="cosine"), prove=False)
    clamped, norms = _definitions(d.table)
    named = 0
    for key, entry, printed in _printed_entries(d):
        named += printed != entry
        back = printed.xreplace(clamped).xreplace(norms).xreplace({EPSILON: NORM_EPS})
        assert back == entry or sympy.simplify(back - entry) == 0, (key, printed)
    assert named > 10  # the score, dQ, dK and dtau entries use the names


def test_indexed_forms_use_the_names():
    d = symattn.derive(AttentionSpec(2, 2, 2, score="cosine"), prove=False)
    for key in ("score", "dQ", "dK", "dtau"):
        printed = abbreviator(d, d.step(key))(d.step(key).rhs)
        assert not printed.has(NORM_EPS) and not printed.has(sympy.Max), (key, printed)
        assert not any(isinstance(p, sympy.Pow) and isinstance(p.base, sympy.Sum) for p in sympy.preorder_traversal(printed))
    text = d.to_markdown()
    assert "1000000000000" not in text and r"\nu^{q}" in text and r"r^q_i = \lVert q_i \rVert" in text


def test_other_scores_print_as_derived():
    d = symattn.derive(AttentionSpec(2, 2, 2, score="general"), prove=False)
    for step in d.steps:
        assert abbreviator(d, step)(step.rhs) is step.rhs


def test_the_additive_preactivations_only_rename():
    """η_{x,y,r} printed for b_r + (q_x W_a)_r + (k_y U_a)_r: substituted back, every entry is the derivation's,
    and the key each entry depends on shows in its name (it was elided to '⋯ + q_{0,1} w_{1,0}')."""
    d = symattn.derive(AttentionSpec(2, 3, 2, score="additive", hidden=2), prove=False)
    t = d.table
    Q, K, W, U, b, eta = (t[n] for n in ("Q", "K", "Wa", "Ua", "ba", "eta"))
    back = {eta[x, y, r]: b[r] + sum(Q[x, a] * W[a, r] + K[y, a] * U[a, r] for a in range(2))
            for x in range(2) for y in range(3) for r in range(2)}
    named = 0
    for key, entry, printed in _printed_entries(d):
        named += printed != entry
        assert printed.xreplace(back) == entry, (key, printed)
    assert named > 10
    dq = abbreviator(d, d.step("dQ"))(d.step("dQ").explicit[0, 0])
    assert {eta[0, y, r] for y in range(3) for r in range(2)} <= dq.free_symbols  # every key's unit, by name
    indexed = abbreviator(d, d.step("dQ"))(d.step("dQ").rhs)
    assert TENSORS["eta"].base in {x.base for x in indexed.atoms(sympy.Indexed)}
    assert not any(x.base.label.name == "ba" for x in indexed.atoms(sympy.Indexed))


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed (CI installs it)")
def test_a_cosine_layer_document_compiles(tmp_path):
    """A head's tag on a name that has a superscript already (\\nu^{q}) made a double superscript (review)."""
    assert main(["derive", "--format", "tex", "--no-prove", "--n-q", "2", "--n-k", "2", "--d-model", "2", "--heads",
                 "2", "--d-k", "1", "--score", "cosine", "-o", str(tmp_path / "l.tex"), "-q"]) == 0
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "l.tex"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    assert r"{\nu^{q}}^{(0)}" in (tmp_path / "l.tex").read_text()
