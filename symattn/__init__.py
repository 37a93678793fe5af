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
    "AttentionSpec": "spec", "MultiHeadSpec": "spec", "Derivation": "derive", "Step": "derive", "derive": "derive",
    "derive_multihead": "multihead", "Proof": "prove", "prove": "prove",
    "attention": "api", "attention_backward": "api", "attention_weights": "api", "generate": "codegen",
    "verify": "verification", "VerifyReport": "verification", "gradcheck": "finite_differences",
    "GradcheckReport": "finite_differences", "verify_multihead": "verification",
    "multihead_attention": "multihead_api", "multihead_attention_backward": "multihead_api",
    "reference": None,
}

__all__ = sorted(["InputError", "SizeTooLargeError", "SpecError", "SymattnError", *_LAZY])


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
        value = module if _LAZY[name] is None else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'symattn' has no attribute {name!r}")


def __dir__():
    return __all__
