"""Dispatch to the generated loop kernels (symattn/attention_loops.py): dtype, serial or parallel.

Arrays arrive validated and flattened: Q (Bq, n_q, d_k), K (Bk, n_k, d_k), V (Bv, n_k, d_v),
bias (Bm, n_q, n_k) or (0, 0, 0), batch (B, 4) rows of each flattened batch element.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from . import attention_loops as loops

MASKED_ROWS = {"zero": 0, "uniform": 1, "nan": 2}
#: prange pays off above this many multiply-adds (a parallel call costs ~1.2 us more, measured here).
PARALLEL_WORK = 1 << 17


def _pick(name: str, dtype: np.dtype, batch: np.ndarray, work: int):
    suffix = "f32" if dtype == np.float32 else "f64"
    parallel = batch.shape[0] > 1 and work >= PARALLEL_WORK
    return getattr(loops, f"{name}_parallel_{suffix}" if parallel else f"{name}_{suffix}")


def _work(Q, K, V, batch) -> int:
    return batch.shape[0] * Q.shape[1] * K.shape[1] * (Q.shape[2] + V.shape[2])


def forward(Q, K, V, bias, batch, causal: bool, scale: float, masked_rows: str):
    """O (B, n_q, d_v) and the row log-sum-exp LSE (B, n_q)."""
    B, n_q, d_v = batch.shape[0], Q.shape[1], V.shape[2]
    O = np.empty((B, n_q, d_v), dtype=Q.dtype)
    LSE = np.empty((B, n_q), dtype=Q.dtype)
    kernel = _pick("attention_forward", Q.dtype, batch, _work(Q, K, V, batch))
    kernel(Q, K, V, bias, batch, causal, scale, MASKED_ROWS[masked_rows], O, LSE)
    return O, LSE


def backward(Q, K, V, bias, batch, causal: bool, scale: float, masked_rows: str, O, LSE, dO):
    """dQ (B, n_q, d_k), dK (B, n_k, d_k), dV (B, n_k, d_v), one slice per flattened batch element."""
    B = batch.shape[0]
    dQ = np.empty((B,) + Q.shape[1:], dtype=Q.dtype)
    dK = np.empty((B,) + K.shape[1:], dtype=Q.dtype)
    dV = np.empty((B,) + V.shape[1:], dtype=Q.dtype)
    kernel = _pick("attention_backward", Q.dtype, batch, 2 * _work(Q, K, V, batch))
    kernel(Q, K, V, bias, batch, causal, scale, MASKED_ROWS[masked_rows], O, LSE, dO, dQ, dK, dV)
    return dQ, dK, dV


def _fingerprint() -> str:
    """Hash of symattn's own source: generated kernels are cached per generator version."""
    import hashlib
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where verify/bench keep generated unrolled kernels: $SYMATTN_CACHE or ~/.cache/symattn/kernels/<fingerprint>
    (a changed generator never reuses kernels written by an older one)."""
    return _cache_root() / _fingerprint()


def _cache_root() -> Path:
    return Path(os.environ.get("SYMATTN_CACHE") or Path.home() / ".cache" / "symattn") / "kernels"


def load_unrolled(spec, folder=None, progress=None):
    """The module of `spec`'s unrolled kernels, generated into `folder` (default: cache_dir()) if needed.

    Returns None where unrolled kernels do not pay (see codegen.unrolled.UNROLL_LIMIT)."""
    from .codegen import generate  # codegen needs SymPy: loaded only when kernels must be written
    from .codegen.unrolled import pays_for
    if not pays_for(spec):
        return None
    folder = cache_dir() if folder is None else folder
    path = folder / f"{spec.name}.py"
    if not path.exists():
        generate(spec, folder, **({"progress": progress} if progress else {}))
    name = f"symattn_generated_{spec.name}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # Numba's cache pickles the module name: it must resolve on reload
    module_spec.loader.exec_module(module)
    return module
