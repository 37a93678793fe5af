"""Masks as data (issue 8): index predicates with FlexAttention's mask_mod signature, composable, shown in the
derivation, proven, and verified through the unrolled kernels, the loop kernels and the NumPy reference."""
import numpy as np
import pytest
import sympy

import symattn
from symattn import AttentionSpec, SpecError
from symattn.app.cli import main
from symattn.symbolic import masks
from symattn.symbolic.masks import and_masks, causal, or_masks, parse, prefix_lm, sliding_window

N = 6
I, J = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")  # query index, key index


def _array(mask) -> np.ndarray:
    return np.array([[mask.visible(i, j) for j in range(N)] for i in range(N)])


@pytest.mark.parametrize("mask, want", [
    (causal, J <= I),
    (sliding_window(2), (J <= I) & (I - J <= 2)),  # the query and its 2 predecessors (attention-gym's window)
    (prefix_lm(2), (J < 2) | (J <= I)),  # bidirectional prefix of 2 keys, then causal
    (and_masks(sliding_window(3), prefix_lm(1)), (J <= I) & (I - J <= 3)),
    (or_masks(sliding_window(0), prefix_lm(2)), (J == I) | (J < 2) | (J <= I)),
])
def test_library_masks(mask, want):
    np.testing.assert_array_equal(_array(mask), want)
    assert parse(mask.text) == mask and _array(parse(mask.text)).tolist() == want.tolist()  # text round-trips


def test_a_users_mask_mod_is_traced():
    def every_other(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & sympy.Eq((q_idx - kv_idx) % 2, 0) if isinstance(q_idx, sympy.Basic) else \
            (q_idx >= kv_idx) & ((q_idx - kv_idx) % 2 == 0)
    spec = AttentionSpec(4, 4, 2, mask=every_other)
    assert spec.name.startswith("attn_q4_k4_dk2_dv2_user_") and "Mask(text='user_" in repr(spec)
    assert spec.mask_array().tolist() == [[(i >= j) and (i - j) % 2 == 0 for j in range(4)] for i in range(4)]
    d = symattn.derive(spec)
    assert d.proved and "Mod(" in str(d.step("softmax").indexed)
    assert symattn.verify(spec).passed


def test_a_mask_mod_with_python_equality_is_refused():
    def parity(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((q_idx - kv_idx) % 2 == 0)  # == on symbols: structural, traces to False
    with pytest.raises(SpecError, match=r"disagrees with its value .* sympy.Eq"):
        AttentionSpec(3, 3, 2, mask=parity)


def test_a_mask_mod_that_cannot_be_traced_is_named():
    def pythonic(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx and q_idx - kv_idx < 3  # `and` needs a truth value: not traceable
    with pytest.raises(SpecError, match="cannot trace mask_mod 'pythonic'"):
        AttentionSpec(3, 3, 2, mask=pythonic)


@pytest.mark.parametrize("text", ["window:1", "prefix:2", "causal|prefix:3"])
def test_masked_derivations_are_proven_and_show_the_mask(text):
    spec = AttentionSpec(4, 4, 2, mask=text)
    d = symattn.derive(spec)
    assert d.proved, [p.failure for p in d.proofs if not p.passed]
    P = d.step("softmax")
    for i in range(4):
        for j in range(4):
            assert (P.explicit[i, j] == 0) == (not spec.visible(i, j))  # masked keys: weight 0, not in the sum
    assert f"Mask ({text})" in P.explanation and isinstance(P.rhs, sympy.Piecewise)


@pytest.mark.parametrize("argv", [["--mask", "window:2", "--n-q", "4", "--n-k", "5", "--d-k", "2"],
                                  ["--mask", "prefix:2", "--score", "additive", "--hidden", "2", "--n-q", "3",
                                   "--n-k", "4", "--d-k", "2"]])
def test_verify_masked(argv, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SYMATTN_CACHE", str(tmp_path))
    assert main(["verify", *argv, "-q"]) == 0
    out = capsys.readouterr().out
    assert "all paths agree" in out and ("loop kernel f32" in out) == ("additive" not in argv)


@pytest.mark.parametrize("argv, message", [
    (["--mask", "nope"], "unknown mask 'nope'"), (["--mask", "window:1", "--causal"], "disagree"),
    (["--mask", "window:-1"], "unknown mask")])
def test_cli_mask_errors(argv, message, capsys):
    assert main(["derive", "--n-q", "2", "--n-k", "2", "--d-k", "1", "-q", *argv]) == 2
    assert message in capsys.readouterr().err


def test_masks_are_public_and_sympy_free():
    import subprocess
    import sys
    code = ("import sys, symattn; m = symattn.masks.and_masks(symattn.masks.causal, symattn.masks.prefix_lm(2)); "
            "print(m.text, m.visible(0, 1), 'sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    assert out == ["causal&prefix:2", "False", "False"]
    assert masks.mask_of("causal") is causal
