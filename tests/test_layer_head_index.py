"""Under "Head k" the layer's indexed formulas are head k's: a score mod's head index h reads k (ALiBi's slope of
head 1 of 2 is 2^-8, printed as such), not the h of the single-head formula. The explicit values were right before;
this checks the formulas the derivation prints."""
import re

import pytest
import sympy

from symattn import MultiHeadSpec
from symattn.mods import ops, score_mod
from symattn.symbolic.layer import derive_multihead
from symattn.symbolic.tensors import HEAD

ALIBI = MultiHeadSpec(2, 4, 2, score_mod="alibi:heads=2")


def _section(latex: str, title: str) -> str:
    """The LaTeX of one step: from its heading to the next."""
    start = latex.index(title)
    end = latex.find(r"\subsection", start)
    return latex[start:end if end >= 0 else None]


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "indexed-only"])
def test_head_1_score_mod_shows_its_own_slope_not_h(explicit):
    d = derive_multihead(ALIBI, explicit=explicit, prove=False)
    for h, slope in ((0, 16), (1, 256)):
        step = d.step(f"h{h}.mod")
        assert HEAD not in step.rhs.free_symbols
        latex = _section(d.to_latex(), f"Head {h}: Score mod")
        indexed = next(line for line in latex.splitlines() if "_{i,j} &=" in line)
        assert rf"\frac{{j}}{{{slope}}} - \frac{{i}}{{{slope}}}" in indexed, indexed
        assert not re.search(r"(?<![\\a-zA-Z])h(?![a-zA-Z])", indexed), indexed  # no free h from the mod


def test_head_index_in_a_user_mods_gradient_reads_the_head():
    """A mod whose derivative depends on h (a cap of h + 1): under head 1 the gradient step has cap 2."""
    mod = score_mod(lambda s, b, h, q, kv: (h + 1) * ops.tanh(s / (h + 1)), name="capbyhead")
    d = derive_multihead(MultiHeadSpec(2, 2, 2, score_mod=mod), prove=False)
    for h in (0, 1):
        for key in ("mod", "dSr"):
            step = d.step(f"h{h}.{key}")
            assert HEAD not in step.rhs.free_symbols, (key, step.rhs)
            assert all(HEAD not in getattr(c, "free_symbols", ()) for c in step.chain)
    caps = [{t.args[0].as_coeff_Mul()[0] for t in d.step(f"h{h}.mod").rhs.atoms(sympy.tanh)} for h in (0, 1)]
    assert caps == [{1}, {sympy.Rational(1, 2)}]  # tanh(s/(h+1)) at h = 0 and h = 1
    assert r"2 \tanh" in _section(d.to_latex(), "Head 1: Score mod")


def test_the_substituted_formulas_still_instantiate_to_the_explicit_values():
    d = derive_multihead(ALIBI, prove=True)
    assert d.proved, [p.failure for p in d.proofs if not p.passed]
    assert {p.step for p in d.proofs if p.kind == "indexed"} >= {"h0.mod", "h1.mod"}
