"""Plain NumPy attention, forward and backward: the obviously-correct oracle.

Semantics follow PyTorch's scaled_dot_product_attention: arrays (..., n, d); boolean mask True = may
attend; float mask added to the scores; is_causal = lower-triangular, top-left aligned. Fully masked rows
follow `masked_rows`: "zero" (output 0, zero gradients), "uniform" (uniform weights), "nan".
"""
from __future__ import annotations

import numpy as np


def causal_mask(n_q: int, n_k: int) -> np.ndarray:
    """(n_q, n_k) boolean, True where key j <= query i."""
    return np.tril(np.ones((n_q, n_k), dtype=bool))


def _bias(mask, is_causal: bool, n_q: int, n_k: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Additive bias (0 or -inf, or the float mask) and the boolean 'visible' array."""
    bias = np.zeros((n_q, n_k), dtype=dtype)
    if mask is not None:
        mask = np.asarray(mask)
        bias = np.where(mask, 0.0, -np.inf).astype(dtype) if mask.dtype == bool else mask.astype(dtype)
    if is_causal:
        bias = np.where(causal_mask(n_q, n_k), bias, -np.inf)
    return bias, np.isfinite(bias) | np.isnan(bias)


def weights(q, k, *, mask=None, is_causal=False, scale=None, masked_rows="zero") -> np.ndarray:
    """P = row-softmax(scale·QKᵀ + bias), shape (..., n_q, n_k)."""
    q, k = np.asarray(q), np.asarray(k)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    S = scale * (q @ np.swapaxes(k, -1, -2))  # (..., n_q, n_k)
    bias, visible = _bias(mask, is_causal, q.shape[-2], k.shape[-2], S.dtype)
    S = S + bias
    empty = ~np.any(visible, axis=-1, keepdims=True)  # (..., n_q, 1) fully masked rows
    m = np.max(np.where(empty, 0.0, S), axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    E = np.where(visible, np.exp(S - m), 0.0)  # (..., n_q, n_k)
    P = E / np.where(empty, 1.0, E.sum(axis=-1, keepdims=True))
    if masked_rows == "uniform":
        P = np.where(empty, 1.0 / k.shape[-2], P)
    elif masked_rows == "nan":
        P = np.where(empty, np.nan, P)
    return P


def attention(q, k, v, *, mask=None, is_causal=False, scale=None, masked_rows="zero") -> np.ndarray:
    """O = PV, shape (..., n_q, d_v)."""
    P = weights(q, k, mask=mask, is_causal=is_causal, scale=scale, masked_rows=masked_rows)
    return P @ np.asarray(v)  # (..., n_q, d_v)


def attention_backward(q, k, v, dO, *, mask=None, is_causal=False, scale=None, masked_rows="zero"):
    """(dQ, dK, dV) of L = Σ dO∘O, each with its input's shape (summed over broadcast dims)."""
    q, k, v, dO = map(np.asarray, (q, k, v, dO))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    P = weights(q, k, mask=mask, is_causal=is_causal, scale=scale, masked_rows=masked_rows)  # (..., n_q, n_k)
    O = P @ v  # (..., n_q, d_v)
    dV = np.swapaxes(P, -1, -2) @ dO  # (..., n_k, d_v)
    dP = dO @ np.swapaxes(v, -1, -2)  # (..., n_q, n_k)
    D = np.sum(dO * O, axis=-1, keepdims=True)  # (..., n_q, 1)
    dS = P * (dP - D)  # (..., n_q, n_k)
    if masked_rows == "uniform":  # uniform rows do not depend on S
        bias, visible = _bias(mask, is_causal, q.shape[-2], k.shape[-2], dS.dtype)
        dS = np.where(np.any(visible, axis=-1, keepdims=True), dS, 0.0)
    dQ = scale * dS @ k  # (..., n_q, d_k)
    dK = scale * np.swapaxes(dS, -1, -2) @ q  # (..., n_k, d_k)
    return _sum_to(dQ, q.shape), _sum_to(dK, k.shape), _sum_to(dV, v.shape)


def _sum_to(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Gradient of a broadcast input: sum over the broadcast dims."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, n in enumerate(shape):
        if n == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g
