"""Plain NumPy attention, forward and backward: the obviously-correct oracle.

Semantics follow PyTorch's scaled_dot_product_attention: arrays (..., n, d); boolean mask True = may
attend; float mask added to the scores; is_causal = lower-triangular, top-left aligned. Fully masked rows
follow `masked_rows`: "zero" (output 0, zero gradients), "uniform" (uniform weights), "nan".
Score mods and mask mods see FlexAttention's indices: for (..., B, H, n, d) inputs b indexes dim -4 and h dim
-3 where present (0 otherwise), q_idx and kv_idx the rows of q and k.
"""
from __future__ import annotations

import numpy as np


def causal_mask(n_q: int, n_k: int) -> np.ndarray:
    """(n_q, n_k) boolean, True where key j <= query i."""
    return np.tril(np.ones((n_q, n_k), dtype=bool))


def _bias(mask, is_causal: bool, n_q: int, n_k: int, dtype, mask_mod=None, shape=None):
    """Additive bias (0 or -inf, or the float mask) and the boolean 'visible' array; a mask_mod is evaluated at
    scores of `shape` (..., n_q, n_k)."""
    bias = np.zeros((n_q, n_k), dtype=dtype)
    if mask is not None:
        mask = np.asarray(mask)
        bias = np.where(mask, 0.0, -np.inf).astype(dtype) if mask.dtype == bool else mask.astype(dtype)
    if is_causal:
        bias = np.where(causal_mask(n_q, n_k), bias, -np.inf)
    if mask_mod is not None:
        bias = np.where(mask_visible(mask_mod, shape), bias, -np.inf)
    return bias, bias != -np.inf  # only -inf masks: +inf and NaN entries stay visible (and make the row NaN)


def scores(q, k, *, score="dot", params=None, scale=None) -> np.ndarray:
    """S (..., n_q, n_k): dot scale·q kᵀ, general scale·q W_a kᵀ, additive v_aᵀ tanh(q W_a + k U_a + b_a),
    cosine tau·(q/max(‖q‖, eps))·(k/max(‖k‖, eps))ᵀ (eps = 1e-12, as torch.nn.functional.normalize)."""
    q, k, theta = np.asarray(q), np.asarray(k), params or {}
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    if score == "dot":
        return scale * (q @ np.swapaxes(k, -1, -2))
    if score == "general":
        return scale * (q @ theta["W_a"] @ np.swapaxes(k, -1, -2))
    if score == "cosine":
        return _tau(theta) * (_unit(q)[0] @ np.swapaxes(_unit(k)[0], -1, -2))
    if score == "additive":
        return _hidden(q, k, theta) @ theta["v_a"]  # (..., n_q, n_k, d_a) @ (d_a,)
    raise _unwritten(score)


#: The scores written out here, by hand, independently of the derivation.
WRITTEN = ("dot", "general", "additive", "cosine")


def _unwritten(score):
    from ..errors import SpecError
    return SpecError(f"reference: no NumPy formula for score {score!r} yet: write it in scores() and "
                     f"score_backward() of symattn/numeric/reference.py and add it to WRITTEN there (verify's "
                     f"independent third opinion)")


NORM_EPS = 1e-12


def _unit(x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x / max(‖x‖, eps) row by row (..., n, d), the norms (..., n, 1), and where the clamp is off (‖x‖ >= eps)
    (..., n, 1)."""
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    return x / np.maximum(norm, NORM_EPS), norm, norm >= NORM_EPS


def _tau(theta) -> float:
    """The cosine score's temperature: a scalar, shape () or (1,)."""
    return float(np.asarray(theta["tau"]).reshape(()))


def _cosine_backward(q, k, dS, theta) -> dict:
    """dQ, dK, dtau of S = tau ûkᵀ with û = q / max(‖q‖, eps); the clamp passes no gradient to the norm where it
    holds (‖x‖ < eps), as torch's clamp_min."""
    tau, (u, nq, on_q), (w, nk, on_k) = _tau(theta), _unit(q), _unit(k)
    dU, dW = tau * dS @ w, tau * np.swapaxes(dS, -1, -2) @ u  # (..., n_q, d_k), (..., n_k, d_k)

    def through_norm(x, unit, norm, on, d_unit):  # d(x / max(‖x‖, eps)) applied to d_unit
        radial = np.sum(d_unit * unit, axis=-1, keepdims=True) * unit
        return (d_unit - np.where(on, radial, 0.0)) / np.maximum(norm, NORM_EPS)
    dtau = np.sum(dS * (u @ np.swapaxes(w, -1, -2)))
    return {"q": through_norm(q, u, nq, on_q, dU), "k": through_norm(k, w, nk, on_k, dW),
            "tau": np.reshape(dtau, np.shape(theta["tau"]))}


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
    if score == "cosine":
        return _cosine_backward(q, k, dS, theta)
    if score == "general":
        W = theta["W_a"]
        return {"q": scale * dS @ k @ W.T, "k": scale * dST @ q @ W,  # (..., n, d_k)
                "W_a": scale * _total(np.einsum("...ia,...ij,...jb->...ab", q, dS, k), 2)}  # (d_k, d_k)
    if score != "additive":
        raise _unwritten(score)
    H = _hidden(q, k, theta)  # (..., n_q, n_k, d_a)
    dpre = dS[..., None] * theta["v_a"] * (1 - H * H)  # dL/d(q W + k U + b), (..., n_q, n_k, d_a)
    return {"q": dpre.sum(axis=-2) @ theta["W_a"].T, "k": dpre.sum(axis=-3) @ theta["U_a"].T,
            "W_a": _total(np.swapaxes(q, -1, -2) @ dpre.sum(axis=-2), 2),  # (d_k, d_a)
            "U_a": _total(np.swapaxes(k, -1, -2) @ dpre.sum(axis=-3), 2),  # (d_k, d_a)
            "v_a": _total(np.einsum("...ij,...ijr->...r", dS, H), 1), "b_a": _total(dpre, 1)}  # (d_a,)


def _total(g: np.ndarray, rank: int) -> np.ndarray:
    """Sum a parameter's gradient over every leading (batch, query, key) dim down to its own `rank` dims."""
    return g.reshape((-1,) + g.shape[g.ndim - rank:]).sum(axis=0)


def _grids(shape: tuple[int, ...]) -> tuple:
    """FlexAttention's (b, h, q_idx, kv_idx) for scores of `shape` (..., n_q, n_k), broadcastable against them.
    (..., B, H, n_q, n_k): h the heads dim, b counts every element of the dims before it; (B, n_q, n_k): b the
    batch dim, h = 0; (n_q, n_k): b = h = 0."""
    batch, (n_q, n_k) = shape[:-2], shape[-2:]
    b = h = np.zeros((), int)
    if len(batch) >= 2:
        b = np.arange(int(np.prod(batch[:-1]))).reshape(batch[:-1] + (1, 1, 1))  # (..., B, 1, 1, 1)
        h = np.arange(batch[-1]).reshape(-1, 1, 1)  # (H, 1, 1)
    elif len(batch) == 1:
        b = np.arange(batch[0]).reshape(-1, 1, 1)  # (B, 1, 1)
    return b, h, np.arange(n_q).reshape(-1, 1), np.arange(n_k).reshape(1, -1)  # q (n_q, 1), kv (1, n_k)


def modded(S, score_mod, params=None) -> np.ndarray:
    """A score mod applied to S (..., n_q, n_k): alibi S + m(j − i) (m = the slope, or 2^(-8(h+1)/H) of head h),
    softcap c·tanh(S/c), relative bias S + B[clip(j − i, −d, d) + d], a user's traced mod by its lambdified
    expression. `score_mod` has `kind` and `value` (symattn.symbolic.mods.ScoreMod)."""
    if score_mod is None:
        return S
    kind, value = score_mod.kind, float(score_mod.value)
    b, h, q, kv = _grids(S.shape)
    if kind == "alibi":
        return S + value * (kv - q)
    if kind == "alibi-heads":
        return S + 2.0 ** (-8.0 * (h + 1) / value) * (kv - q)
    if kind == "softcap":
        return value * np.tanh(S / value)
    if kind == "user":
        f, _, leaves = score_mod.trace.numpy()
        tables = _tables(score_mod, params)
        for name, index_fns, _ in leaves:  # NumPy would wrap a negative index silently
            _entry_index(name, index_fns, (b, h, q, kv), S.shape, dict(zip(score_mod.trace.tables, tables)))
        return np.broadcast_to(f(S, b, h, q, kv, *tables), S.shape)
    d = int(value)
    return S + (params or {})["B_rel"][np.clip(kv - q, -d, d) + d]


def _tables(score_mod, params) -> list[np.ndarray]:
    """A user's mod's tables from `params`, in its order."""
    missing = [t.name for t in score_mod.trace.tables if t.name not in (params or {})]
    if missing:
        raise KeyError(f"params lacks the score mod's table(s) {missing}")
    return [np.asarray(params[t.name]) for t in score_mod.trace.tables]


def mod_backward(S_raw, dS, score_mod, params=None) -> tuple[np.ndarray, dict]:
    """dS before the mod (dS·∂f/∂s) and the mod's parameter gradients."""
    if score_mod is None or score_mod.kind in ("alibi", "alibi-heads"):
        return dS, {}
    if score_mod.kind == "softcap":
        return dS * (1 - np.tanh(S_raw / float(score_mod.value)) ** 2), {}
    b, h, q, kv = _grids(dS.shape)
    if score_mod.kind == "user":
        return _user_backward(S_raw, dS, score_mod, params, (b, h, q, kv))
    d = int(score_mod.value)
    dB = np.zeros(2 * d + 1)
    np.add.at(dB, np.clip(kv - q, -d, d) + d, dS.reshape((-1,) + dS.shape[-2:]).sum(axis=0))
    return dS, {"B_rel": dB}


def _user_backward(S_raw, dS, score_mod, params, grids) -> tuple[np.ndarray, dict]:
    """dS·∂f/∂s, and each table's gradient: Σ dS·∂f/∂entry scattered to the entry's index (np.add.at)."""
    _, slope, leaves = score_mod.trace.numpy()
    tables = _tables(score_mod, params)
    args = (S_raw, *grids, *tables)
    grads = {t.name: np.zeros(np.shape(x)) for t, x in zip(score_mod.trace.tables, tables)}
    for name, index_fns, partial in leaves:
        index = _entry_index(name, index_fns, grids, dS.shape, dict(zip(score_mod.trace.tables, tables)))
        np.add.at(grads[name], index, dS * np.broadcast_to(partial(*args), dS.shape))
    return dS * np.broadcast_to(slope(*args), dS.shape), grads


def _entry_index(name: str, index_fns, grids, shape, tables: dict) -> tuple[np.ndarray, ...]:
    """The table index a mod reads at every score of `shape`, checked to lie in the table."""
    size = next(np.shape(x) for t, x in tables.items() if t.name == name)
    index = tuple(np.broadcast_to(np.asarray(f(*grids)), shape) for f in index_fns)
    if any(np.any(ix != np.round(ix)) or np.any(ix < 0) or np.any(ix >= n) for ix, n in zip(index, size)):
        raise IndexError(f"the score mod reads {name} outside its shape {size}")
    return tuple(ix.astype(int) for ix in index)


def mask_visible(mask_mod, shape: tuple[int, ...]) -> np.ndarray:
    """The boolean visibility of a mask (a symattn Mask, or a mask_mod(b, h, q_idx, kv_idx) function) at scores of
    `shape` (..., n_q, n_k): its mod called over index grids, or pair by pair where it takes Python ints only."""
    mod = getattr(mask_mod, "mod", mask_mod)
    b, h, q, kv = _grids(shape)
    try:
        visible = np.asarray(mod(b, h, q, kv), dtype=bool)
    except Exception:  # a mod written for one (b, h, q_idx, kv_idx) at a time
        visible = np.vectorize(lambda *ix: bool(mod(*(int(x) for x in ix))))(b, h, q, kv)
    return np.broadcast_to(visible, np.broadcast_shapes(visible.shape, shape))


def _variant(score, params, score_mod, mask_mod, d_k: int) -> tuple:
    """(score_mod, mask_mod) as objects, a library text accepted for either (as symattn.attention takes them),
    after checking the score's name and its parameters' presence and shapes (d_k from q): the oracle names what is
    wrong instead of failing inside NumPy. A score mod's own parameters are read as given."""
    from ..errors import SpecError
    from ..symbolic.score_names import PARAMS  # names only: no SymPy
    if score not in PARAMS:
        raise SpecError(f"reference: score must be one of {', '.join(map(repr, PARAMS))}, got {score!r}")
    if score not in WRITTEN:
        raise _unwritten(score)
    missing = [n for n in PARAMS[score] if n not in (params or {})]
    if missing:
        raise SpecError(f"reference: score {score!r} needs params {', '.join(map(repr, missing))}")
    _check_shapes(score, params or {}, d_k)
    if isinstance(score_mod, str):
        from ..symbolic.mods import mod_of  # library texts parse without SymPy
        score_mod = mod_of(score_mod)
    if isinstance(mask_mod, str):
        from ..symbolic.masks import mask_of
        mask_mod = mask_of(mask_mod)
    return score_mod, mask_mod


def _check_shapes(score: str, theta: dict, d_k: int) -> None:
    """The score's parameters have the shapes of symattn.symbolic.score, else SpecError naming the parameter."""
    from ..errors import SpecError
    d_a = -1
    if score == "additive":  # d_a: the size most of W_a, U_a, v_a, b_a give, so the one that differs is named
        sizes = [np.shape(theta[n])[-1] for n in ("W_a", "U_a", "v_a", "b_a") if np.ndim(theta[n]) >= 1]
        d_a = max(sizes, key=sizes.count) if sizes else -1
    want = {"general": {"W_a": [(d_k, d_k)]}, "cosine": {"tau": [(), (1,)]},
            "additive": {"W_a": [(d_k, d_a)], "U_a": [(d_k, d_a)], "v_a": [(d_a,)], "b_a": [(d_a,)]}}.get(score, {})
    for name, shapes in want.items():
        if np.shape(theta[name]) not in shapes:
            raise SpecError(f"reference: parameter {name!r} of score {score!r} must have shape "
                            f"{' or '.join(map(str, shapes))} (d_k = {d_k}), got {np.shape(theta[name])}")


def weights(q, k, *, mask=None, is_causal=False, scale=None, masked_rows="zero", score="dot",
            params=None, score_mod=None, mask_mod=None) -> np.ndarray:
    """P = row-softmax(S + bias), shape (..., n_q, n_k), S from `scores` (and `modded`); `mask_mod` (a Mask, its
    text or a mask_mod function) hides keys besides `mask` and `is_causal`."""
    q, k = np.asarray(q), np.asarray(k)
    score_mod, mask_mod = _variant(score, params, score_mod, mask_mod, q.shape[-1])
    S = modded(scores(q, k, score=score, params=params, scale=scale), score_mod, params)  # (..., n_q, n_k)
    bias, visible = _bias(mask, is_causal, q.shape[-2], k.shape[-2], S.dtype, mask_mod, S.shape)
    S = S + bias
    empty = ~np.any(visible, axis=-1, keepdims=True)  # (..., n_q, 1) fully masked rows
    m = np.max(np.where(empty, 0.0, S), axis=-1, keepdims=True)
    m = np.where(m == -np.inf, 0.0, m)  # a +inf or NaN maximum makes the row NaN, as in torch.softmax
    with np.errstate(invalid="ignore"):  # such rows, and rows whose visible scores are all -inf, are NaN
        E = np.where(visible, np.exp(S - m), 0.0)  # (..., n_q, n_k)
        P = E / np.where(empty, 1.0, E.sum(axis=-1, keepdims=True))
    if masked_rows == "uniform":
        P = np.where(empty, 1.0 / k.shape[-2], P)
    elif masked_rows == "nan":
        P = np.where(empty, np.nan, P)
    return P


def attention(q, k, v, *, mask=None, is_causal=False, scale=None, masked_rows="zero", score="dot",
              params=None, score_mod=None, mask_mod=None) -> np.ndarray:
    """O = PV, shape (..., n_q, d_v)."""
    P = weights(q, k, mask=mask, is_causal=is_causal, scale=scale, masked_rows=masked_rows, score=score,
                params=params, score_mod=score_mod, mask_mod=mask_mod)
    return P @ np.asarray(v)  # (..., n_q, d_v)


def attention_backward(q, k, v, dO, *, mask=None, is_causal=False, scale=None, masked_rows="zero"):
    """(dQ, dK, dV) of L = Σ dO∘O, each with its input's shape (summed over broadcast dims)."""
    g = gradients(q, k, v, dO, mask=mask, is_causal=is_causal, scale=scale, masked_rows=masked_rows)
    return g["q"], g["k"], g["v"]


def gradients(q, k, v, dO, *, mask=None, is_causal=False, scale=None, masked_rows="zero", score="dot",
              params=None, score_mod=None, mask_mod=None) -> dict:
    """Every gradient of L = Σ dO∘O keyed "q", "k", "v" and by parameter name; inputs' gradients have their
    input's shape (summed over broadcast dims)."""
    q, k, v, dO = map(np.asarray, (q, k, v, dO))
    score_mod, mask_mod = _variant(score, params, score_mod, mask_mod, q.shape[-1])
    P = weights(q, k, mask=mask, is_causal=is_causal, scale=scale, masked_rows=masked_rows, score=score,
                params=params, score_mod=score_mod, mask_mod=mask_mod)  # (..., n_q, n_k)
    O = P @ v  # (..., n_q, d_v)
    dV = np.swapaxes(P, -1, -2) @ dO  # (..., n_k, d_v)
    dP = dO @ np.swapaxes(v, -1, -2)  # (..., n_q, n_k)
    D = np.sum(dO * O, axis=-1, keepdims=True)  # (..., n_q, 1)
    dS = P * (dP - D)  # (..., n_q, n_k)
    if masked_rows == "uniform":  # uniform rows do not depend on S
        bias, visible = _bias(mask, is_causal, q.shape[-2], k.shape[-2], dS.dtype, mask_mod, dS.shape)
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
                        scale=None, b_q=None, b_k=None, b_v=None, b_o=None, masked_rows="zero", score="dot",
                        params=None, score_mod=None, mask_mod=None):
    """The layer: head i reads its column block of Q̂ and group ⌊i·kv_heads/heads⌋; the variant (score, params θ
    shared by every head, score_mod with h the head, mask_mod) is `attention`'s."""
    return _multihead(x, w_q, w_k, w_v, w_o, None, heads, kv_heads, y, dict(
        mask=mask, is_causal=is_causal, scale=scale, masked_rows=masked_rows, score=score, params=params,
        score_mod=score_mod, mask_mod=mask_mod), dict(b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o))


def multihead_attention_backward(x, w_q, w_k, w_v, w_o, d_out, *, heads, kv_heads=None, y=None, mask=None,
                                 is_causal=False, scale=None, b_q=None, b_k=None, b_v=None, b_o=None,
                                 masked_rows="zero", score="dot", params=None, score_mod=None,
                                 mask_mod=None) -> dict:
    """Gradients of L = Σ d_out∘layer(...) keyed by argument name, and by parameter name (summed over heads)."""
    return _multihead(x, w_q, w_k, w_v, w_o, d_out, heads, kv_heads, y, dict(
        mask=mask, is_causal=is_causal, scale=scale, masked_rows=masked_rows, score=score, params=params,
        score_mod=score_mod, mask_mod=mask_mod), dict(b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o))


def _head_blocks(A: np.ndarray, width: int, blocks) -> np.ndarray:
    """(..., n, blocks·width) -> (B, h, n, width): head i is column block blocks[i] (FlexAttention's layout; a
    batch dim of 1 where A has none, so a score mod reads h from dim -3)."""
    H = np.stack([A[..., g * width:(g + 1) * width] for g in blocks], axis=-3)
    return H if H.ndim >= 4 else H[None]


def _concat_heads(H: np.ndarray) -> np.ndarray:
    """(..., h, n, width) -> (..., n, h·width): the heads side by side."""
    return np.concatenate([H[..., i, :, :] for i in range(H.shape[-3])], axis=-1)


def _multihead(x, w_q, w_k, w_v, w_o, d_out, heads, kv_heads, y, kw, biases):
    kv_heads = heads if kv_heads is None else kv_heads
    src = x if y is None else y
    d_k, d_v = w_q.shape[1] // heads, w_v.shape[1] // kv_heads
    group = [i * kv_heads // heads for i in range(heads)]
    bias = {n: 0 if b is None else b for n, b in biases.items()}
    Qp = x @ w_q + bias["b_q"]  # (..., n_q, h·d_k)
    Kp = src @ w_k + bias["b_k"]  # (..., n_k, h_kv·d_k)
    Vp = src @ w_v + bias["b_v"]  # (..., n_k, h_kv·d_v)
    Q, K, V = _head_blocks(Qp, d_k, range(heads)), _head_blocks(Kp, d_k, group), _head_blocks(Vp, d_v, group)
    kw = dict(kw, mask=None if kw["mask"] is None else np.asarray(kw["mask"])[..., None, :, :])  # every head
    batch = np.broadcast_shapes(x.shape[:-2], src.shape[:-2], np.shape(kw["mask"])[:-3] if kw["mask"] is not None
                                else ())
    C = _concat_heads(attention(Q, K, V, **kw)).reshape(batch + (x.shape[-2], heads * d_v))  # (..., n_q, h·d_v)
    out = C @ w_o + bias["b_o"]  # (..., n_q, d_model)
    if d_out is None:
        return out
    dO = _head_blocks(d_out @ w_o.T, d_v, range(heads))  # (B, h, n_q, d_v)
    g = gradients(Q, K, V, dO, **kw)
    dQp, dKp, dVp = _concat_heads(g["q"]), np.zeros(g["k"].shape[:-3] + Kp.shape[-2:]), \
        np.zeros(g["v"].shape[:-3] + Vp.shape[-2:])
    for i, grp in enumerate(group):  # a group's keys and values feed each of its heads: their gradients add
        dKp[..., grp * d_k:(grp + 1) * d_k] += g["k"][..., i, :, :]
        dVp[..., grp * d_v:(grp + 1) * d_v] += g["v"][..., i, :, :]

    def weight_grad(a, g):  # a (..., n, p), g (..., n, q) -> (p, q), summed over the batch
        return _sum_to(np.swapaxes(a, -1, -2) @ g, (a.shape[-1], g.shape[-1]))

    grads = {"w_q": weight_grad(x, dQp), "w_k": weight_grad(src, dKp), "w_v": weight_grad(src, dVp),
             "w_o": weight_grad(C, d_out), **{n: v for n, v in g.items() if n not in ("q", "k", "v")}}
    dx = dQp @ w_q.T
    dy = dKp @ w_k.T + dVp @ w_v.T
    if y is None:
        grads["x"] = _sum_to(dx + dy, x.shape)
    else:
        grads["x"], grads["y"] = _sum_to(dx, x.shape), _sum_to(dy, y.shape)
    for name, g_b in (("b_q", dQp), ("b_k", dKp), ("b_v", dVp), ("b_o", d_out)):
        if biases[name] is not None:
            grads[name] = g_b.reshape(-1, g_b.shape[-1]).sum(axis=0)
    return grads
