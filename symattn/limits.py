"""What symattn will allocate and compute, checked before it does: memory, the worked example's sizes, seeds.

SymPy-free and cheap: every command and the numeric API call these before any heavy work, so a bad size is a
one-line error naming the limit and what to use instead, never an OOM kill or a run of many minutes.
"""
from __future__ import annotations

import operator
import os

from .errors import SizeTooLargeError, SymattnError

#: `symattn run` derives, proves, expands a two-head layer and compiles unrolled kernels for the sentence. Measured
#: on 2 cores: 8 tokens at width 4 take 39 s, 6 at width 6 31 s, 4 at width 8 22 s; 8 tokens at width 8 ran over
#: 4 minutes (the layer's proofs), 16 tokens over 5. So: at most 8 tokens, widths of 8, tokens × width <= 36.
RUN_MAX_TOKENS = 8
RUN_MAX_WIDTH = 8
RUN_MAX_CELLS = 36
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


def check_memory(nbytes: int, what: str, instead: str, error=SizeTooLargeError) -> None:
    """Refuse to allocate `nbytes` for `what` when it exceeds MEMORY_SHARE of the memory available now."""
    limit = int(available_bytes() * MEMORY_SHARE)
    if nbytes > limit:
        raise error(f"{what} would need {_bytes(nbytes)}, over the limit of {_bytes(limit)} "
                    f"(half the memory available now); {instead}")


def _bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def check_run_sizes(tokens: int, d_model: int, d_k: int, d_v: int, *, names=("--d-model", "--d-k", "--d-v"),
                    source: str = "the sentence") -> None:
    """The worked example's limits: `symattn run` expands and proves everything at these sizes. `names` and
    `source` say where the sizes came from (command-line flags and the sentence, or an inputs file's fields)."""
    for name, value in zip(names, (d_model, d_k, d_v)):
        if value > RUN_MAX_WIDTH:
            raise SizeTooLargeError(
                f"{name} {value} is over the worked example's limit of {RUN_MAX_WIDTH} (run proves every step "
                f"exactly); use `symattn derive --indexed-only` for the formulas at any size and "
                f"symattn.attention for numbers")
    if tokens > RUN_MAX_TOKENS or tokens * max(d_model, d_k, d_v) > RUN_MAX_CELLS:
        raise SizeTooLargeError(
            f"{source} has {tokens} tokens at width {max(d_model, d_k, d_v)}, over the worked example's limit "
            f"({RUN_MAX_TOKENS} tokens, tokens × width <= {RUN_MAX_CELLS}: run proves every step and compiles "
            f"kernels for exactly these sizes); shorten it or narrow it, or use `symattn derive --indexed-only` for "
            f"the formulas and symattn.attention for numbers")


def seed(value, name: str = "seed") -> int:
    """A non-negative integer seed (NumPy's generators refuse negative ones)."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < 0:
        raise SymattnError(f"{name} must be a non-negative integer, got {value!r}")
    return number
