from fractions import Fraction

import pytest
import sympy

from symattn import AttentionSpec, SizeTooLargeError, SpecError


def test_defaults_are_exact():
    spec = AttentionSpec(3, 4, 2)
    assert spec.d_v == 2
    assert spec.scale is None
    assert spec.scale_exact == 1 / sympy.sqrt(2)
    assert spec.mask == "none" and not spec.causal


def test_scale_parsing_is_exact():
    assert AttentionSpec(2, 2, 2, scale="1/8").scale == Fraction(1, 8)
    assert AttentionSpec(2, 2, 2, scale=0.1).scale_exact == sympy.Rational(1, 10)


@pytest.mark.parametrize("field, kwargs", [
    ("n_q", dict(n_q=0)), ("n_q", dict(n_q=-3)), ("n_q", dict(n_q=2.5)), ("n_q", dict(n_q=True)),
    ("n_k", dict(n_k="4")), ("d_k", dict(d_k=0)), ("d_v", dict(d_v=-1)),
    ("mask", dict(mask="diagonal")), ("scale", dict(scale=-1)), ("scale", dict(scale="abc")),
    ("scale", dict(scale=float("inf"))), ("masked_rows", dict(masked_rows="drop")), ("dtype", dict(dtype="float16")),
])
def test_bad_fields_name_the_field(field, kwargs):
    args = dict(n_q=2, n_k=3, d_k=2)
    args.update(kwargs)
    with pytest.raises(SpecError, match=rf"AttentionSpec\.{field}"):
        AttentionSpec(**args)


def test_names_are_deterministic_and_distinct():
    a = AttentionSpec(3, 4, 2, 3, mask="causal")
    assert a.name == "attn_q3_k4_dk2_dv3_causal" == AttentionSpec(3, 4, 2, 3, mask="causal").name
    assert AttentionSpec(3, 4, 2, 3).name != a.name
    assert AttentionSpec(3, 4, 2, 3, scale="1/8").name.endswith("scale1o8")
    assert "--causal" in a.cli_args()


def test_explicit_limit_says_what_to_use_instead():
    with pytest.raises(SizeTooLargeError, match="indexed form holds at any size"):
        AttentionSpec(64, 64, 8).check_explicit()
    AttentionSpec(8, 8, 8).check_explicit()  # the documented target size stays allowed
