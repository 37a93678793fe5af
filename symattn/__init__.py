"""symattn: derive, explain, generate and check the attention mechanism of transformers.

    spec = symattn.AttentionSpec(3, 4, 2)        # n_q, n_k, d_k (d_v = d_k)
    d = symattn.derive(spec)                      # steps, explicit + indexed, proofs attached
    print(d.to_latex())

The symbolic core is imported eagerly; the numeric (Numba) side is loaded on first use.
"""
from __future__ import annotations

import importlib

from .derive import Derivation, Step, derive
from .errors import InputError, SizeTooLargeError, SpecError, SymattnError
from .prove import Proof, prove
from .multihead import derive_multihead
from .spec import AttentionSpec, MultiHeadSpec

__version__ = "0.1.0"

_LAZY: dict[str, str] = {  # numeric (Numba) API name -> module, imported on first use
    "attention": "api", "attention_backward": "api", "attention_weights": "api", "generate": "codegen",
    "verify": "verification", "VerifyReport": "verification", "gradcheck": "finite_differences",
    "GradcheckReport": "finite_differences", "verify_multihead": "verification",
    "multihead_attention": "multihead_api", "multihead_attention_backward": "multihead_api",
}

__all__ = sorted(["AttentionSpec", "MultiHeadSpec", "Derivation", "Step", "derive", "derive_multihead", "Proof", "prove",
                  "InputError",
                  "SizeTooLargeError", "SpecError", "SymattnError", *_LAZY])


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'symattn' has no attribute {name!r}")
