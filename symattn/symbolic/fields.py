"""What AttentionSpec and MultiHeadSpec share besides the scores (symattn.symbolic.spec): positive sizes, choices,
the mask field, and the variant's (score, hidden, score mod, mask) parts of the spec's name, title, repr and CLI
options. Errors name `Owner.field`."""
from __future__ import annotations

import dataclasses
import operator

from ..errors import SpecError
from .masks import Mask, mask_of, parse

def positive_int(name: str, value, owner: str = "AttentionSpec") -> int:
    message = f"{owner}.{name} must be a positive integer, got {value!r}"
    if isinstance(value, bool):
        raise SpecError(message)
    try:
        number = operator.index(value)
    except TypeError:
        raise SpecError(message) from None
    if number <= 0:
        raise SpecError(message)
    return number


def mask_field(value, owner: str = "AttentionSpec") -> str | Mask:
    """'none', a library mask's text ('causal', 'window:3', 'prefix:2', joined by & and |), or a traced user Mask."""
    if value is None or value == "none":
        return "none"
    try:
        mask = mask_of(value)
    except SpecError as e:
        raise SpecError(f"{owner}.mask: {e}") from None
    try:
        return parse(mask.text).text  # a library mask: kept as its text
    except SpecError:
        return mask  # a user's mask_mod: kept as the Mask (repr and equality by its traced condition)


def choice(name: str, value, allowed: tuple[str, ...], owner: str = "AttentionSpec") -> str:
    if value not in allowed:
        raise SpecError(f"{owner}.{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def short_repr(spec) -> str:
    """The dataclass repr, with the score fields shown only when they differ from the dot product's."""
    shown = [f.name for f in dataclasses.fields(spec) if f.name != "_"
             and not (f.name in ("score", "hidden", "score_mod") and getattr(spec, f.name) == f.default)]
    return f"{type(spec).__name__}({', '.join(f'{n}={getattr(spec, n)!r}' for n in shown)})"


def variant_parts(spec) -> list[str]:
    """File-name parts of the variant: score (and d_a), score mod, mask."""
    parts = [spec.score + (f"_da{spec.hidden}" if spec.hidden else "")] if spec.score != "dot" else []
    parts += [spec.mod_object.tag] if spec.mod_object is not None else []
    parts += [spec.mask_object.tag] if spec.mask_object is not None else []
    return parts + ([f"{spec.masked_rows}rows"] if spec.masked_rows != "zero" else [])  # the policy changes kernels


def variant_title(spec) -> str:
    """Title part of the variant after the sizes: ', d_a=2, alibi, window 2 mask' (the score names itself)."""
    hidden = f", d_a={spec.hidden}" if spec.hidden else ""
    mod = "" if spec.mod_object is None else f", {spec.mod_object.text.replace(':', ' ')}"
    mask = "" if spec.mask_object is None else f", {spec.mask_object.text.replace(':', ' ')} mask"
    rows = "" if spec.masked_rows == "zero" else f", masked rows {spec.masked_rows}"
    return hidden + mod + mask + rows


def variant_args(spec) -> str:
    """The CLI options of the variant: --score (--hidden), --score-mod, --causal or --mask."""
    args = ""
    if spec.score != "dot":
        args += f" --score {spec.score}" + (f" --hidden {spec.hidden}" if spec.hidden else "")
    if spec.mod_object is not None:
        args += f" --score-mod {spec.score_mod}"
    if spec.causal:
        args += " --causal"
    elif spec.mask != "none":
        args += f" --mask '{spec.mask if isinstance(spec.mask, str) else spec.mask.text}'"
    return args + (f" --masked-rows {spec.masked_rows}" if spec.masked_rows != "zero" else "")
