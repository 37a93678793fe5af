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


def scores(q, k, *, score="dot", params=None, scale=None) -> np.ndarray:
    """S (..., n_q, n_k): dot scale·q kᵀ, general scale·q W_a kᵀ, additive v_aᵀ tanh(q W_a + k U_a + b_a)."""
    q, k, theta = np.asarray(q), np.asarray(k), params or {}
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    if score == "dot":
        return scale * (q @ np.swapaxes(k, -1, -2))
    if score == "general":
        return scale * (q @ theta["W_a"] @ np.swapaxes(k, -1, -2))
    return _hidden(q, k, theta) @ theta["v_a"]  # additive: (..., n_q, n_k, d_a) @ (d_a,)


def _hidden(q, k, theta) -> np.ndarray:
    """H = tanh(q_i W_a + k_j U_a + b_a) of the additive score, (..., n_q, n_k, d_a)."""
    return np.tanh((q @ theta["W_a"])[..., :, None, :] + (k @ theta["U_a"])[..., None, :, :] + theta["b_a"])


def score_backward(q, k, dS, *, score="dot", params=None, scale=None) -> dict:
    """Gradients of L through the scores: {"q": dQ, "k": dK, <param>: d<param>} from dS (..., n_q, n_k);
    dQ, dK keep the broadcast batch shape, parameter gradients are summed over it."""
    q, k, theta = np.asarray(q), np.asarray(k), params or {}
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    dST = np.swapaxes(dS, -1, -2)
    if score == "dot":
        return {"q": scale * dS @ k, "k": scale * dST @ q}
    if score == "general":
        W = theta["W_a"]
        return {"q": scale * dS @ k @ W.T, "k": scale * dST @ q @ W,  # (..., n, d_k)
                "W_a": scale * _total(np.einsum("...ia,...ij,...jb->...ab", q, dS, k), 2)}  # (d_k, d_k)
    H = _hidden(q, k, theta)  # (..., n_q, n_k, d_a)
    dpre = dS[..., None] * theta["v_a"] * (1 - H * H)  # dL/d(q W + k U + b), (..., n_q, n_k, d_a)
    return {"q": dpre.sum(axis=-2) @ theta["W_a"].T, "k": dpre.sum(axis=-3) @ theta["U_a"].T,
            "W_a": _total(np.swapaxes(q, -1, -2) @ dpre.sum(axis=-2), 2),  # (d_k, d_a)
            "U_a": _total(np.swapaxes(k, -1, -2) @ dpre.sum(axis=-3), 2),  # (d_k, d_a)
            "v_a": _total(np.einsum("...ij,...ijr->...r", dS, H), 1), "b_a": _total(dpre, 1)}  # (d_a,)


def _total(g: np.ndarray, rank: int) -> np.ndarray:
    """Sum a parameter's gradient over every leading (batch, query, key) dim down to its own `rank` dims."""
    return g.reshape((-1,) + g.shape[g.ndim - rank:]).sum(axis=0)


def modded(S, score_mod, params=None) -> np.ndarray:
    """A score mod applied to S (..., n_q, n_k): alibi S + m(j − i), softcap c·tanh(S/c), relative bias
    S + B[clip(j − i, −d, d) + d]. `score_mod` has `kind` and `value` (symattn.symbolic.mods.ScoreMod)."""
    if score_mod is None:
        return S
    kind, value = score_mod.kind, float(score_mod.value)
    distance = np.arange(S.shape[-1])[None, :] - np.arange(S.shape[-2])[:, None]  # (n_q, n_k): j - i
    if kind == "alibi":
        return S + value * distance
    if kind == "softcap":
        return value * np.tanh(S / value)
    d = int(value)
    return S + (params or {})["B_rel"][np.clip(distance, -d, d) + d]


def mod_backward(S_raw, dS, score_mod, params=None) -> tuple[np.ndarray, dict]:
    """dS before the mod (dS·∂f/∂s) and the mod's parameter gradients."""
    if score_mod is None:
        return dS, {}
    if score_mod.kind == "softcap":
        return dS * (1 - np.tanh(S_raw / float(score_mod.value)) ** 2), {}
    if score_mod.kind == "alibi":
        return dS, {}
    d = int(score_mod.value)
    distance = np.arange(dS.shape[-1])[None, :] - np.arange(dS.shape[-2])[:, None]
    dB = np.zeros(2 * d + 1)
    np.add.at(dB, np.clip(distance, -d, d) + d, dS.reshape((-1,) + dS.shape[-2:]).sum(axis=0))
    return dS, {"B_rel": dB}


def weights(q, k, *, mask=None, is_causal=False, scale=None, masked_rows="zero", score="dot",
            params=None, score_mod=None) -> np.ndarray:
    """P = row-softmax(S + bias), shape (..., n_q, n_k), S from `scores` (and `modded`)."""
    q, k = np.asarray(q), np.asarray(k)
    S = modded(scores(q, k, score=score, params=params, scale=scale), score_mod, params)  # (..., n_q, n_k)
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


def attention(q, k, v, *, mask=None, is_causal=False, scale=None, masked_rows="zero", score="dot",
              params=None, score_mod=None) -> np.ndarray:
    """O = PV, shape (..., n_q, d_v)."""
    P = weights(q, k, mask=mask, is_causal=is_causal, scale=scale, masked_rows=masked_rows, score=score,
                params=params, score_mod=score_mod)
    return P @ np.asarray(v)  # (..., n_q, d_v)


def attention_backward(q, k, v, dO, *, mask=None, is_causal=False, scale=None, masked_rows="zero"):
    """(dQ, dK, dV) of L = Σ dO∘O, each with its input's shape (summed over broadcast dims)."""
    g = gradients(q, k, v, dO, mask=mask, is_causal=is_causal, scale=scale, masked_rows=masked_rows)
    return g["q"], g["k"], g["v"]


def gradients(q, k, v, dO, *, mask=None, is_causal=False, scale=None, masked_rows="zero", score="dot",
              params=None, score_mod=None) -> dict:
    """Every gradient of L = Σ dO∘O keyed "q", "k", "v" and by parameter name; inputs' gradients have their
    input's shape (summed over broadcast dims)."""
    q, k, v, dO = map(np.asarray, (q, k, v, dO))
    P = weights(q, k, mask=mask, is_causal=is_causal, scale=scale, masked_rows=masked_rows, score=score,
                params=params, score_mod=score_mod)  # (..., n_q, n_k)
    O = P @ v  # (..., n_q, d_v)
    dV = np.swapaxes(P, -1, -2) @ dO  # (..., n_k, d_v)
    dP = dO @ np.swapaxes(v, -1, -2)  # (..., n_q, n_k)
    D = np.sum(dO * O, axis=-1, keepdims=True)  # (..., n_q, 1)
    dS = P * (dP - D)  # (..., n_q, n_k)
    if masked_rows == "uniform":  # uniform rows do not depend on S
        bias, visible = _bias(mask, is_causal, q.shape[-2], k.shape[-2], dS.dtype)
        dS = np.where(np.any(visible, axis=-1, keepdims=True), dS, 0.0)
    S_raw = scores(q, k, score=score, params=params, scale=scale) if score_mod is not None else None
    dS, mod_grads = mod_backward(S_raw, dS, score_mod, params)
    g = {**score_backward(q, k, dS, score=score, params=params, scale=scale), **mod_grads}
    return {**g, "q": _sum_to(g["q"], q.shape), "k": _sum_to(g["k"], k.shape), "v": _sum_to(dV, v.shape)}


def _sum_to(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Gradient of a broadcast input: sum over the broadcast dims."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, n in enumerate(shape):
        if n == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


def multihead_attention(x, w_q, w_k, w_v, w_o, *, heads, kv_heads=None, y=None, mask=None, is_causal=False,
                        scale=None, b_q=None, b_k=None, b_v=None, b_o=None, masked_rows="zero"):
    """The layer, one head at a time: head i reads its column block of Q̂ and group ⌊i·kv_heads/heads⌋."""
    return _multihead(x, w_q, w_k, w_v, w_o, None, heads, kv_heads, y, dict(mask=mask, is_causal=is_causal,
                      scale=scale, masked_rows=masked_rows), b_q, b_k, b_v, b_o)


def multihead_attention_backward(x, w_q, w_k, w_v, w_o, d_out, *, heads, kv_heads=None, y=None, mask=None,
                                 is_causal=False, scale=None, b_q=None, b_k=None, b_v=None, b_o=None,
                                 masked_rows="zero") -> dict:
    """Gradients of L = Σ d_out∘layer(...) keyed by argument name."""
    return _multihead(x, w_q, w_k, w_v, w_o, d_out, heads, kv_heads, y, dict(mask=mask, is_causal=is_causal,
                      scale=scale, masked_rows=masked_rows), b_q, b_k, b_v, b_o)


def _multihead(x, w_q, w_k, w_v, w_o, d_out, heads, kv_heads, y, kw, b_q, b_k, b_v, b_o):
    kv_heads = heads if kv_heads is None else kv_heads
    src = x if y is None else y
    d_k, d_v = w_q.shape[1] // heads, w_v.shape[1] // kv_heads
    Qp = x @ w_q + (0 if b_q is None else b_q)  # (..., n_q, h·d_k)
    Kp = src @ w_k + (0 if b_k is None else b_k)  # (..., n_k, h_kv·d_k)
    Vp = src @ w_v + (0 if b_v is None else b_v)  # (..., n_k, h_kv·d_v)

    def head(i):
        g = i * kv_heads // heads
        return (Qp[..., i * d_k:(i + 1) * d_k], Kp[..., g * d_k:(g + 1) * d_k], Vp[..., g * d_v:(g + 1) * d_v])

    C = np.concatenate([attention(*head(i), **kw) for i in range(heads)], axis=-1)  # (..., n_q, h·d_v)
    out = C @ w_o + (0 if b_o is None else b_o)  # (..., n_q, d_model)
    if d_out is None:
        return out
    dC = d_out @ w_o.T  # (..., n_q, h·d_v)
    dQp, dKp, dVp = np.zeros_like(Qp), np.zeros_like(Kp), np.zeros_like(Vp)
    for i in range(heads):
        g = i * kv_heads // heads
        dq, dk, dv = attention_backward(*head(i), dC[..., i * d_v:(i + 1) * d_v], **kw)
        dQp[..., i * d_k:(i + 1) * d_k] += dq
        dKp[..., g * d_k:(g + 1) * d_k] += dk
        dVp[..., g * d_v:(g + 1) * d_v] += dv

    def weight_grad(a, g):  # a (..., n, p), g (..., n, q) -> (p, q), summed over the batch
        return _sum_to(np.swapaxes(a, -1, -2) @ g, g.shape[-1:] and (a.shape[-1], g.shape[-1]))

    grads = {"w_q": weight_grad(x, dQp), "w_k": weight_grad(src, dKp), "w_v": weight_grad(src, dVp),
             "w_o": weight_grad(C, d_out)}
    dx = dQp @ w_q.T
    dy = dKp @ w_k.T + dVp @ w_v.T
    if y is None:
        grads["x"] = _sum_to(dx + dy, x.shape)
    else:
        grads["x"], grads["y"] = _sum_to(dx, x.shape), _sum_to(dy, y.shape)
    for name, value, g in (("b_q", b_q, dQp), ("b_k", b_k, dKp), ("b_v", b_v, dVp), ("b_o", b_o, d_out)):
        if value is not None:
            grads[name] = g.reshape(-1, g.shape[-1]).sum(axis=0)
    return grads
