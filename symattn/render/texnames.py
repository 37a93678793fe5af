"""User-given tensor names (`--name Q=X`): each must typeset as one symbol and do nothing else, and no two tensors
may print alike. TeX is a programming language: a name is scanned, never passed through."""
from __future__ import annotations

import re

from ..errors import SpecError
from ..symbolic import score  # noqa: F401  (registers the scores' parameters: names are checked against all)
from ..symbolic.tensors import TENSORS

#: A user-given symbol name: letters, digits, ' and spaces, balanced braces, the commands below (those of
#: _WITH_ARGUMENT followed by a {group}), one ^ and one _ per group (no ^^, TeX's escape for any character).
MAX_NAME = 40
_WITH_ARGUMENT = {"mathrm", "mathbf", "mathit", "hat", "tilde", "bar", "boldsymbol", "mathcal", "operatorname"}
_SYMBOLS = {"alpha", "beta", "gamma", "theta", "sigma", "tau", "phi", "psi", "omega", "Omega", "Sigma", "Phi",
            "Theta", "Gamma"}
_COMMAND = re.compile(r"\\([A-Za-z]+)")


def safe_tex(tex: str) -> bool:
    """Whether `tex` is a name that pdflatex typesets as one symbol and that can do nothing else: no other
    command (\\input, \\write, \\alphabet), no ^^ escape, no double script, no unbalanced brace, no $ or %."""
    if not 0 < len(tex) <= MAX_NAME:
        return False
    scripts, i = [set()], 0  # per open group: the scripts ('^', '_') its current symbol has
    while i < len(tex):
        c = tex[i]
        if c == "\\":
            match = _COMMAND.match(tex, i)
            if match is None or match.group(1) not in _WITH_ARGUMENT | _SYMBOLS:
                return False
            i = match.end()
            if match.group(1) in _WITH_ARGUMENT and tex[i:i + 1] != "{":
                return False
            continue
        if c in "^_'":
            kind = "^" if c in "^'" else "_"
            if c != "'" and (kind in scripts[-1] or i + 1 == len(tex) or tex[i + 1] in "^_}'"):
                return False
            if c == "'" and "^" in scripts[-1] and tex[i - 1] != "'":
                return False
            scripts[-1].add(kind)
        elif c == "{":
            scripts.append(set())
        elif c == "}":
            scripts.pop()
            if not scripts:
                return False
        elif not (c.isascii() and (c.isalnum() or c == " ")):
            return False
        i += 1
    return len(scripts) == 1


def check_names(names: dict) -> None:
    """SpecError unless every tensor name -> LaTeX pair names a known tensor, is `safe_tex` and prints unlike
    every other tensor (the defaults of those not renamed)."""
    for name, tex in names.items():
        if name not in TENSORS:
            raise SpecError(f"unknown tensor {name!r} in the notation's names; known: {', '.join(TENSORS)}")
        if not isinstance(tex, str) or not safe_tex(tex):
            raise SpecError(f"name of {name} must be a short LaTeX symbol such as X, \\hat{{S}} or W^{{Q}}: at "
                            f"most {MAX_NAME} characters, letters, digits, ' and balanced braces, one ^ and one _ "
                            f"per group, and the commands {', '.join(sorted(_WITH_ARGUMENT | _SYMBOLS))}; got "
                            f"{tex[:MAX_NAME + 10]!r}")
        alike = [m for m, t in TENSORS.items() if m != name and _together(name, m)
                 and _printed(names.get(m, t.latex)) == _printed(tex)]
        if alike:
            raise SpecError(f"name {tex!r} of {name} is also the name of {', '.join(alike)}: two tensors would "
                            f"print alike; rename {'it' if len(alike) == 1 else 'them'} too or pick another name")


def _printed(tex: str) -> str:
    """`tex` as compared for printing alike: no spaces, no empty scripts, no braces that only group (`{Q}`, `{{Q}}`
    and `Q^{}` print as Q); braces after a command or a script are kept."""
    tex = "".join(tex.split())
    while (shorter := tex.replace("^{}", "").replace("_{}", "")) != tex:
        tex = shorter
    out, kept = [], []
    for c in tex:
        if c == "{":
            kept.append(bool(_OPENS_ARGUMENT.search("".join(out))))
            if kept[-1]:
                out.append(c)
        elif c == "}":
            if kept.pop():
                out.append(c)
        else:
            out.append(c)
    return "".join(out)


_OPENS_ARGUMENT = re.compile(r"(\\[A-Za-z]+|[\^_])$")


def _together(a: str, b: str) -> bool:
    """Whether tensors a and b can appear in one derivation: parameters of two different scores (general's W_a
    and additive's W_a share a default name) never do."""
    score_a, score_b = _SCORE_OF.get(a.removeprefix("d")), _SCORE_OF.get(b.removeprefix("d"))
    return score_a is None or score_b is None or score_a == score_b


_SCORE_OF = {p.tensor: name for name, s in score.SCORES.items() for p in s.params}
