"""Progress reporting for long work (expansion, proofs, compiles): a callable taking one message."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

Progress = Callable[[str], None]


def silent(message: str) -> None:
    """A Progress that shows nothing."""


def to_stream(stream: TextIO | None = None, prefix: str = "symattn") -> Progress:
    """A Progress that writes `prefix [elapsed] message` lines to `stream` (stderr by default)."""
    start = time.perf_counter()

    def report(message: str) -> None:
        out = stream or sys.stderr
        print(f"{prefix} [{time.perf_counter() - start:6.2f} s] {message}", file=out, flush=True)

    return report
