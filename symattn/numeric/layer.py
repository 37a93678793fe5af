"""Numeric multi-head attention: the projections, all heads in one call of the attention kernels, the output.

x (..., n_q, d_model); y (..., n_k, d_model) for cross-attention (default y = x); w_q (d_model, h·d_k),
w_k (d_model, h_kv·d_k), w_v (d_model, h_kv·d_v), w_o (h·d_v, d_model); biases b_q (h·d_k,), b_k (h_kv·d_k,),
b_v (h_kv·d_v,), b_o (d_model,). Heads are laid out (..., h_kv, h/h_kv, n, d) so a key/value group broadcasts
over its heads (grouped-query attention) and its gradients sum over them. mask / is_causal / scale as in
symattn.attention, shared by all heads. The variant (score, params, score_mod, mask_mod) is symattn.attention's,
the same for every head: the parameters θ in `params` are shared by all heads (their gradients sum over heads and
batch), a mod's h is the layer's head, its b the batch element (0 without batch dims). All heads (batch x heads,
each key/value group broadcast over its heads) go through one call of the attention kernels (symattn.attention_vjp:
flash-style tiles, no n x n scores in memory); the backward reuses the forward's output and log-sum-exp instead of
running the forward again. With the dot-product score (plain, or with score mods and index masks) and no mask
array, forward and backward run in one thread pool (numeric/one_pool.py: projections as Numba BLAS tiles);
otherwise (general path) the projections are NumPy matmuls and the heads go through symattn.attention_vjp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from . import one_pool, variants
from .saved import own
from .api import (_array, _bias, _unbroadcast, attention, attention_vjp, check_causal, check_masked_rows,
                  check_scale)
from ..errors import InputError


@dataclass(frozen=True)
class _Layer:
    heads: int
    kv_heads: int
    d_k: int
    d_v: int


def _check(x, y, w_q, w_k, w_v, w_o, heads, kv_heads, biases) -> _Layer:
    if isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or heads <= 0:
        raise InputError(f"heads must be a positive integer, got {heads!r}")
    kv_heads = heads if kv_heads is None else kv_heads
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, (int, np.integer)) or kv_heads <= 0 or heads % kv_heads:
        raise InputError(f"kv_heads must be a positive integer dividing heads ({heads}), got {kv_heads!r}")
    d_model = x.shape[-1]
    if y is not None and y.shape[-1] != d_model:
        raise InputError(f"y must have shape (..., n_k, d_model) with d_model = {d_model}, got {y.shape}")
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v), ("w_o", w_o)):
        if w.ndim != 2:
            raise InputError(f"{name} must be a 2-D matrix, got shape {w.shape}")
    if w_q.shape[0] != d_model or w_q.shape[1] % heads:
        raise InputError(f"w_q must have shape (d_model, heads·d_k) = ({d_model}, {heads}·d_k), got {w_q.shape}")
    d_k = w_q.shape[1] // heads
    if w_k.shape != (d_model, kv_heads * d_k):
        raise InputError(f"w_k must have shape (d_model, kv_heads·d_k) = {(d_model, kv_heads * d_k)}, got {w_k.shape}")
    if w_v.shape[0] != d_model or w_v.shape[1] % kv_heads:
        raise InputError(f"w_v must have shape (d_model, kv_heads·d_v) = ({d_model}, {kv_heads}·d_v), got {w_v.shape}")
    d_v = w_v.shape[1] // kv_heads
    if w_o.shape != (heads * d_v, d_model):
        raise InputError(f"w_o must have shape (heads·d_v, d_model) = {(heads * d_v, d_model)}, got {w_o.shape}")
    widths = {"b_q": heads * d_k, "b_k": kv_heads * d_k, "b_v": kv_heads * d_v, "b_o": d_model}
    for name, b in biases.items():
        if b is not None and b.shape != (widths[name],):
            raise InputError(f"{name} must have shape ({widths[name]},), got {b.shape}")
    dtypes = {a.dtype for a in (x, w_q, w_k, w_v, w_o, *(b for b in biases.values() if b is not None))
              } | ({y.dtype} if y is not None else set())
    if len(dtypes) > 1:
        raise InputError(f"x, y, weights and biases must share one dtype, got {sorted(map(str, dtypes))}")
    return _Layer(heads, kv_heads, d_k, d_v)


def _check_options(x, y, mask, is_causal, scale, masked_rows, d_k: int):
    """The options every head shares, checked as symattn.attention checks them: returns (mask, causal, scale,
    masked_rows), the mask validated against (..., n_q, n_k), and x and y broadcast to the batch dims of the
    mask where it has more of them (the output has the batch dims of x, y and the mask together)."""
    n_q, n_k = x.shape[-2], (x if y is None else y).shape[-2]
    if n_k == 0:
        raise InputError(f"attention needs n_k >= 1 keys, got {'y' if y is not None else 'x'} of shape "
                         f"{(x if y is None else y).shape}")
    batch = {"x": x.shape[:-2]} | ({} if y is None else {"y": y.shape[:-2]})
    if mask is not None:
        batch["mask"] = _bias(mask, x.dtype, n_q, n_k).shape[:-2]
    try:
        full = np.broadcast_shapes(*batch.values())
    except ValueError:
        raise InputError("leading (batch) dims do not broadcast: " + ", ".join(f"{n} {s}" for n, s in batch.items())
                         ) from None
    if mask is not None and full != np.broadcast_shapes(*(v for n, v in batch.items() if n != "mask")):
        x = np.broadcast_to(x, full + x.shape[-2:])
        y = None if y is None else np.broadcast_to(y, full + y.shape[-2:])
    options = (None if mask is None else np.asarray(mask)[..., None, None, :, :],  # shared by every head
               check_causal(is_causal), None if scale is None else check_scale(scale, d_k),  # None: the score's
               check_masked_rows(masked_rows))
    return options, x, y


def _arrays(x, y, w_q, w_k, w_v, w_o, biases):
    x, w_q, w_k, w_v, w_o = (_array(n, a) for n, a in (("x", x), ("w_q", w_q), ("w_k", w_k), ("w_v", w_v), ("w_o", w_o)))
    y = None if y is None else _array("y", y)
    biases = {n: None if b is None else np.asarray(b) for n, b in biases.items()}
    return x, y, w_q, w_k, w_v, w_o, biases


def _split(A: np.ndarray, groups: int, per_group: int, width: int) -> np.ndarray:
    """(..., n, groups·per_group·width) -> (..., groups, per_group, n, width)."""
    return np.moveaxis(A.reshape(A.shape[:-1] + (groups, per_group, width)), -4, -2)


def _merge(A: np.ndarray) -> np.ndarray:
    """(..., groups, per_group, n, width) -> (..., n, groups·per_group·width)."""
    moved = np.moveaxis(A, -2, -4)  # (..., n, groups, per_group, width)
    return moved.reshape(moved.shape[:-3] + (math.prod(moved.shape[-3:]),))


def _heads(x, y, w_q, w_k, w_v, layer: _Layer, biases):
    """Per-head Q (..., h_kv, h/h_kv, n_q, d_k), K (..., h_kv, 1, n_k, d_k), V (..., h_kv, 1, n_k, d_v)."""
    src = x if y is None else y
    G, R = layer.kv_heads, layer.heads // layer.kv_heads
    Qp = x @ w_q + (0 if biases["b_q"] is None else biases["b_q"])  # (..., n_q, h·d_k)
    Kp = src @ w_k + (0 if biases["b_k"] is None else biases["b_k"])  # (..., n_k, h_kv·d_k)
    Vp = src @ w_v + (0 if biases["b_v"] is None else biases["b_v"])  # (..., n_k, h_kv·d_v)
    return _split(Qp, G, R, layer.d_k), _split(Kp, G, 1, layer.d_k), _split(Vp, G, 1, layer.d_v)


def _attention(function, Q, K, V, options, variant: dict):
    """`function` (attention or attention_vjp) of every head at once: Q (..., h_kv, R, n_q, d_k), K and V
    (..., h_kv, 1, n_k, d) with the layer's shared options (mask, causal, scale, masked_rows). With a variant
    (score, params, score_mod, mask_mod), the heads go in FlexAttention's layout (B, h, n, d) (`_flex`), so head
    h = g·R + r is the `h` its mods see (ALiBi's slope per head)."""
    mask, is_causal, scale, masked_rows = options
    if not variant:
        return function(Q, K, V, mask=mask, is_causal=is_causal, scale=scale, masked_rows=masked_rows)
    R = Q.shape[-3]
    mask = None if mask is None else mask[..., 0, :, :]  # shared by every head: (..., 1, n_q, n_k)
    return function(*(_flex(A, R) for A in (Q, K, V)), mask=mask, is_causal=is_causal, scale=scale,
                    masked_rows=masked_rows, **variant)


def _flex(A: np.ndarray, R: int) -> np.ndarray:
    """(..., h_kv, R or 1, n, d) -> FlexAttention's (..., h, n, d), a key/value group repeated over its R heads,
    with a batch dim of 1 where there is none (so h is read from dim -3)."""
    A = np.broadcast_to(A, A.shape[:-3] + (R,) + A.shape[-2:])
    A = A.reshape(A.shape[:-4] + (A.shape[-4] * R,) + A.shape[-2:])  # not -1: it fails on an empty batch
    return A if A.ndim >= 4 else A[None]


def _from_flex_output(O: np.ndarray, Q: np.ndarray, K: np.ndarray) -> np.ndarray:
    """O (..., h, n_q, d_v) of `_flex`'s layout back to (..., h_kv, R, n_q, d_v) with the batch dims of Q and K."""
    batch = np.broadcast_shapes(Q.shape[:-4], K.shape[:-4])
    return O.reshape(batch + Q.shape[-4:-2] + O.shape[-2:])


def _from_flex(g: dict, G: int, R: int) -> dict:
    """Gradients in the (..., h, n, d) layout back to (..., h_kv, R, n, d) for q and (..., h_kv, 1, n, d) for k, v
    (a group's heads summed); parameter gradients pass through."""
    out = dict(g)
    for name in ("q", "k", "v"):
        A = g[name].reshape(g[name].shape[:-3] + (G, R) + g[name].shape[-2:])
        out[name] = A if name == "q" else A.sum(axis=-3, keepdims=True)
    return out


@dataclass(frozen=True)
class _Call:
    """A validated layer call: arrays, layout, shared options, the input shapes gradients are summed back to."""
    x: np.ndarray
    y: np.ndarray | None
    w: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # w_q, w_k, w_v, w_o
    biases: dict
    layer: _Layer
    options: tuple
    variant: dict  # score / params / score_mod / mask_mod given (passed to symattn.attention as they are)
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...] | None


def _call(x, w_q, w_k, w_v, w_o, heads, kv_heads, y, mask, is_causal, scale, masked_rows, biases,
          variant: dict | None = None) -> _Call:
    x, y, w_q, w_k, w_v, w_o, biases = _arrays(x, y, w_q, w_k, w_v, w_o, biases)
    layer = _check(x, y, w_q, w_k, w_v, w_o, heads, kv_heads, biases)
    x_shape, y_shape = x.shape, None if y is None else y.shape
    options, x, y = _check_options(x, y, mask, is_causal, scale, masked_rows, layer.d_k)
    variant = {k: v for k, v in (variant or {}).items() if v is not None and not (k == "score" and v == "dot")}
    if "score_mod" in variant:
        variants.check_layer_heads(variant["score_mod"], layer.heads)
    return _Call(x, y, (w_q, w_k, w_v, w_o), biases, layer, options, variant, x_shape, y_shape)


def _check_d_out(c: _Call, d_out) -> np.ndarray:
    d_out = _array("d_out", d_out)
    x, y = c.x, c.y
    expected = np.broadcast_shapes(x.shape[:-2], () if y is None else y.shape[:-2]) + (x.shape[-2], x.shape[-1])
    if d_out.shape != expected:
        raise InputError(f"d_out must have the output's shape {expected}, got {d_out.shape}")
    if d_out.dtype != x.dtype:
        raise InputError(f"d_out must have the dtype of x ({x.dtype}), got {d_out.dtype}")
    return d_out


def _output(c: _Call, C: np.ndarray) -> np.ndarray:
    return C @ c.w[3] + (0 if c.biases["b_o"] is None else c.biases["b_o"])


def multihead_attention(x, w_q, w_k, w_v, w_o, *, heads, kv_heads=None, y=None, mask=None, is_causal=False,
                        scale=None, b_q=None, b_k=None, b_v=None, b_o=None, masked_rows="zero", score="dot",
                        score_mod=None, mask_mod=None, params=None) -> np.ndarray:
    """Concat(head_0..head_{h-1}) w_o (+ b_o), shape (..., n_q, d_model). score / params / score_mod / mask_mod
    as in symattn.attention (θ shared by all heads), head h of the layer being FlexAttention's h (e.g.
    symattn.mods.alibi(heads=h))."""
    c = _call(x, w_q, w_k, w_v, w_o, heads, kv_heads, y, mask, is_causal, scale, masked_rows,
              dict(b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o),
              dict(score=score, score_mod=score_mod, mask_mod=mask_mod, params=params))
    if one_pool.applies(c):
        return one_pool.output(c, one_pool.forward(c))
    Q, K, V = _heads(c.x, c.y, *c.w[:3], c.layer, c.biases)
    O = _attention(attention, Q, K, V, c.options, c.variant)
    if c.variant:
        O = _from_flex_output(O, Q, K)
    return _output(c, _merge(O))  # Concat(heads) (..., n_q, h·d_v) w_o


def multihead_attention_vjp(x, w_q, w_k, w_v, w_o, *, heads, kv_heads=None, y=None, mask=None, is_causal=False,
                            scale=None, b_q=None, b_k=None, b_v=None, b_o=None, masked_rows="zero", score="dot",
                            score_mod=None, mask_mod=None, params=None):
    """(out, pullback): the layer's output and pullback(d_out) -> the gradients of multihead_attention_backward
    (and of every parameter of a score or mod, by name). The forward runs once; the attention's output and
    log-sum-exp are kept for the pullback."""
    c = _call(x, w_q, w_k, w_v, w_o, heads, kv_heads, y, mask, is_causal, scale, masked_rows,
              dict(b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o),
              dict(score=score, score_mod=score_mod, mask_mod=mask_mod, params=params))
    c = _owned(c, (x, y, w_q, w_k, w_v, w_o), dict(b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o), mask, params)
    out, pullback = _vjp(c)
    return out, lambda d_out: pullback(_check_d_out(c, d_out))


def _owned(c: _Call, given: tuple, biases: dict, mask, params) -> _Call:
    """`c` with every array the pullback reads copied where it may share memory with one the caller passed, so
    that the caller's later in-place changes do not reach the gradients (saved.own)."""
    head_mask = c.options[0]  # a view of the caller's mask, shaped for the heads
    return replace(
        c, x=own(c.x, given[0]), y=None if c.y is None else own(c.y, given[1]),
        w=tuple(own(a, g) for a, g in zip(c.w, given[2:])),
        biases={n: None if b is None else own(b, biases[n]) for n, b in c.biases.items()},
        options=(own(head_mask, mask) if isinstance(head_mask, np.ndarray) else head_mask, *c.options[1:]),
        variant={**c.variant, **({"params": {n: own(np.asarray(a), a) for n, a in params.items()}}
                                 if isinstance(params, dict) else {})})


def multihead_attention_backward(x, w_q, w_k, w_v, w_o, d_out, *, heads, kv_heads=None, y=None, mask=None,
                                 is_causal=False, scale=None, b_q=None, b_k=None, b_v=None, b_o=None,
                                 masked_rows="zero", score="dot", score_mod=None, mask_mod=None,
                                 params=None) -> dict:
    """Gradients of L = Σ d_out∘multihead_attention(...), keyed by argument name (x, y, w_*, b_* given, and
    every parameter of the score and the score mod by name, summed over the heads)."""
    c = _call(x, w_q, w_k, w_v, w_o, heads, kv_heads, y, mask, is_causal, scale, masked_rows,
              dict(b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o),
              dict(score=score, score_mod=score_mod, mask_mod=mask_mod, params=params))
    d_out = _check_d_out(c, d_out)
    return _vjp(c)[1](d_out)


def _vjp(c: _Call):
    """The layer's output and the pullback of the whole layer for a checked d_out (the dot-product layer in one
    thread pool, numeric/one_pool.py)."""
    if one_pool.applies(c):
        h = one_pool.forward(c)
        return one_pool.output(c, h), lambda d_out: one_pool.backward(c, h, d_out)
    x, y, (w_q, w_k, w_v, w_o), layer, biases = c.x, c.y, c.w, c.layer, c.biases
    Q, K, V = _heads(x, y, w_q, w_k, w_v, layer, biases)
    G, R = layer.kv_heads, layer.heads // layer.kv_heads
    O, core_pullback = _attention(attention_vjp, Q, K, V, c.options, c.variant)  # the forward runs once
    O = _from_flex_output(O, Q, K) if c.variant else O
    C = _merge(O)  # (..., n_q, h·d_v)

    def pullback(d_out) -> dict:
        dC = d_out @ w_o.T  # (..., n_q, h·d_v)
        dO = _split(dC, G, R, layer.d_v)
        if c.variant:
            g = _from_flex(core_pullback(_flex(dO, R)), G, R)
        else:
            g = core_pullback(dO)
        dQp, dKp, dVp = _merge(g["q"]), _merge(g["k"]), _merge(g["v"])  # dK, dV summed over each group's heads
        src = x if y is None else y

        def weight_grad(a, g):  # (..., n, p), (..., n, q) -> (p, q) summed over the batch: one GEMM
            a = np.broadcast_to(a, g.shape[:-2] + a.shape[-2:])
            return a.reshape(-1, a.shape[-1]).T @ g.reshape(-1, g.shape[-1])

        grads = {"x": dQp @ w_q.T, "w_q": weight_grad(x, dQp), "w_k": weight_grad(src, dKp),
                 "w_v": weight_grad(src, dVp), "w_o": weight_grad(C, d_out)}
        dy = dKp @ w_k.T + dVp @ w_v.T
        if y is None:
            grads["x"] = grads["x"] + dy
        else:
            grads["y"] = _unbroadcast(dy, c.y_shape)
        grads["x"] = _unbroadcast(grads["x"], c.x_shape)
        for name, g_b in (("b_q", dQp), ("b_k", dKp), ("b_v", dVp), ("b_o", d_out)):
            if biases[name] is not None:
                grads[name] = g_b.reshape(-1, g_b.shape[-1]).sum(axis=0)
        grads.update({name: value for name, value in g.items() if name not in ("q", "k", "v")})  # shared θ
        return grads
    return _output(c, C), pullback
