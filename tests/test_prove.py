"""Proofs: closed forms = plain differentiation; indexed = explicit; and proofs that must fail do."""

import pytest
import sympy

from conftest import tampered
from symattn import AttentionSpec, derive, prove

SPECS = [AttentionSpec(2, 2, 2), AttentionSpec(3, 4, 2, 3), AttentionSpec(4, 3, 3, 2, mask="causal"),
         AttentionSpec(2, 5, 1, 3, mask="causal", scale="1/4")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_all_proofs_pass(spec):
    d = derive(spec)
    assert d.proved
    kinds = {(p.kind, p.step) for p in d.proofs}
    for key in ("dV", "dP", "dS", "dQ", "dK"):
        assert ("gradient", key) in kinds
    assert ("jacobian", "jacobian") in kinds
    assert {("indexed", s.key) for s in d.steps if not s.is_input} <= kinds
    assert all(p.checked > 0 for p in d.proofs)


def test_method_is_recorded():
    small, large = derive(AttentionSpec(2, 2, 2)), derive(AttentionSpec(3, 4, 2, 3))
    assert {p.method for p in small.proofs if p.kind == "gradient"} == {"exact simplification"}
    assert {p.method for p in large.proofs if p.kind == "gradient"} == {"random rational points"}


@pytest.mark.parametrize("exact", [True, False])
def test_a_wrong_gradient_fails_its_proof(exact):
    d = derive(AttentionSpec(2, 3, 2), prove=False)
    wrong = d.step("dQ").explicit * 2  # scale applied twice, say
    proofs = prove(tampered(d, "dQ", explicit=wrong), exact=exact).proofs
    failed = [p for p in proofs if not p.passed]
    assert {(p.kind, p.step) for p in failed} == {("indexed", "dQ"), ("matrix", "dQ"), ("gradient", "dQ")}
    assert all("dq_{0,0}" in p.failure for p in failed)


def test_a_wrong_softmax_fails_dS_and_jacobian():
    d = derive(AttentionSpec(2, 3, 2), prove=False)
    P = d.step("softmax").explicit
    wrong = P.applyfunc(lambda p: p ** 2)
    proofs = prove(tampered(d, "softmax", explicit=wrong), exact=False).proofs
    assert {p.step for p in proofs if not p.passed} >= {"jacobian", "dS", "softmax"}


def test_a_wrong_indexed_formula_fails():
    d = derive(AttentionSpec(2, 3, 2), prove=False)
    rhs = d.step("dK").rhs * sympy.Integer(3)
    proofs = prove(tampered(d, "dK", rhs=rhs)).proofs
    assert [(p.kind, p.step) for p in proofs if not p.passed] == [("indexed", "dK")]
