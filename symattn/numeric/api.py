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
from .arrays import _array, _check_dO
from .plain import NOBIAS as _NOBIAS, forward_plain, identity_batch, plain, plain_vjp
from .saved import own, read_only
from ..errors import InputError
from ..limits import check_memory

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
    (n_q, d_k), (n_k, d_kk), n_v = q.shape[-2:], k.shape[-2:], v.shape[-2]
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
        return _Problem(_flat(q), _flat(k), _flat(v), _NOBIAS[q.dtype], identity_batch(math.prod(batch_shape)),
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
        sc = plain(q, k, v, mask, is_causal, scale, masked_rows)
        if sc is not None:
            return forward_plain(q, k, v, is_causal, sc, keep_lse=False)[0]
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


def attention_vjp(q, k, v, *, score="dot", params=None, score_mod=None, mask_mod=None, mask=None, is_causal=False,
                  scale=None, masked_rows="zero"):
    """(O, pullback): O = attention(q, k, v, ...) and pullback(dO) -> {"q": dq, "k": dk, "v": dv, θ name: dθ},
    the gradients of L = Σ dO∘O with their inputs' shapes. The forward runs once; its row log-sum-exp is kept
    for the pullback, which may be called any number of times."""
    if score_mod is None and mask_mod is None and params is None and score == "dot":
        sc = plain(q, k, v, mask, is_causal, scale, masked_rows)
        if sc is not None:
            return plain_vjp(q, k, v, is_causal, sc)
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
