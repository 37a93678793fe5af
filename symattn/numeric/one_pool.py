"""The multi-head layer with a dot-product score (plain, or with score mods and index masks; no mask array) forward
and backward with every GEMM in Numba's thread pool.

NumPy's matmul runs on OpenBLAS's threads and the attention kernels on Numba's; each pool keeps spinning after its
call and takes a core from the other (numeric/projections.py has the measurement). Here the projections, the
attention and the weight gradients are all Numba kernels with BLAS held to one thread, each writing the layout
the next step reads. Layout: x (Z, n_q, d_model), y (Z, n_k, d_model); heads Q (Z, H, n_q, d_k), K (Z, G, n_k, d_k),
V (Z, G, n_k, d_v), O (Z, H, n_q, d_v), head h = g·R + r reading key/value group g (R = H/G, layer.py's `_split`);
a mod or mask sees FlexAttention's (b, h) = (z, h), as the layer's general path gives it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numba
import numpy as np

from . import kernels, projections, variants
from .api import _rows, check_scale
from .plain import NOBIAS as _NOBIAS

if TYPE_CHECKING:
    from .layer import _Call

@dataclass
class Heads:
    """What the forward computed and the backward reads again."""
    X: np.ndarray  # (Z, n_q, d_model)
    S: np.ndarray  # (Z, n_k, d_model), the keys' and values' source (X for self-attention)
    Q: np.ndarray  # (Z, H, n_q, d_k)
    K: np.ndarray  # (Z, G, n_k, d_k)
    V: np.ndarray  # (Z, G, n_k, d_v)
    O: np.ndarray  # (Z, H, n_q, d_v)
    LSE: np.ndarray  # (Z·H, n_q)
    batch: np.ndarray  # (Z·H, 4) rows [q, k, v, bias] of each head
    out: np.ndarray  # (Z, n_q, d_model)
    variant: tuple | None  # (Variant, θ bound to the kernels, bh (Z·H, 2)) of a mod or mask, else None


def applies(c: _Call) -> bool:
    """The one-pool path takes the dot-product score (score mods and index masks included), no mask array, x (and
    y) with one shared batch dim or none, and at least one query and batch element (the general path gives the
    empty output)."""
    x, y = c.x, c.y
    src = x if y is None else y
    return "score" not in c.variant and c.options[0] is None and x.ndim in (2, 3) \
        and src.shape[:-2] == x.shape[:-2] and x.size > 0


def _variant(c: _Call, Z: int, n_q: int, n_k: int) -> tuple | None:
    """(Variant, θ bound, bh) of the call's score mod / mask_mod / params, checked before any work, else None."""
    if not c.variant:
        return None
    _, causal, scale, _ = c.options
    v, H = c.variant, c.layer.heads
    variant, theta = variants.prepare("dot", v.get("params"), v.get("score_mod"), v.get("mask_mod"), causal, scale,
                                      (Z, H), c.x.dtype, c.layer.d_k, (n_q, n_k))
    return None if variant is None else (variant, theta, variants.bh_rows((Z, H)))


def forward(c: _Call) -> Heads:
    """The layer's forward: heads, attention (output and log-sum-exp kept) and out = Concat(heads) w_o (+ b_o)."""
    _, causal, scale, masked_rows = c.options
    x, y, L = c.x, c.y, c.layer
    dt, H, G = x.dtype, L.heads, L.kv_heads
    X = np.ascontiguousarray(x.reshape((-1,) + x.shape[-2:]))  # (Z, n_q, d_model)
    S = X if y is None else np.ascontiguousarray(y.reshape((-1,) + y.shape[-2:]))  # (Z, n_k, d_model)
    (Z, n_q, d_model), n_k = X.shape, S.shape[1]
    w_q, w_k, w_v, w_o = c.w
    Q, K = np.empty((Z, H, n_q, L.d_k), dt), np.empty((Z, G, n_k, L.d_k), dt)
    V, O = np.empty((Z, G, n_k, L.d_v), dt), np.empty((Z, H, n_q, L.d_v), dt)
    LSE, out = np.empty((Z * H, n_q), dt), np.empty((Z, n_q, d_model), dt)
    heads, groups = (Z, G, H // G), (Z, G, 1)
    kv = _rows(groups, heads)
    batch = np.ascontiguousarray(np.stack([_rows(heads, heads), kv, kv, np.zeros_like(kv)], axis=1))
    variant = _variant(c, Z, n_q, n_k)
    with kernels.one_blas_thread:
        _project(c, X, S, Q, K, V)
        args = (Q.reshape(Z * H, n_q, L.d_k), K.reshape(Z * G, n_k, L.d_k), V.reshape(Z * G, n_k, L.d_v),
                _NOBIAS[dt], batch)
        tail = (check_scale(scale, L.d_k), kernels.MASKED_ROWS[masked_rows], O.reshape(Z * H, n_q, L.d_v), LSE)
        if variant is None:
            kernels.forward_into(*args, causal, *tail)
        else:
            v, theta, bh = variant
            kernels.variant_forward(*args, bh, *tail[:2], v.mod, v.mask, theta, *tail[2:])
        b_o = np.zeros(0, dt) if c.biases["b_o"] is None else np.ascontiguousarray(c.biases["b_o"], dtype=dt)
        projections.merge_project((O,), np.ascontiguousarray(w_o), b_o, out, _rows_per_task(X), False)
    return Heads(X, S, Q, K, V, O, LSE, batch, out, variant)


def _project(c: _Call, X, S, Q, K, V) -> None:
    """Q, K, V of every head: self-attention as one product per (batch element, key/value group, row block) with
    the group's Q, K and V columns packed side by side; cross-attention as Q from x, then K and V from y."""
    G, b, (w_q, w_k, w_v, _) = c.layer.kv_heads, c.biases, c.w
    parts = [((w_q, w_k, w_v), ("b_q", "b_k", "b_v"), X, (Q, K, V))] if S is X else \
        [((w_q,), ("b_q",), X, (Q,)), ((w_k, w_v), ("b_k", "b_v"), S, (K, V))]
    for weights, names, source, outs in parts:
        bias = projections.group_biases([b[n] for n in names], [w.shape[1] for w in weights], G, X.dtype)
        W = projections.group_blocks(weights, G)  # (d_model, G·width)
        projections.project_heads(source, W, bias, outs, G, _rows_per_task(source))


def _rows_per_task(X: np.ndarray) -> int:
    """Row block of the projection kernels for X (Z, n, d_model)."""
    return projections.row_block(X.shape[0], X.shape[1], numba.get_num_threads())


def output(c: _Call, h: Heads) -> np.ndarray:
    """The forward's output in x's batch shape (..., n_q, d_model)."""
    return h.out.reshape(c.x.shape[:-1] + (h.out.shape[-1],))


def backward(c: _Call, h: Heads, d_out: np.ndarray) -> dict:
    """Gradients of Σ d_out∘out by argument name (x, y, w_*, b_* given), from the forward's heads: dO into the
    heads' layout, the attention backward (no second forward), dx (dy) as Concat(dQ) w_qᵀ (+ dK w_kᵀ + dV w_vᵀ),
    weight gradients as per-head sums over the batch in a fixed order (deterministic)."""
    _, causal, scale, masked_rows = c.options
    L, (w_q, w_k, w_v, w_o) = c.layer, c.w
    (Z, n_q, d_model), n_k, dt = h.X.shape, h.S.shape[1], h.X.dtype
    H, G = L.heads, L.kv_heads
    dOut = np.ascontiguousarray(d_out.reshape(h.out.shape))  # (Z, n_q, d_model)
    dO = np.empty(h.O.shape, dt)  # (Z, H, n_q, d_v)
    dQ = np.empty(h.Q.shape, dt)  # (Z, H, n_q, d_k)
    dK, dV = np.empty((Z, H, n_k, L.d_k), dt), np.empty((Z, H, n_k, L.d_v), dt)  # per head, summed per group below
    with kernels.one_blas_thread:
        projections.project_heads(dOut, projections.group_blocks((w_o.T,), H), np.zeros(0, dt), (dO,), H,
                                  _rows_per_task(dOut))  # dC = d_out w_oᵀ, into the heads
        args = (h.Q.reshape(Z * H, n_q, L.d_k), h.K.reshape(Z * G, n_k, L.d_k), h.V.reshape(Z * G, n_k, L.d_v),
                _NOBIAS[dt], h.batch)
        tail = (check_scale(scale, L.d_k), kernels.MASKED_ROWS[masked_rows], h.O.reshape(Z * H, n_q, L.d_v),
                h.LSE, dO.reshape(Z * H, n_q, L.d_v), dQ.reshape(Z * H, n_q, L.d_k), dK.reshape(Z * H, n_k, L.d_k),
                dV.reshape(Z * H, n_k, L.d_v))
        if h.variant is None:
            kernels.backward_into(*args, causal, *tail)
            d_theta = {}
        else:
            v, theta, bh = h.variant
            d_theta = kernels.variant_backward(*args, bh, *tail[:2], v.mod, v.mask, theta, *tail[2:])
        if G < H:  # grouped-query: a key/value group's gradient sums over its heads
            dK, dV = (A.reshape((Z, G, H // G) + A.shape[2:]).sum(axis=2) for A in (dK, dV))
        dX, no_b, bn = np.empty((Z, n_q, d_model), dt), np.zeros(0, dt), _rows_per_task(h.X)
        if c.y is None:  # dx = Concat(dQ, dK, dV) [w_q; w_k; w_v]ᵀ: one product
            projections.merge_project((dQ, dK, dV), np.concatenate([w_q.T, w_k.T, w_v.T]), no_b, dX, bn, False)
        else:
            dS = np.empty((Z, n_k, d_model), dt)
            projections.merge_project((dQ,), np.ascontiguousarray(w_q.T), no_b, dX, bn, False)
            projections.merge_project((dK, dV), np.concatenate([w_k.T, w_v.T]), no_b, dS, _rows_per_task(dS), False)
        grads = {"x": dX.reshape(c.x_shape),
                 "w_q": _columns(projections.head_grads(h.X, dQ)), "w_k": _columns(projections.head_grads(h.S, dK)),
                 "w_v": _columns(projections.head_grads(h.S, dV)),
                 "w_o": projections.head_grads(dOut, h.O).transpose(0, 2, 1).reshape(H * L.d_v, d_model)}
    if c.y is not None:
        grads["y"] = dS.reshape(c.y_shape)
    for name, g in (("b_q", dQ), ("b_k", dK), ("b_v", dV)):
        if c.biases[name] is not None:
            grads[name] = g.sum(axis=(0, 2)).reshape(-1)  # (heads·d,) in the heads' column order
    if c.biases["b_o"] is not None:
        grads["b_o"] = dOut.sum(axis=(0, 1))
    given = c.variant.get("params") or {}
    grads.update({name: g.reshape(np.shape(given[name])) for name, g in d_theta.items()})  # θ's own shape
    return grads


def _columns(blocks: np.ndarray) -> np.ndarray:
    """(G, d_model, d) per-head blocks -> (d_model, G·d), the weight's layout."""
    return np.ascontiguousarray(blocks.transpose(1, 0, 2)).reshape(blocks.shape[1], -1)


