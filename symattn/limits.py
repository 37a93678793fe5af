"""What symattn will allocate and compute, checked before it does: memory, the worked example's sizes, seeds.

SymPy-free and cheap: every command and the numeric API call these before any heavy work, so a bad size is a
one-line error naming the limit and what to use instead, never an OOM kill or a run of many minutes.
"""
from __future__ import annotations

import operator
import os
from dataclasses import dataclass

from .errors import SizeTooLargeError, SymattnError

#: `symattn run` derives and proves one head and a two-head layer of the variant, expands them and compiles unrolled
#: kernels for the sentence: its cost grows with the tokens, the widths and the score. Measured on 2 cores (a fresh
#: kernel cache, another process busy on the second core), tokens × width:
#:   dot       8 × 4: 32 s (47 s with relative-bias:2); 6 × 6: 24 s; 4 × 8: 17 s
#:   general   8 × 4: 56-59 s; 6 × 6: 58 s; with a score mod 8 × 4 took 79 s, so 24 cells: 8 × 3 45 s, 3 × 8 40 s
#:   additive  8 × 2: 64 s, hidden 8 at 2 × 8: 102 s, so 6 tokens, widths (hidden units included) <= 6 and 16 cells:
#:             4 × 4 with hidden 4 53 s, 6 × 2 39 s; with a score mod 12 cells: 2 × 6 with hidden 6 45-48 s
#:   cosine    6 × 4: 83 s, 4 × 8: 178 s (130 s of it the layer's proofs), so 16 cells: 8 × 2 49 s (50 s with
#:             window:2), 2 × 8 48 s; with a score mod 8 × 2 took 63 s, so 12 cells: 6 × 2 41-45 s
#: Masks (causal, window, prefix) add nothing beyond the noise. Over these limits a run takes minutes.


@dataclass(frozen=True)
class RunLimit:
    """The worked example's sizes for one score: at most `tokens` tokens, every width (d_model, d_k, d_v; the
    additive score's hidden units too) at most `width`, and tokens × widest width at most `cells`, or `mod_cells`
    with a score mod (ALiBi, soft-cap, relative bias, a user's)."""
    tokens: int
    width: int
    cells: int
    mod_cells: int

    def max_cells(self, score_mod: bool) -> int:
        return self.mod_cells if score_mod else self.cells


#: The worked example's limits by score (each within about 60 s at its worst corner; see the table above).
RUN_LIMITS = {
    "dot": RunLimit(tokens=8, width=8, cells=36, mod_cells=36),
    "general": RunLimit(tokens=8, width=8, cells=32, mod_cells=24),
    "additive": RunLimit(tokens=6, width=6, cells=16, mod_cells=12),
    "cosine": RunLimit(tokens=8, width=8, cells=16, mod_cells=12),
}
#: A score without its own measured limits (one just added to symattn/symbolic/score.py): the smallest of all.
UNMEASURED = RunLimit(*(min(getattr(limit, f) for limit in RUN_LIMITS.values())
                        for f in ("tokens", "width", "cells", "mod_cells")))
#: The dot product's limits (the default run's), by their old names.
RUN_MAX_TOKENS = RUN_LIMITS["dot"].tokens
RUN_MAX_WIDTH = RUN_LIMITS["dot"].width
RUN_MAX_CELLS = RUN_LIMITS["dot"].cells
#: Share of the memory available now that one array symattn allocates may take.
MEMORY_SHARE = 0.5


def available_bytes() -> int:
    """Memory available now (Linux MemAvailable), else half the physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 1 << 34


#: Arrays up to this size pass the memory check without reading /proc/meminfo (14 µs a call, measured: 3% of a
#: (8,256,64) float32 forward with a score mod).
SMALL_BYTES = 1 << 26


def check_memory(nbytes: int, what: str, instead: str, error=SizeTooLargeError) -> None:
    """Refuse to allocate `nbytes` for `what` when it exceeds MEMORY_SHARE of the memory available now (arrays of
    at most SMALL_BYTES pass without asking)."""
    if nbytes <= SMALL_BYTES:
        return
    limit = int(available_bytes() * MEMORY_SHARE)
    if nbytes > limit:
        raise error(f"{what} would need {_bytes(nbytes)}, over the limit of {_bytes(limit)} "
                    f"(half the memory available now); {instead}")


def _bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def check_run_sizes(tokens: int, d_model: int, d_k: int, d_v: int, *, score: str = "dot", hidden=None,
                    score_mod=None, names=("--d-model", "--d-k", "--d-v"), source: str = "the sentence") -> None:
    """The worked example's limits for its variant (RUN_LIMITS): `symattn run` expands and proves everything at
    these sizes. `score`, `hidden` (the additive score's units, a width) and `score_mod` (any value but None or
    "none" counts) are run()'s; an unknown score or a missing hidden gets the dot product's limits here and its
    own error from the spec. `names` and `source` say where the sizes came from (command-line flags and the
    sentence, or an inputs file's fields)."""
    limit, cells = _run_limit(score, hidden, score_mod)
    modded = _modded(score_mod)
    additive = limit is RUN_LIMITS["additive"]
    widths = [*zip(names, (d_model, d_k, d_v))] + ([("--hidden", hidden)] if additive else [])
    variant = "" if limit == RUN_LIMITS["dot"] else f" for the {score} score" + (" with a score mod" if modded else "")
    units = ", its hidden units counting as a width" if additive else ""
    instead = ("use `symattn derive --indexed-only` for the formulas at any size and symattn.attention for "
               "numbers")
    for name, value in widths:
        if value > limit.width:
            raise SizeTooLargeError(
                f"{name} {value} is over the worked example's limit of {limit.width}{variant} (run proves every "
                f"step exactly{units}); {instead}")
    width = max(value for _, value in widths)
    if tokens > limit.tokens or tokens * width > cells:
        fits = (f" (at most {min(limit.tokens, cells // width)} tokens at width {width}, or width "
                f"{min(limit.width, cells // tokens)} at {tokens} tokens)" if tokens <= limit.tokens else "")
        raise SizeTooLargeError(
            f"{source} has {tokens} tokens at width {width}, over the worked example's limit{variant} "
            f"({limit.tokens} tokens, tokens × width <= {cells}{units}: run proves every step and compiles kernels "
            f"for exactly these sizes); shorten it or narrow it{fits}, or {instead}")


def _modded(score_mod) -> bool:
    return score_mod not in (None, "none", "")


def _run_limit(score, hidden, score_mod) -> tuple[RunLimit, int]:
    """The variant's RunLimit and its tokens × width limit; a score without measured limits gets the smallest
    (UNMEASURED); a name that is no score, or additive without its hidden units, the dot product's (the spec
    gives those their own error)."""
    from .symbolic.score_names import PARAMS  # names only: no SymPy
    counted = isinstance(hidden, int) and not isinstance(hidden, bool)
    known = isinstance(score, str) and score in RUN_LIMITS and (counted or score != "additive")
    new = isinstance(score, str) and score in PARAMS and score not in RUN_LIMITS
    limit = RUN_LIMITS[score] if known else UNMEASURED if new else RUN_LIMITS["dot"]
    return limit, limit.max_cells(_modded(score_mod))


def run_width(tokens: int, *, score: str = "dot", hidden=None, score_mod=None, preferred: int = 4) -> int:
    """The worked example's default width for `tokens` tokens: the widest up to `preferred` that the variant's
    limits (RUN_LIMITS) allow, even where it can be (the two-head layer halves it), so `symattn run --score
    cosine` fits on the default sentence by narrowing; or `preferred` where none fits (check_run_sizes then names
    the limit)."""
    limit, cells = _run_limit(score, hidden, score_mod)
    fit = min(preferred, limit.width, cells // max(tokens, 1))
    return preferred if fit < 1 else fit if fit == 1 else fit - fit % 2


def seed(value, name: str = "seed") -> int:
    """A non-negative integer seed (NumPy's generators refuse negative ones)."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < 0:
        raise SymattnError(f"{name} must be a non-negative integer, got {value!r}")
    return number
