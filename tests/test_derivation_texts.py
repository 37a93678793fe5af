"""What the printed derivations say, read as a teacher would (review round 7): no word or symbol that is wrong
for the spec at hand."""
import symattn
from symattn import AttentionSpec, MultiHeadSpec


def test_score_gradient_prose_names_a_query_and_a_key():
    text = symattn.derive(AttentionSpec(2, 2, 1, score="general"), prove=False).to_markdown()
    assert "every score the query enters" in text and "every score the key enters" in text
    assert "querie " not in text


def test_one_omitted_entry_is_an_entry():
    d = symattn.derive(AttentionSpec(1, 2, 1), prove=False)
    text = d.to_text(max_entries=1)
    assert "(1 further entry omitted)" in text and "1 further entries" not in text


def test_parameter_shapes_are_typeset_with_their_sizes():
    text = symattn.derive(AttentionSpec(2, 2, 2, score="additive", hidden=3, score_mod="relative-bias:2"),
                          prove=False).to_markdown()
    assert "of shape $(n_{rel}) = (5)$" in text and "of shape $(d_{k}, d_{a}) = (2, 3)$" in text
    assert "(n_rel)" not in text


def test_the_upstream_loss_is_a_definition_not_a_matrix():
    text = symattn.derive(AttentionSpec(2, 2, 1), prove=False).to_text()
    assert "definition: L = Sum(" in text and "matrix: L =" not in text


def test_layer_prose_fits_the_layer():
    self_attention = symattn.derive_multihead(MultiHeadSpec(3, 4, 2, kv_heads=1), prove=False).to_markdown()
    assert r"\hat{K} = x W_K$" in self_attention and r"\mathrm{d}W_K = x^\top" in self_attention
    assert " y W_K" not in self_attention and "y^\\top" not in self_attention
    assert r"\mathbf{1} b_" not in self_attention  # no biases in this layer
    assert r"column block $g = \lfloor h H_{kv} / H \rfloor$" in self_attention  # how head h finds its keys
    assert r"H_{kv} < H" in self_attention and "h_{kv}" not in self_attention  # H counts heads, h indexes one
    cross = symattn.derive_multihead(MultiHeadSpec(3, 4, 2, n_k=2, cross=True, bias=True), prove=False).to_markdown()
    assert r"\hat{K} = y W_K + \mathbf{1} b_K^\top" in cross
    assert r"\hat{Q} &= x W_Q + \mathbf{1} b_Q^{T}" in cross and "+ 1 b_Q" not in cross  # the matrix form's ones
