"""The peers `symattn bench` times symattn against, each at its best, where installed (`pip install -e ".[bench]"`).

PyTorch: scaled_dot_product_attention (no_grad) for the forward, autograd for forward+backward; the layer is the
faster of nn.MultiheadAttention (its fused inference path) and F.multi_head_attention_forward. JAX: the faster of
jax.nn.dot_product_attention and a jax.jit of the einsum + jax.nn.softmax formulation; forward+backward is a
jax.jit of jax.vjp (output and gradients). Every closure blocks until its result is ready.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

Closure = Callable[[], object]


def versions() -> dict:
    out = {}
    for name in ("torch", "jax", "jaxlib"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def setup(threads: int) -> None:
    """Same thread count as symattn; float64 enabled in JAX (the f64 rows). Call it before Numba's thread pool starts
    (numba.config.NUMBA_NUM_THREADS, not numba.get_num_threads(), which starts it). PyTorch's thread count is set
    only where it differs: measured here, torch.set_num_threads(2) after Numba's OpenMP pool had started (both use
    the one libgomp) made PyTorch's multi-head layer 4-7x slower for the rest of the process (16 -> 64-99 ms
    forward at (4,256,512)), which had flattered symattn's layer rows."""
    try:
        import torch
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    except ImportError:
        pass
    try:
        import jax
        jax.config.update("jax_enable_x64", True)
    except ImportError:
        pass


def _best(candidates: dict[str, tuple[Closure, Closure]], time) -> dict[str, tuple[float, str]]:
    """mode -> (best seconds, which candidate) over the candidates' (forward, forward+backward) closures."""
    out = {}
    for m, mode in enumerate(("forward", "forward+backward")):
        out[mode] = min((time(pair[m]), name) for name, pair in candidates.items())
    return out


def attention(q, k, v, dO, causal: bool, time) -> dict[str, dict[str, tuple[float, str]]]:
    """peer -> mode -> (seconds, variant) for q, k, v, dO (B, n, d)."""
    peers = {}
    try:
        import torch
        sdpa = torch.nn.functional.scaled_dot_product_attention
        tq, tk, tv, tdO = (torch.from_numpy(x) for x in (q, k, v, dO))
        lq, lk, lv = (x.clone().requires_grad_() for x in (tq, tk, tv))

        def fwd():
            with torch.no_grad():
                return sdpa(tq, tk, tv, is_causal=causal)

        def both():
            o = sdpa(lq, lk, lv, is_causal=causal)
            return o, torch.autograd.grad(o, (lq, lk, lv), tdO)
        peers["PyTorch"] = _best({"sdpa": (fwd, both)}, time)
    except ImportError:
        pass
    try:
        import jax
        import jax.numpy as jnp
        jq, jk, jv, jdO = (jax.device_put(x) for x in (q, k, v, dO))
        keep = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool)) if causal else None
        scale = 1.0 / math.sqrt(q.shape[-1])

        def einsum(q, k, v):
            s = jnp.einsum("bqd,bkd->bqk", q, k) * scale
            s = jnp.where(keep, s, -jnp.inf) if causal else s
            return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, axis=-1), v)

        def dpa(q, k, v):  # (B, T, heads=1, d)
            return jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None], is_causal=causal)[:, :, 0]
        peers["JAX"] = _best({name: _jax_pair(f, (jq, jk, jv), jdO) for name, f in
                              (("einsum", einsum), ("dot_product_attention", dpa))}, time)
    except ImportError:
        pass
    return peers


def _jax_pair(f, args, cotangent) -> tuple[Closure, Closure]:
    import jax
    fwd = jax.jit(f)
    vjp = jax.jit(lambda *a: (lambda o, pull: (o, pull(cotangent)))(*jax.vjp(f, *a)))
    return (lambda: fwd(*args).block_until_ready()), (lambda: jax.block_until_ready(vjp(*args)))


def layer(x, w_q, w_k, w_v, w_o, d_out, heads: int, kv_heads: int, time) -> dict:
    """peer -> mode -> (seconds, variant) for the multi-head self-attention layer without biases."""
    peers = {}
    d_model, d_k = x.shape[-1], w_q.shape[1] // heads
    if kv_heads == heads:
        try:
            peers["PyTorch"] = _best(_torch_layer(x, w_q, w_k, w_v, w_o, d_out, heads), time)
        except ImportError:
            pass
    try:
        import jax

        def f(x, w_q, w_k, w_v, w_o):
            B, n = x.shape[:2]
            Q = (x @ w_q).reshape(B, n, heads, d_k)
            K = (x @ w_k).reshape(B, n, kv_heads, d_k)
            V = (x @ w_v).reshape(B, n, kv_heads, d_k)
            return jax.nn.dot_product_attention(Q, K, V).reshape(B, n, heads * d_k) @ w_o
        args = tuple(jax.device_put(a) for a in (x, w_q, w_k, w_v, w_o))
        peers["JAX"] = _best({"jit": _jax_pair(f, args, jax.device_put(d_out))}, time)
    except ImportError:
        pass
    del d_model
    return peers


def _torch_layer(x, w_q, w_k, w_v, w_o, d_out, heads: int) -> dict[str, tuple[Closure, Closure]]:
    import torch
    d_model = x.shape[-1]
    tx, tdo = torch.from_numpy(x), torch.from_numpy(d_out)
    mha = torch.nn.MultiheadAttention(d_model, heads, bias=False, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.from_numpy(np.concatenate([w_q.T, w_k.T, w_v.T])))
        mha.out_proj.weight.copy_(torch.from_numpy(w_o.T.copy()))
    mha = mha.to(tx.dtype)
    lx = tx.clone().requires_grad_()
    params = [lx, mha.in_proj_weight, mha.out_proj.weight]

    def module_fwd():
        mha.eval()
        with torch.inference_mode():
            return mha(tx, tx, tx, need_weights=False)[0]

    def module_both():
        mha.train()
        out = mha(lx, lx, lx, need_weights=False)[0]
        return out, torch.autograd.grad(out, params, tdo)
    xt, lxt = tx.transpose(0, 1), lx.transpose(0, 1)  # (n, batch, d_model) for the functional form
    wq, wk, wv, wo = (torch.from_numpy(np.ascontiguousarray(w.T)).requires_grad_() for w in (w_q, w_k, w_v, w_o))

    def functional(inp):
        return torch.nn.functional.multi_head_attention_forward(
            inp, inp, inp, d_model, heads, None, None, None, None, False, 0.0, wo, None, training=False,
            need_weights=False, use_separate_proj_weight=True, q_proj_weight=wq, k_proj_weight=wk,
            v_proj_weight=wv)[0]

    def functional_fwd():
        with torch.no_grad():
            return functional(xt)

    def functional_both():
        out = functional(lxt)
        return out, torch.autograd.grad(out, (lx, wq, wk, wv, wo), tdo.transpose(0, 1))
    return {"nn.MultiheadAttention": (module_fwd, module_both), "F.multi_head_attention_forward":
            (functional_fwd, functional_both)}
