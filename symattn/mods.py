"""`symattn.mods`: the score mods (alibi, softcap, relative_bias, score_mod, ops), importable as `from symattn.mods import ...`.

The module is symattn.symbolic.mods itself (one object under two names), so its classes and registries are shared."""
import sys

from .symbolic import mods as _module

sys.modules[__name__] = _module
