"""The plain fast path of the numeric API: exact C-contiguous float32/float64 ndarrays, all 2-D or all 3-D with one
batch size, no mask, plain options. At (1,5,2) a call is about 2 µs, so this path checks the arguments' types
itself, calls the compiled entry point of the serial kernels directly and keeps small scratch buffers; everything
else goes through api._prepare, which checks all.
"""
from __future__ import annotations

import math

import numpy as np

from . import kernels
from .kernels import identity_batch  # noqa: F401  (plain.identity_batch, as api knows it)
from .arrays import _check_dO
from .saved import read_only

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_NDARRAY, _MASKED_ROWS = np.ndarray, kernels.MASKED_ROWS  # (module globals: a lookup less per check)
_PER_KEY = kernels.loops.BACKWARD_SCRATCH  # scratch entries per key of the serial backward
NOBIAS = {_F32: np.zeros((0, 0, 0), np.float32), _F64: np.zeros((0, 0, 0), np.float64)}
_SCALES: dict[int, float] = {}  # d_k -> 1/sqrt(d_k)


def plain(q, k, v, mask, is_causal, scale, masked_rows):
    """The scale when (q, k, v) take the fast path, else None: exact ndarrays, C-contiguous, one float dtype,
    all 2-D or all 3-D with one batch size, matching sizes, d_v <= d_k (the output is no larger than q, so no
    memory check is needed), no mask, plain options. Everything else goes through `_prepare`, which checks all."""
    if mask is not None or type(q) is not _NDARRAY or type(k) is not _NDARRAY or type(v) is not _NDARRAY:
        return None
    dt, qs, ks, vs = q.dtype, q.shape, k.shape, v.shape
    n = len(qs)
    if n != len(ks) or n != len(vs) or not 2 <= n <= 3 or (n == 3 and not qs[0] == ks[0] == vs[0]):
        return None
    if (dt is not _F32 and dt is not _F64) or k.dtype is not dt or v.dtype is not dt or qs[-1] != ks[-1] \
            or ks[-2] != vs[-2] or not ks[-2] or not 0 < vs[-1] <= qs[-1] or (is_causal is not False and is_causal
                                                                             is not True) \
            or (masked_rows != "zero" and (type(masked_rows) is not str or masked_rows not in _MASKED_ROWS)) \
            or not (q.flags.c_contiguous and k.flags.c_contiguous and v.flags.c_contiguous):
        return None
    if scale is None:
        sc = _SCALES.get(qs[-1])
        return sc if sc is not None else _SCALES.setdefault(qs[-1], 1.0 / math.sqrt(qs[-1]))
    return scale if type(scale) is float and 0.0 < scale < math.inf else None


#: (kernel, dtype) -> compiled entry point of a serial plain kernel (the fast path checks argument types itself)
_ENTRIES: dict = {}


_SMALL_SCRATCH: dict = {}  # (B, n_q, n_k, dtype) -> (LSE (B, n_q), row (n_k,)) of the serial forward kernel


def _small_scratch(B: int, n_q: int, n_k: int, dt) -> tuple[np.ndarray, np.ndarray]:
    """The serial forward kernel's LSE and score row as shared scratch, found with one lookup (a call at (1,5,2)
    takes about 2 µs, so two lookups were a tenth of it). Small shapes only (B·n_q·n_k < SMALL), at most 64 kept."""
    pair = _SMALL_SCRATCH.get((B, n_q, n_k, dt))
    if pair is None:
        pair = (np.empty((B, n_q), dt), np.empty((n_k,), dt))
        if len(_SMALL_SCRATCH) < 64:
            _SMALL_SCRATCH[B, n_q, n_k, dt] = pair
    return pair


def forward_plain(q, k, v, is_causal: bool, scale: float, keep_lse: bool = True):
    """O and LSE of plain (see `plain`) inputs, shaped like q's batch. keep_lse=False, small: LSE may be a shared
    scratch buffer (the serial kernels hold the GIL, and nobody reads it)."""
    Q, K, V = (q, k, v) if q.ndim == 3 else (q[None], k[None], v[None])
    (B, n_q, _), n_k, dt = Q.shape, K.shape[1], q.dtype
    O = np.empty((B, n_q, V.shape[2]), dt)
    if B * n_q * n_k < kernels.SMALL:  # small: the serial kernel with the fewest arguments, called directly
        LSE, row = _small_scratch(B, n_q, n_k, dt)  # row: (n_k,) one row of scores
        LSE = np.empty((B, n_q), dt) if keep_lse else LSE
        _run(kernels.loops.plain_forward, dt, (Q, K, V, is_causal, scale, O, LSE, row))
    else:
        LSE = np.empty((B, n_q), dt)
        kernels.forward_into(Q, K, V, NOBIAS[dt], identity_batch(B), is_causal, scale, 0, O, LSE)
    return (O, LSE) if q.ndim == 3 else (O[0], LSE)


def plain_vjp(q, k, v, is_causal: bool, scale: float):
    """(O read-only, pullback) of plain inputs. Small problems keep all the pullback reads (copies of q, k, v,
    O, LSE, scratch) in one buffer `saved` the forward kernel fills: a pair at (1,5,2) is about 4 µs, of which each
    NumPy allocation is 0.11 µs. Larger ones copy q, k, v and keep LSE (plain_pullback)."""
    qs, ks, vs, dt = q.shape, k.shape, v.shape, q.dtype
    flat = len(qs) == 2
    (B, n_q, d_k), n_k, d_v = (1,) + qs if flat else qs, ks[-2], vs[-1]
    if B * n_q * n_k >= kernels.SMALL:
        q, k, v = q.copy(), k.copy(), v.copy()  # what the pullback reads: the caller may change theirs
        O, LSE = forward_plain(q, k, v, is_causal, scale)
        return read_only(O), plain_pullback(q, k, v, is_causal, scale, O, LSE)
    saved = np.empty(B * (n_q * (d_k + d_v + 1) + n_k * (d_k + d_v)) + _PER_KEY * n_k, dt)  # loops._saved_views
    O = np.empty((n_q, d_v) if flat else (B, n_q, d_v), dt)
    _run(kernels.loops.plain_vjp_forward, dt, (q[None], k[None], v[None], is_causal, scale, O[None], saved) if flat
         else (q, k, v, is_causal, scale, O, saved))
    O.setflags(write=False)  # as on the large path (the pullback reads saved's copy: a view would cost 0.1 µs)
    out_shape = O.shape  # the output's shape, whatever the caller does to O

    def pullback(dO) -> dict:
        dO = _plain_dO(dO, out_shape, dt)
        dq, dk, dv = np.empty(qs, dt), np.empty(ks, dt), np.empty(vs, dt)
        _run(kernels.loops.plain_vjp_backward, dt, (saved, is_causal, scale, dO[None], dq[None], dk[None], dv[None])
             if flat else (saved, is_causal, scale, dO, dq, dk, dv))
        return {"q": dq, "k": dk, "v": dv}
    return O, pullback


def _run(kernel, dt, args: tuple) -> None:
    """kernel(*args) by its recorded entry point, or through its dispatcher, recording the entry point (the
    caller checked the argument types: see `plain`)."""
    entry = _ENTRIES.get((kernel, dt))
    if entry is not None:
        entry(*args)
        return
    entry = kernels.run_recording_entry(kernel, args)  # the first call of these types: through the dispatcher
    if entry is not None:
        _ENTRIES[kernel, dt] = entry


def _plain_dO(dO, shape: tuple, dt) -> np.ndarray:
    """dO as the kernels take it: an exact C-contiguous ndarray of the output's shape and dtype passes as it is,
    anything else is checked and converted (_check_dO)."""
    if type(dO) is not _NDARRAY or dO.dtype is not dt or dO.shape != shape or not dO.flags.c_contiguous:
        return _check_dO(dO, shape, dt)
    return dO


def plain_pullback(q, k, v, is_causal: bool, scale: float, O, LSE):
    """The pullback of plain inputs past the small size (B·n_q·n_k >= kernels.SMALL; the tile kernels): dO of
    O's shape and dtype, C-contiguous, goes straight to the kernels."""
    dt, flat = q.dtype, q.ndim == 2
    Q, K, V, O3 = (q[None], k[None], v[None], O[None]) if flat else (q, k, v, O)  # (B, n, d)

    def pullback(dO) -> dict:
        dO = _plain_dO(dO, O.shape, dt)
        dq, dk, dv = np.empty(q.shape, dt), np.empty(k.shape, dt), np.empty(v.shape, dt)
        kernels.backward_into(Q, K, V, NOBIAS[dt], identity_batch(Q.shape[0]), is_causal, scale, 0, O3, LSE,
                              *((dO[None], dq[None], dk[None], dv[None]) if flat else (dO, dq, dk, dv)))
        return {"q": dq, "k": dk, "v": dv}
    return pullback
