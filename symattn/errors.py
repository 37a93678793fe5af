"""Error types: every user-facing failure is a ValueError subclass with a one-line message."""
from __future__ import annotations


class SymattnError(ValueError):
    """Base class for errors the CLI turns into a one-line message and exit code 2."""


class SpecError(SymattnError):
    """An AttentionSpec field has a bad value; the message names the field and what is allowed."""


class SizeTooLargeError(SymattnError):
    """The chosen sizes are too large to expand into explicit scalar symbols."""


class InputError(SymattnError):
    """A numeric input (array, mask, dtype) is unusable; the message names the argument."""
