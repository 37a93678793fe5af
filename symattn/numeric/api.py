"""Numeric attention with PyTorch `scaled_dot_product_attention` semantics, on the generated loop kernels.

Arrays are positional, options keyword-only. q (..., n_q, d_k), k (..., n_k, d_k), v (..., n_k, d_v); leading
dims broadcast. float32 or float64 (one dtype for all; float16 and non-float dtypes are refused: cast first).
mask: boolean (True = may attend) or float (added to the scores), broadcastable to (..., n_q, n_k).
is_causal: lower-triangular, top-left aligned (query i sees keys j <= i). Rows with no visible key follow
masked_rows: "zero" (output 0, zero gradients; PyTorch), "uniform" (uniform weights over all keys; JAX-like),
"nan". NaN or inf in the inputs propagate as in the NumPy reference (symattn.reference): they are not checked.
Variants (symattn.numeric.variants): score "dot", "general", "additive", "cosine" with its parameters `params`
(name -> array of q's dtype), a `score_mod` (symattn.mods) and a `mask_mod` (symattn.masks, or a user's
mask_mod(b, h, q_idx, kv_idx)); for a mod or mask that reads b or h, q, k, v are (B, H, n, d) as in FlexAttention.
Without any variant option the plain dot-product fast path runs as before.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import numpy as np

from . import kernels, variants
from .saved import own, read_only
from ..errors import InputError
from ..limits import check_memory

DTYPES = (np.float32, np.float64)


@dataclass(frozen=True)
class _Problem:
    """Validated, flattened inputs: Q (Bq, n_q, d_k), K (Bk, n_k, d_k), V (Bv, n_k, d_v), bias, batch rows."""

    Q: np.ndarray
    K: np.ndarray
    V: np.ndarray
    bias: np.ndarray
    batch: np.ndarray  # (B, 4) int64
    batch_shape: tuple[int, ...]
    causal: bool
    scale: float
    masked_rows: str


def _array(name: str, x) -> np.ndarray:
    if isinstance(x, np.ma.MaskedArray) and np.ma.is_masked(x):
        raise InputError(f"{name} is a masked array with masked entries, whose mask would be dropped: give the data "
                         f"and pass the mask as mask= (True where a key is visible)")
    x = np.asarray(x)
    if x.dtype == np.float16:
        raise InputError(f"{name} has dtype float16, which is not supported: cast to float32 ({name}.astype(np.float32))")
    if x.dtype.type not in DTYPES:
        raise InputError(f"{name} must be a float32 or float64 array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise InputError(f"{name} must have shape (..., n, d) with at least 2 dims, got shape {x.shape}")
    if not x.dtype.isnative:  # big-endian data (from a file, say): the kernels take the machine's byte order
        x = x.astype(x.dtype.newbyteorder("="))
    return x


def _rows(shape: tuple[int, ...], batch_shape: tuple[int, ...]) -> np.ndarray:
    """For every flattened batch element, the row of an array whose batch dims are `shape` (broadcast)."""
    index = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    return np.broadcast_to(index.reshape((1,) * (len(batch_shape) - len(shape)) + shape), batch_shape).ravel()


def _flat(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape((math.prod(x.shape[:-2]),) + x.shape[-2:]))


def _bias(mask, dtype, n_q: int, n_k: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim < 2:
        raise InputError(f"mask must have shape (..., n_q, n_k) = (..., {n_q}, {n_k}), got shape {mask.shape}")
    try:
        mask = np.broadcast_to(mask, mask.shape[:-2] + (n_q, n_k))
    except ValueError:
        raise InputError(f"mask of shape {mask.shape} does not broadcast to (..., n_q, n_k) = (..., {n_q}, {n_k})") from None
    if mask.dtype == bool:
        return np.where(mask, dtype.type(0), dtype.type(-np.inf))
    if mask.dtype.kind != "f":
        raise InputError(f"mask must be boolean (True = may attend) or float (added to the scores), got dtype {mask.dtype}")
    return mask.astype(dtype)


def bias_rows(mask, dtype, n_q: int, n_k: int, batch_shape: tuple[int, ...]):
    """Additive bias (Bm, n_q, n_k) of a mask (or an empty (0, 0, 0) array) and the bias row of every
    flattened batch element of `batch_shape`."""
    if mask is None:
        return np.zeros((0, 0, 0), dtype=dtype), np.zeros(math.prod(batch_shape), dtype=np.int64)
    bias = _bias(mask, dtype, n_q, n_k)
    return _flat(bias), _rows(bias.shape[:-2], batch_shape)


def check_scale(scale, d_k: int) -> float:
    """The score scale as a float: 1/√d_k by default, else any positive finite real scalar (int, float,
    Fraction, NumPy scalar or 0-d array; not bool)."""
    if scale is None:
        return 1.0 / math.sqrt(d_k)
    value = scale
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    shown = repr(scale) if len(repr(scale)) <= 40 else repr(scale)[:37] + "..."
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise InputError(f"scale must be a positive finite real number, got {shown}")
    try:
        value = float(value)
    except OverflowError:  # an int or Fraction beyond float64
        value = math.inf
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"scale must be a positive finite number, got {shown}")
    return value


def check_causal(is_causal) -> bool:
    """is_causal must be a bool (True, False or a NumPy bool), as in PyTorch."""
    if not isinstance(is_causal, (bool, np.bool_)):
        raise InputError(f"is_causal must be True or False, got {type(is_causal).__name__} {str(is_causal)[:40]}")
    return bool(is_causal)


def check_masked_rows(masked_rows) -> str:
    if not isinstance(masked_rows, str) or masked_rows not in kernels.MASKED_ROWS:
        raise InputError(f"masked_rows must be one of {', '.join(map(repr, kernels.MASKED_ROWS))}, got {masked_rows!r}")
    return masked_rows


def _prepare(q, k, v, mask, is_causal, scale, masked_rows) -> _Problem:
    q, k, v = _array("q", q), _array("k", k), _array("v", v)
    if not q.dtype == k.dtype == v.dtype:
        raise InputError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    (n_q, d_k), (n_k, d_kk), (n_v, d_v) = q.shape[-2:], k.shape[-2:], v.shape[-2:]
    if d_k != d_kk:
        raise InputError(f"q and k must have the same last dim d_k, got q {q.shape} and k {k.shape}")
    if n_k != n_v:
        raise InputError(f"k and v must have the same number of keys n_k (dim -2), got k {k.shape} and v {v.shape}")
    if d_k == 0 or n_k == 0:
        raise InputError(f"attention needs d_k >= 1 and n_k >= 1, got q {q.shape}, k {k.shape}")
    masked_rows, is_causal, scale = check_masked_rows(masked_rows), check_causal(is_causal), check_scale(scale, d_k)
    if mask is None and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:  # (native f32/f64: _array)
        # one batch shape, no mask: the identity rows [z, z, z, 0] (cached), no broadcasting to work out
        batch_shape = q.shape[:-2]
        return _Problem(_flat(q), _flat(k), _flat(v), _NOBIAS[q.dtype], _identity_batch(math.prod(batch_shape)),
                        tuple(batch_shape), is_causal, scale, masked_rows)
    bias = _NOBIAS[q.dtype] if mask is None else _bias(mask, q.dtype, n_q, n_k)
    shapes = {"q": q.shape[:-2], "k": k.shape[:-2], "v": v.shape[:-2], "mask": bias.shape[:-2] if mask is not None else ()}
    try:
        batch_shape = np.broadcast_shapes(*shapes.values())
    except ValueError:
        raise InputError("leading (batch) dims do not broadcast: " + ", ".join(f"{n} {s}" for n, s in shapes.items())) from None
    batch = np.stack([_rows(shapes[n], batch_shape) for n in ("q", "k", "v", "mask")], axis=1) if batch_shape else \
        np.zeros((1, 4), dtype=np.int64)
    return _Problem(_flat(q), _flat(k), _flat(v), _flat(bias) if mask is not None else bias,
                    np.ascontiguousarray(batch, dtype=np.int64), tuple(batch_shape), is_causal, scale, masked_rows)


def check_output(shape: tuple[int, ...], dtype, what: str) -> None:
    """Refuse an output that would not fit in memory, before allocating it."""
    check_memory(math.prod(shape) * np.dtype(dtype).itemsize, f"{what} of shape {shape}",
                 "split the batch or the queries into chunks", error=InputError)


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_NOBIAS = {_F32: np.zeros((0, 0, 0), np.float32), _F64: np.zeros((0, 0, 0), np.float64)}
_BATCHES: dict[int, np.ndarray] = {}  # B -> identity batch rows (B, 4), read-only
_SCALES: dict[int, float] = {}  # d_k -> 1/sqrt(d_k)


def _identity_batch(B: int) -> np.ndarray:
    """Batch rows [z, z, z, 0] of B unbroadcast batch elements (no mask), cached."""
    rows = _BATCHES.get(B)
    if rows is None:
        rows = np.zeros((B, 4), dtype=np.int64)
        rows[:, :3] = np.arange(B)[:, None]
        rows.setflags(write=False)
        if len(_BATCHES) < 64:  # a program uses few batch sizes; the cache stays small whatever it does
            _BATCHES[B] = rows
    return rows


def _plain(q, k, v, mask, is_causal, scale, masked_rows):
    """The scale when (q, k, v) take the fast path, else None: exact ndarrays, C-contiguous, one float dtype,
    all 2-D or all 3-D with one batch size, matching sizes, d_v <= d_k (the output is no larger than q, so no
    memory check is needed), no mask, plain options. Everything else goes through `_prepare`, which checks all."""
    if mask is not None or type(q) is not np.ndarray or type(k) is not np.ndarray or type(v) is not np.ndarray:
        return None
    dt, qs, ks, vs = q.dtype, q.shape, k.shape, v.shape
    if len(qs) == 3:
        if len(ks) != 3 or len(vs) != 3 or not qs[0] == ks[0] == vs[0]:
            return None
    elif len(qs) != 2 or len(ks) != 2 or len(vs) != 2:
        return None
    if (dt is not _F32 and dt is not _F64) or k.dtype is not dt or v.dtype is not dt or qs[-1] != ks[-1] \
            or ks[-2] != vs[-2] or not ks[-2] or not 0 < vs[-1] <= qs[-1] or (is_causal is not False and is_causal
                                                                             is not True) \
            or (masked_rows != "zero" and (type(masked_rows) is not str or masked_rows not in kernels.MASKED_ROWS)) \
            or not (q.flags.c_contiguous and k.flags.c_contiguous and v.flags.c_contiguous):
        return None
    if scale is None:
        sc = _SCALES.get(qs[-1])
        return sc if sc is not None else _SCALES.setdefault(qs[-1], 1.0 / math.sqrt(qs[-1]))
    return scale if type(scale) is float and 0.0 < scale < math.inf else None


#: (kernel, dtype) -> compiled entry point of a serial plain kernel (the fast path checks argument types itself)
_ENTRIES: dict = {}


def _record(kernel, dt, args: tuple) -> None:
    """Run `kernel` through its dispatcher and keep its entry point for the next call of these types."""
    entry = kernels.run_recording_entry(kernel, args)
    if entry is not None:
        _ENTRIES[kernel, dt] = entry


_SCRATCH: dict = {}  # (shape, dtype) -> a small buffer the serial plain kernels write and nobody reads after


def _scratch(shape: tuple, dt) -> np.ndarray:
    """A shared buffer of this shape for the serial plain kernels: they hold the GIL, so no two calls share it at
    once, and a call reads nothing it did not write first (small shapes are kept, at most 64 of them)."""
    buf = _SCRATCH.get((shape, dt))
    if buf is None:
        buf = np.empty(shape, dt)
        if buf.size <= 1 << 14 and len(_SCRATCH) < 64:  # at most 64 x 128 KiB kept
            _SCRATCH[shape, dt] = buf
    return buf


def _forward_plain(q, k, v, is_causal: bool, scale: float, keep_lse: bool = True):
    """O and LSE of plain (see `_plain`) inputs, shaped like q's batch. keep_lse=False: LSE may be a shared
    scratch buffer (the serial kernels hold the GIL, and nobody reads it)."""
    Q, K, V = (q, k, v) if q.ndim == 3 else (q[None], k[None], v[None])
    (B, n_q, _), dt = Q.shape, q.dtype
    O = np.empty((B, n_q, V.shape[2]), dt)
    LSE = np.empty((B, n_q), dt) if keep_lse else _scratch((B, n_q), dt)
    if B * n_q * K.shape[1] < kernels.SMALL:  # small: the serial kernel with the fewest arguments, called directly
        kernel = kernels.loops.plain_forward
        entry = _ENTRIES.get((kernel, dt))
        row = _scratch((K.shape[1],), dt)  # (n_k,) one row of scores
        if entry is not None:
            entry(Q, K, V, is_causal, scale, O, LSE, row)
        else:
            _record(kernel, dt, (Q, K, V, is_causal, scale, O, LSE, row))
    else:
        kernels.forward_into(Q, K, V, _NOBIAS[dt], _identity_batch(B), is_causal, scale, 0, O, LSE)
    return (O, LSE) if q.ndim == 3 else (O[0], LSE)


def _forward(p: _Problem, variant=None, theta=None, backward: bool = True):
    """O, LSE and what the backward reads again (variants.forward; None for the plain kernels)."""
    if variant is not None:
        return variants.forward(variant, p, theta, backward)
    return (*kernels.forward(p.Q, p.K, p.V, p.bias, p.batch, p.causal, p.scale, p.masked_rows), None)


def _backward(p: _Problem, variant, theta, O, LSE, dO, saved=None):
    """(dQ, dK, dV, {θ name: gradient}) of flattened inputs."""
    if variant is not None:
        return variants.backward(variant, p, theta, O, LSE, dO, saved)
    return (*kernels.backward(p.Q, p.K, p.V, p.bias, p.batch, p.causal, p.scale, p.masked_rows, O, LSE, dO), {})


def attention(q, k, v, *, score="dot", params=None, score_mod=None, mask_mod=None, mask=None, is_causal=False,
              scale=None, masked_rows="zero") -> np.ndarray:
    """O = softmax(S + mask) v, shape (..., n_q, d_v): S = scale·q kᵀ, or another score (params θ), its
    score_mod and mask_mod (see symattn.numeric.variants)."""
    if score_mod is None and mask_mod is None and params is None and score == "dot":
        sc = _plain(q, k, v, mask, is_causal, scale, masked_rows)
        if sc is not None:
            return _forward_plain(q, k, v, is_causal, sc, keep_lse=False)[0]
    p, variant, theta = _setup(q, k, v, score, params, score_mod, mask_mod, mask, is_causal, scale, masked_rows)
    check_output(p.batch_shape + (p.Q.shape[1], p.V.shape[2]), p.Q.dtype, "attention's output")
    O = _forward(p, variant, theta, backward=False)[0]
    return O.reshape(p.batch_shape + O.shape[1:])


def _setup(q, k, v, score, params, score_mod, mask_mod, mask, is_causal, scale, masked_rows):
    """The prepared problem, its variant (None: plain dot product) and θ bound to the kernel's parameters."""
    p = _prepare(q, k, v, mask, is_causal, scale, masked_rows)
    variant, theta = variants.prepare(score, params, score_mod, mask_mod, p.causal, scale, p.batch_shape, p.Q.dtype,
                                      p.Q.shape[2], (p.Q.shape[1], p.K.shape[1]))
    return p, variant, theta


def attention_weights(q, k, *, score="dot", params=None, score_mod=None, mask_mod=None, mask=None, is_causal=False,
                      scale=None, masked_rows="zero") -> np.ndarray:
    """P = softmax(S + mask), shape (..., n_q, n_k), for inspection. Plain dot product: S = q kᵀ by BLAS, then
    the generated softmax row kernel in place (no n_k × n_k temporary); a variant: its kernels with V = I."""
    k = _array("k", k)
    if score_mod is not None or mask_mod is not None or params is not None or score != "dot":
        eye = np.eye(k.shape[-2], dtype=k.dtype)  # O = P I = P
        return attention(q, k, eye, score=score, params=params, score_mod=score_mod, mask_mod=mask_mod, mask=mask,
                         is_causal=is_causal, scale=scale, masked_rows=masked_rows)
    p = _prepare(q, k, k, mask, is_causal, scale, masked_rows)  # k stands in for v: only its shape is read
    n_q, n_k = p.Q.shape[1], p.K.shape[1]
    check_output(p.batch_shape + (n_q, n_k), p.Q.dtype, "attention_weights' output")
    S = np.matmul(p.Q[p.batch[:, 0]], np.swapaxes(p.K[p.batch[:, 1]], -1, -2))  # (B, n_q, n_k), BLAS
    return softmax_weights(S, p.bias, p.batch[:, 3], p.causal, p.scale, p.masked_rows)[0].reshape(
        p.batch_shape + (n_q, n_k))


def softmax_weights(S: np.ndarray, bias: np.ndarray, rows: np.ndarray, causal: bool, scale: float,
                    masked_rows: str) -> tuple[np.ndarray, np.ndarray]:
    """In place: dot products S (..., n_q, n_k) become P = softmax(scale·S + bias[rows]); returns P and the
    row log-sum-exp LSE (..., n_q). Serial: it runs between BLAS calls."""
    n_q, n_k = S.shape[-2:]
    LSE = np.empty(S.shape[:-1], dtype=S.dtype)
    B = math.prod(S.shape[:-2])
    kernels.loops.softmax_rows(S.reshape(B, n_q, n_k), bias, rows, causal, scale, kernels.MASKED_ROWS[masked_rows], LSE.reshape(B, n_q))
    return S, LSE


def _unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum a gradient over the dims its input was broadcast along, back to `shape`."""
    g = g.sum(axis=tuple(range(g.ndim - len(shape)))) if g.ndim > len(shape) else g
    axes = tuple(n for n, (have, want) in enumerate(zip(g.shape, shape)) if want == 1 and have != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def _check_dO(dO, shape: tuple[int, ...], dtype) -> np.ndarray:
    """dO validated against the output's shape and dtype, as a C-contiguous array."""
    dO = _array("dO", dO)
    if dO.shape != shape:
        raise InputError(f"dO must have the output's shape {shape}, got {dO.shape}")
    if dO.dtype != dtype:
        raise InputError(f"dO must have the dtype of q, k, v ({dtype}), got {dO.dtype}")
    return np.ascontiguousarray(dO)


def attention_vjp(q, k, v, *, score="dot", params=None, score_mod=None, mask_mod=None, mask=None, is_causal=False,
                  scale=None, masked_rows="zero"):
    """(O, pullback): O = attention(q, k, v, ...) and pullback(dO) -> {"q": dq, "k": dk, "v": dv, θ name: dθ},
    the gradients of L = Σ dO∘O with their inputs' shapes. The forward runs once; its row log-sum-exp is kept
    for the pullback, which may be called any number of times."""
    if score_mod is None and mask_mod is None and params is None and score == "dot":
        sc = _plain(q, k, v, mask, is_causal, scale, masked_rows)
        if sc is not None:
            q, k, v = q.copy(), k.copy(), v.copy()  # what the pullback reads: the caller may change theirs
            O, LSE = _forward_plain(q, k, v, is_causal, sc)
            return read_only(O), _plain_pullback(q, k, v, is_causal, sc, O, LSE)
    p, variant, theta = _setup(q, k, v, score, params, score_mod, mask_mod, mask, is_causal, scale, masked_rows)
    p = replace(p, Q=own(p.Q, q), K=own(p.K, k), V=own(p.V, v), bias=own(p.bias, mask))  # what the pullback reads
    theta = {name: own(x, (params or {}).get(name)) for name, x in theta.items()}
    shapes = {"q": np.shape(q), "k": np.shape(k), "v": np.shape(v)}
    check_output(p.batch_shape + (p.Q.shape[1], p.V.shape[2]), p.Q.dtype, "attention's output")
    O, LSE, saved = _forward(p, variant, theta)
    out_shape = p.batch_shape + O.shape[1:]

    def pullback(dO) -> dict:
        dO = _check_dO(dO, out_shape, p.Q.dtype).reshape(O.shape)
        *grads, dtheta = _backward(p, variant, theta, O, LSE, dO, saved)
        return {**{name: _unbroadcast(g.reshape(p.batch_shape + g.shape[1:]), shapes[name])
                   for name, g in zip(("q", "k", "v"), grads)},
                **{name: g.reshape(np.shape(params[name])) for name, g in dtheta.items()}}  # θ's own shape
    return read_only(O.reshape(out_shape)), pullback


def _plain_pullback(q, k, v, is_causal: bool, scale: float, O, LSE):
    """The pullback of plain inputs: dO of O's shape and dtype, C-contiguous, goes straight to the kernels (what
    does not depend on dO is worked out once, here)."""
    dt, flat = q.dtype, q.ndim == 2
    Q, K, V, O3 = (q[None], k[None], v[None], O[None]) if flat else (q, k, v, O)  # (B, n, d)
    small = Q.shape[0] * Q.shape[1] * K.shape[1] < kernels.SMALL
    kernel = kernels.loops.plain_backward
    shape = (kernels.loops.BACKWARD_SCRATCH * K.shape[1],)  # (34·n_k,)
    buf = _scratch(shape, dt) if small else None
    buf = buf if _SCRATCH.get((shape, dt)) is buf else None  # only a shared one: a live pullback holds no large one

    def pullback(dO) -> dict:
        if type(dO) is not np.ndarray or dO.dtype is not dt or dO.shape != O.shape or not dO.flags.c_contiguous:
            dO = _check_dO(dO, O.shape, dt)
        dq, dk, dv = np.empty(q.shape, dt), np.empty(k.shape, dt), np.empty(v.shape, dt)
        args = (Q, K, V, is_causal, scale, O3, LSE) + ((dO[None], dq[None], dk[None], dv[None]) if flat else
                                                       (dO, dq, dk, dv))
        if small:
            entry, scratch = _ENTRIES.get((kernel, dt)), buf if buf is not None else np.empty(shape, dt)
            if entry is not None:
                entry(*args, scratch)
            else:
                _record(kernel, dt, args + (scratch,))
        else:
            kernels.backward_into(Q, K, V, _NOBIAS[dt], _identity_batch(Q.shape[0]), is_causal, scale, 0,
                                  *args[5:])
        return {"q": dq, "k": dk, "v": dv}
    return pullback


def attention_backward(q, k, v, dO, *, score="dot", params=None, score_mod=None, mask_mod=None, mask=None,
                       is_causal=False, scale=None, masked_rows="zero"):
    """(dq, dk, dv) of L = Σ dO∘attention(q, k, v, ...), each with its input's shape (one forward, one backward;
    parameter gradients: attention_vjp)."""
    q, k, v = _array("q", q), _array("k", k), _array("v", v)
    p, variant, theta = _setup(q, k, v, score, params, score_mod, mask_mod, mask, is_causal, scale, masked_rows)
    dO = _check_dO(dO, p.batch_shape + (q.shape[-2], v.shape[-1]), q.dtype)  # the output's shape, as PyTorch asks
    O, LSE, saved = _forward(p, variant, theta)
    dQ, dK, dV, _ = _backward(p, variant, theta, O, LSE, dO.reshape(O.shape), saved)
    full = p.batch_shape
    return (_unbroadcast(dQ.reshape(full + dQ.shape[1:]), q.shape),
            _unbroadcast(dK.reshape(full + dK.shape[1:]), k.shape),
            _unbroadcast(dV.reshape(full + dV.shape[1:]), v.shape))
