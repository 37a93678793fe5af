"""The SymPy-free table of score names (symattn/symbolic/score_names.py), rendered from score.py's SCORES."""
from __future__ import annotations

from ..filestamp import stamp
from ..symbolic.score import SCORES
from .templates import ENV, HEADER

MODULE = "score_names"


def render(command: str = "symattn generate --all  (from a source checkout)") -> str:
    """score_names.py's source (deterministic): every score's parameter names, whether it is scaled, its text."""
    header = HEADER.substitute(source="the scores of symattn/symbolic/score.py", command=command)
    return stamp(ENV.get_template(f"{MODULE}.py.j2").render(
        header=header, params=[(repr(key), repr(tuple(p.name for p in s.params))) for key, s in SCORES.items()],
        unscaled=repr(tuple(key for key, s in SCORES.items() if not s.scaled)),
        texts=[(repr(key), repr(s.text)) for key, s in SCORES.items()]))  # Python literals
