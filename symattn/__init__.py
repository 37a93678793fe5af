"""symattn: derive, explain, generate and check the attention mechanism of transformers.

    spec = symattn.AttentionSpec(3, 4, 2)        # n_q, n_k, d_k (d_v = d_k)
    d = symattn.derive(spec)                      # steps, explicit + indexed, proofs attached
    print(d.to_latex())

Every public name is imported on first use (PEP 562), so `import symattn` is cheap, the command line starts
without SymPy, and the numeric (Numba) side never loads the symbolic one.
"""
from __future__ import annotations

import importlib

from .errors import InputError, SizeTooLargeError, SpecError, SymattnError

__version__ = "0.1.0"

_LAZY: dict[str, str] = {  # public name -> module, imported on first use
    "AttentionSpec": "symbolic.spec", "MultiHeadSpec": "symbolic.spec", "Derivation": "symbolic.derive",
    "Step": "symbolic.derive", "derive": "symbolic.derive", "derive_multihead": "symbolic.layer",
    "Proof": "symbolic.prove", "prove": "symbolic.prove",
    "attention": "numeric.api", "attention_backward": "numeric.api", "attention_weights": "numeric.api",
    "attention_vjp": "numeric.api",
    "multihead_attention": "numeric.layer", "multihead_attention_backward": "numeric.layer",
    "multihead_attention_vjp": "numeric.layer",
    "generate": "codegen", "verify": "check.verification", "VerifyReport": "check.verification",
    "verify_multihead": "check.verification", "gradcheck": "check.finite_differences",
    "GradcheckReport": "check.finite_differences", "latex": "render.notation", "Notation": "render.notation",
}
_MODULES = {"reference": "numeric.reference", "masks": "symbolic.masks", "mods": "symbolic.mods"}  # public modules

__all__ = sorted(["InputError", "SizeTooLargeError", "SpecError", "SymattnError", *_LAZY, *_MODULES])


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{_MODULES[name]}", __name__)
    else:
        raise AttributeError(f"module 'symattn' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
