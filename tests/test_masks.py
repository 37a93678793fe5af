"""Masks as data (issue 8): index predicates with FlexAttention's mask_mod signature, composable, shown in the
derivation, proven, and verified through the unrolled kernels, the loop kernels and the NumPy reference."""
import numpy as np
import pytest
import sympy

import symattn
from symattn import AttentionSpec, SpecError, reference
from symattn.app.cli import main
from symattn.symbolic import masks
from symattn.symbolic.mods import ops
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
    with pytest.raises(SpecError, match=r"disagrees with its value .* write symattn.mods.ops.eq"):
        AttentionSpec(3, 3, 2, mask=parity)


@pytest.mark.parametrize("wrong, right, where", [
    (lambda b, h: b == 1, lambda b, h: ops.eq(b, 1), r"\(1, 0, 0, 1\)"),
    (lambda b, h: h == 3, lambda b, h: ops.eq(h, 3), r"\(0, 3, 0, 1\)")])
def test_a_python_equality_on_b_or_h_is_refused(rng, wrong, right, where):
    """b == 1 on symbols is False, so tracing dropped it and batch element 1 silently got the causal mask (the
    check then tried b = h = 0 only); the check now covers b, h < 4 as the function evaluates them on arrays."""
    q = rng.standard_normal((2, 4, 5, 2))  # (B, H, n, d)
    with pytest.raises(SpecError, match=r"disagrees with its value at \(b, h, q_idx, kv_idx\) = " + where):
        AttentionSpec(3, 3, 2, mask=lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) | wrong(b, h))
    with pytest.raises(symattn.InputError, match="ops.eq"):
        symattn.attention(q, q, q, mask_mod=lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) | wrong(b, h))
    fixed = lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) | right(b, h)  # noqa: E731
    np.testing.assert_allclose(symattn.attention(q, q, q, mask_mod=fixed), reference.attention(q, q, q, mask_mod=fixed),
                               rtol=1e-12, atol=1e-12)


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
def test_verify_masked(argv, capsys):
    assert main(["verify", *argv, "-q"]) == 0
    out = capsys.readouterr().out
    assert "all paths agree" in out and "loop kernel f32" in out  # every variant has loop kernels now


@pytest.mark.parametrize("argv, message", [
    (["--mask", "nope"], "unknown mask 'nope'"), (["--mask", "window:1", "--causal"], "disagree"),
    (["--mask", "window:-1"], "window: takes a whole number"), (["--mask", "window:\u0663"], "digits (0-9)"),
    (["--mask", "window:1234567"], "at most 6 digits"), (["--mask", "causal&"], "'causal&' has an empty part"),
    (["--mask", "causal||window:2"], "empty part"), (["--mask", ""], "empty part"),
    (["--mask", "x" * 10_000], "unknown mask 'xxxx")])
def test_cli_mask_errors(argv, message, capsys):
    """One line naming the part that is wrong; Unicode digits are not numbers here; --mask "" is refused as the
    spec refuses it (it once meant no mask on the command line only); a long text is not repeated whole."""
    assert main(["derive", "--n-q", "2", "--n-k", "2", "--d-k", "1", "-q", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and len(err) < 400


def test_masks_are_public_and_sympy_free():
    import subprocess
    import sys
    code = ("import sys, symattn; m = symattn.masks.and_masks(symattn.masks.causal, symattn.masks.prefix_lm(2)); "
            "print(m.text, m.visible(0, 1), 'sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    assert out == ["causal&prefix:2", "False", "False"]
    assert masks.mask_of("causal") is causal


# -- run-time masks: document(ids), key_padding(lengths); spans -------------------------------------------------
IDS = np.array([[0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 7, 7]])  # (2, N): segment ids per batch index b


def _batch_array(mask, B) -> np.ndarray:
    return np.array([[[bool(mask.mod(b, 0, i, j)) for j in range(N)] for i in range(N)] for b in range(B)])


def test_document_and_key_padding_have_flexattention_semantics():
    doc = masks.document(IDS)
    np.testing.assert_array_equal(_batch_array(doc, 2), IDS[:, :, None] == IDS[:, None, :])
    pad = masks.key_padding(np.array([4, 1]))
    np.testing.assert_array_equal(_batch_array(pad, 2), np.broadcast_to(
        np.arange(N)[None, None, :] < np.array([4, 1])[:, None, None], (2, N, N)))
    both = and_masks(doc, causal, pad)  # composable with the library masks
    np.testing.assert_array_equal(_batch_array(both, 2), _batch_array(doc, 2) & (J <= I) & _batch_array(pad, 2))
    assert masks.document(IDS[0]).visible(1, 0) and not masks.document(IDS[0]).visible(1, 2)  # (n,) ids: b = 0
    assert both.kernel_tag == "document_and_causal_and_key_padding" and both.tag != masks.and_masks(
        masks.document(IDS[:, ::-1]), causal, pad).tag  # kernels ignore the data, names of specs do not


@pytest.mark.parametrize("make, value", [(masks.key_padding, []), (masks.document, []), (masks.document, [[]])])
def test_an_empty_run_time_array_is_called_empty(make, value):
    """np.asarray([]) is float64: the message once said "must hold integers", which misleads."""
    with pytest.raises(SpecError, match=r"is empty \(shape"):
        make(value)


def test_a_length_beyond_int64_is_named_and_uint64_ids_keep_their_documents(rng):
    """A uint64 length of 2^64 - 1 wrapped to int64 and was reported as "got -1"; ids only compare equal or not,
    so uint64 ids beyond int64 wrap one-to-one and keep their documents."""
    with pytest.raises(SpecError, match="holds 18446744073709551615, beyond any sequence length"):
        masks.key_padding(np.array([2 ** 64 - 1, 2], np.uint64))
    q = rng.standard_normal((1, 4, 2))
    big = np.array([[2 ** 64 - 1, 2 ** 64 - 1, 5, 5]], np.uint64)
    np.testing.assert_allclose(symattn.attention(q, q, q, mask_mod=masks.document(big)),
                               symattn.attention(q, q, q, mask_mod=masks.document(np.array([[0, 0, 1, 1]]))))


def test_run_time_conditions_read_their_arrays_symbolically():
    i, j = sympy.symbols("i j", integer=True)
    b = sympy.Symbol("b", integer=True)
    doc, pad = masks.document(IDS), masks.key_padding([3, 2])
    assert doc.condition(i, j) == sympy.Eq(sympy.IndexedBase("doc")[b, i], sympy.IndexedBase("doc")[b, j])
    assert pad.condition(i, j) == (j < sympy.IndexedBase("kv_len")[b, 0])
    assert [name for name, _ in doc.arrays] == ["doc", "doc_lo", "doc_hi"] and pad.arrays[0][1].shape == (2, 1)
    assert doc.bind(doc.condition(1, 2)) == sympy.false and doc.bind(doc.condition(2, 4)) == sympy.true
    d = symattn.derive(AttentionSpec(1, 1, 1, mask=doc), explicit=False)  # the indexed derivation shows it
    assert "doc[b, i]" in str(d.step("softmax").rhs)


@pytest.mark.parametrize("mask", [causal, sliding_window(2), prefix_lm(3), masks.document(IDS),
                                  masks.key_padding(np.array([4, 0])),
                                  or_masks(sliding_window(1), masks.key_padding(np.array([2, 5]))),
                                  and_masks(masks.document(IDS), prefix_lm(2)),
                                  masks.traced(lambda b, h, q, kv: q + kv < 7)])
def test_spans_hold_every_visible_key(mask):
    """Kernels skip keys outside [lo, hi): no visible key may lie there; an exact span is the mask itself."""
    visible = _batch_array(mask, 2)
    for b in range(2):
        for i in range(N):
            lo, hi = mask.span(b, i) if mask.span else (None, None)
            lo, hi = max(0 if lo is None else mask.bind(sympy.sympify(lo), b), 0), min(
                N if hi is None else mask.bind(sympy.sympify(hi), b), N)
            inside = (np.arange(N) >= lo) & (np.arange(N) < hi)
            assert not np.any(visible[b, i] & ~inside), (mask.text, b, i, lo, hi)
            if mask.exact:
                np.testing.assert_array_equal(visible[b, i], inside)


def test_a_negated_mask_is_derived_as_it_reads():
    """~ on a condition: called with Python ints, ~True is -2 (true), so the explicit weights kept every key and the
    proof failed; visible() now calls the function with NumPy integers, as the reference's grids do."""
    def blocks(b, h, q_idx, kv_idx):
        return ~((q_idx // 2) > (kv_idx // 2))  # key j visible where i // 2 <= j // 2
    spec = AttentionSpec(5, 5, 2, mask=blocks)
    assert [[spec.mask.visible(i, j) for j in range(5)] for i in range(5)] == \
        [[i // 2 <= j // 2 for j in range(5)] for i in range(5)]
    assert symattn.derive(spec).proved
    assert symattn.verify(spec).passed


def test_a_nested_floor_is_checked_in_integers(rng):
    """The trace check once evaluated floor(kv/3 + floor(q/2)/3) in floating point (5/3 + 1/3 = 2.0 there, so
    (q, kv) = (2, 5) looked visible) and refused a correct mask, blaming ==."""
    def nested(b, h, q_idx, kv_idx):
        return ops.eq((q_idx // 2 + kv_idx) // 3, 1)
    mask = masks.mask_of(nested)
    assert not mask.visible(2, 5) and mask.visible(2, 4)
    q, k, v = (rng.standard_normal((2, 12, 3)) for _ in range(3))
    np.testing.assert_allclose(symattn.attention(q, k, v, mask_mod=nested, masked_rows="uniform"),
                               reference.attention(q, k, v, mask_mod=nested, masked_rows="uniform"), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("fn, want", [(lambda b, h, q, kv: ops.abs(q - kv) // 2 <= 0, "(|i − j|)/2 < 1"),
                                      (lambda b, h, q, kv: ops.eq(ops.abs(q - kv) % 2, 0), "|i − j| mod 2 = 0")])
def test_a_user_masks_text_form_has_no_latex_left(fn, want):
    """The plain-text derivation once printed 'frac|i − j|2 < 1' and 'bmod' (LaTeX commands it did not know)."""
    text = symattn.derive(AttentionSpec(3, 3, 2, mask=fn), prove=False).to_text()
    line = next(x for x in text.splitlines() if "visible to query i where" in x)
    assert want in line and "frac" not in line and "bmod" not in line and "\\" not in line
