"""`symattn.reference`: the NumPy reference, importable as `from symattn.reference import ...`.

The module is symattn.numeric.reference itself (one object under two names), so its classes and registries are shared."""
import sys

from .numeric import reference as _module

sys.modules[__name__] = _module
