"""Dispatch to the generated kernels (symattn/numeric/attention_loops.py): serial loop kernels for small problems,
flash-style tile kernels (BLAS tiles, prange) for the rest, with BLAS held to one thread while they run.

Arrays arrive validated and flattened: Q (Bq, n_q, d_k), K (Bk, n_k, d_k), V (Bv, n_k, d_v) C-contiguous,
bias (Bm, n_q, n_k) or (0, 0, 0), batch (B, 4) int64 rows [q, k, v, bias] of each flattened batch element.

Variants of the dot score (variant_forward / variant_backward: a score mod, an index mask, run-time masks) run the
same loop and tile kernels rendered per (mod, mask) from the derivation (codegen.loop.render_variant), cached in
cache_dir() as variant_<tag>.py and imported only when their content hash holds; bh (B, 2) gives each batch
element's FlexAttention (b, h). Masked tiles are skipped; no n_q x n_k mask array is built. The caches of generated
modules (cache_dir, load_variant, load_unrolled) live in kernel_cache.py and are re-exported here.
"""
from __future__ import annotations

import numba
import numpy as np

from . import attention_loops as loops
from .blas_hold import one_blas_thread  # noqa: F401  (kernels.one_blas_thread, as the callers know it)
from .kernel_cache import cache_dir, generator_files, load_unrolled, load_variant, variant_tag  # noqa: F401
from ..errors import InputError

MASKED_ROWS = {"zero": 0, "uniform": 1, "nan": 2}
#: Below this many score entries (B·n_q·n_k) the serial loop kernels win: no BLAS call, no thread start.
SMALL = 1 << 15
#: Forward tiles (query rows x keys): 128 x 256 (64 x 64 measured 35% slower), 256 x 256 where that still gives every
#: thread two blocks (0.90 vs 0.98 ms at (8,256,64), one core); a variant's index mask 64 x 128 (less work past the
#: mask's edge). Backward 256 x 256 (one core, f32, AVX-512 OpenBLAS: 2.27 vs 2.79 ms at (8,256,64), 9.3 vs 13.1 ms
#: at (2,1024,64) against 128 x 128: bigger GEMMs, fewer partial-sum passes); a variant's mask 128 x 128.
BQ, BK, BQ_BWD, BK_BWD = 128, 256, 256, 256
BQ_MASKED, BK_MASKED, BQ_BWD_MASKED, BK_BWD_MASKED = 64, 128, 128, 128
#: The plain causal kernels: 256 x 256 tiles off the diagonal, the diagonal square in strips of 64 rows against the
#: keys up to each strip's last row. One core, (8,1024,64): forward 9.1 ms against 15.0 plain (10.0 with whole
#: 64 x 128 tiles), fwd+bwd 35.5 against 56 ms (1.60x; 1.50x with whole 128 x 128 tiles); (2,4096,64) forward 31-33
#: against 59-64 ms (35 before), fwd+bwd 109-111 against 207-210 ms (122 before).
BQ_CAUSAL, BK_CAUSAL, BD_CAUSAL = 256, 256, 64
BQ_BWD_CAUSAL, BK_BWD_CAUSAL, BD_BWD_CAUSAL = 256, 256, 64


def forward_tile_shape(B: int, n_q: int, kind: str) -> tuple[int, int]:
    """(bq, bk) of the forward tile kernels for B batch elements of n_q queries; `kind` "plain", "causal" (the plain
    kernel's diagonal strips) or "masked" (a variant's index mask)."""
    if kind == "causal":
        return BQ_CAUSAL, BK_CAUSAL
    if kind == "masked":
        return BQ_MASKED, BK_MASKED
    wide = 2 * BQ
    return (wide, BK) if B * -(-n_q // wide) >= 2 * numba.get_num_threads() else (BQ, BK)


def backward_tile_shape(B: int, n_k: int, kind: str) -> tuple[int, int, int]:
    """(bq, bk, groups) of the backward tile kernels, `kind` as for forward_tile_shape: groups of key blocks per
    batch element, more than one when there are fewer batch elements than threads."""
    bq, bk = {"causal": (BQ_BWD_CAUSAL, BK_BWD_CAUSAL), "masked": (BQ_BWD_MASKED, BK_BWD_MASKED)}.get(
        kind, (BQ_BWD, BK_BWD))
    threads = numba.get_num_threads()
    return bq, bk, 1 if B >= threads else min(-(-n_k // bk), -(-2 * threads // max(B, 1)))


def run_recording_entry(kernel, args: tuple):
    """Run `kernel(*args)` through Numba's dispatcher (compiling if needed) and return the compiled entry point
    of these argument types (None for a plain Python function, e.g. a test's wrapper): calling it skips the
    dispatcher's type matching (about 0.2 µs of a 0.7 µs call at (1,5,2)). Only for callers that check the
    arguments' types themselves before each call (the numeric API's plain fast path: C-contiguous arrays of one
    float dtype, a bool and a float)."""
    kernel(*args)
    overloads = getattr(kernel, "overloads", None)
    return None if overloads is None else overloads[tuple(numba.typeof(a) for a in args)].entry_point


_BATCHES: dict[int, np.ndarray] = {}  # B -> identity batch rows (B, 4), read-only


def identity_batch(B: int) -> np.ndarray:
    """Batch rows [z, z, z, 0] of B unbroadcast batch elements (no mask), cached."""
    rows = _BATCHES.get(B)
    if rows is None:
        rows = np.zeros((B, 4), dtype=np.int64)
        rows[:, :3] = np.arange(B)[:, None]
        rows.setflags(write=False)
        if len(_BATCHES) < 64:  # a program uses few batch sizes; the cache stays small whatever it does
            _BATCHES[B] = rows
    return rows


def _identity_rows(Q, K, V, bias, batch) -> bool:
    """No mask and batch element z reads row z of Q, K and V: the serial plain kernels apply, the fast path's own,
    so the validated path (a non-contiguous q, say) gives the fast path's numbers bit for bit (the kernels are
    compiled with fastmath, so two compiled functions may round differently). No row is then fully masked. The
    cached identity rows (api._prepare's) are known by identity, others compared."""
    B = batch.shape[0]
    return bias.shape[0] == 0 and Q.shape[0] == K.shape[0] == V.shape[0] == B and \
        (batch is _BATCHES.get(B) or bool((batch[:, :3] == np.arange(B)[:, None]).all()))


def forward_into(Q, K, V, bias, batch, causal: bool, scale: float, code: int, O, LSE) -> None:
    """Write O (B, n_q, d_v) and the row log-sum-exp LSE (B, n_q); `code` is MASKED_ROWS[policy]."""
    B = batch.shape[0]
    if B * Q.shape[1] * K.shape[1] < SMALL and _identity_rows(Q, K, V, bias, batch):
        loops.plain_forward(Q, K, V, causal, scale, O, LSE, np.empty(K.shape[1], dtype=Q.dtype))
    elif B * Q.shape[1] * K.shape[1] < SMALL:
        loops.attention_forward(Q, K, V, bias, batch, causal, scale, code, O, LSE)
    else:
        with one_blas_thread:
            bq, bk = forward_tile_shape(B, Q.shape[1], "causal" if causal else "plain")
            loops.forward_tiles(Q, K, V, bias, batch, causal, scale, code, O, LSE, bq, bk, min(BD_CAUSAL, bk))


def forward(Q, K, V, bias, batch, causal: bool, scale: float, masked_rows: str):
    """O (B, n_q, d_v) and the row log-sum-exp LSE (B, n_q)."""
    B, n_q, d_v = batch.shape[0], Q.shape[1], V.shape[2]
    O = np.empty((B, n_q, d_v), dtype=Q.dtype)
    LSE = np.empty((B, n_q), dtype=Q.dtype)
    forward_into(Q, K, V, bias, batch, causal, scale, MASKED_ROWS[masked_rows], O, LSE)
    return O, LSE


def backward_into(Q, K, V, bias, batch, causal: bool, scale: float, code: int, O, LSE, dO, dQ, dK, dV) -> None:
    """Write dQ (B, n_q, d_k), dK (B, n_k, d_k), dV (B, n_k, d_v) from the forward's O and LSE (no second
    forward). Tiles: one task per (batch element, group of key blocks); with fewer batch elements than threads
    the key blocks of an element are split into groups whose dQ partials are summed in a fixed order."""
    B, n_q, n_k = batch.shape[0], Q.shape[1], K.shape[1]
    if B * n_q * n_k < SMALL and _identity_rows(Q, K, V, bias, batch):
        loops.plain_backward(Q, K, V, causal, scale, O, LSE, dO, dQ, dK, dV,
                             np.empty(loops.BACKWARD_SCRATCH * n_k, dtype=Q.dtype))
        return
    if B * n_q * n_k < SMALL:
        loops.attention_backward(Q, K, V, bias, batch, causal, scale, code, O, LSE, dO, dQ, dK, dV)
        return
    with one_blas_thread:
        bq, bk, groups = backward_tile_shape(B, n_k, "causal" if causal else "plain")
        loops.backward_tiles(Q, K, V, bias, batch, causal, scale, code, O, LSE, dO, dQ, dK, dV, bq, bk,
                             min(BD_BWD_CAUSAL, bq), groups)


def backward(Q, K, V, bias, batch, causal: bool, scale: float, masked_rows: str, O, LSE, dO):
    """dQ (B, n_q, d_k), dK (B, n_k, d_k), dV (B, n_k, d_v), one slice per flattened batch element."""
    B = batch.shape[0]
    dQ = np.empty((B,) + Q.shape[1:], dtype=Q.dtype)
    dK = np.empty((B,) + K.shape[1:], dtype=Q.dtype)
    dV = np.empty((B,) + V.shape[1:], dtype=Q.dtype)
    backward_into(Q, K, V, bias, batch, causal, scale, MASKED_ROWS[masked_rows], O, LSE, dO, dQ, dK, dV)
    return dQ, dK, dV


# ------------------------------------------------------------------------------------------------ variants
def variant_forward(Q, K, V, bias, batch, bh, scale: float, code: int, mod, mask, params, O, LSE) -> None:
    """Dot-product attention with score mod `mod` and mask `mask` (symattn ScoreMod / Mask or None): write O
    (B, n_q, d_v) and LSE (B, n_q). bh (B, 2) int64 holds each batch element's (b, h); params maps the mod's
    parameter names to arrays. Loop kernels for small problems, tile kernels (masked tiles skipped) otherwise."""
    if _plain_variant(mod, mask):
        forward_into(Q, K, V, bias, batch, mask is not None, scale, code, O, LSE)
        return
    module, extras = _variant_call(Q, K, bh, mod, mask, params)
    if batch.shape[0] * Q.shape[1] * K.shape[1] < SMALL:
        module.attention_forward(Q, K, V, bias, batch, bh, scale, code, O, LSE, *extras)
    else:
        with one_blas_thread:
            bq, bk = forward_tile_shape(batch.shape[0], Q.shape[1], "plain" if mask is None else "masked")
            module.forward_tiles(Q, K, V, bias, batch, bh, scale, code, O, LSE, bq, bk, *extras)


def variant_backward(Q, K, V, bias, batch, bh, scale: float, code: int, mod, mask, params, O, LSE, dO, dQ, dK,
                     dV) -> dict:
    """Write dQ (B, n_q, d_k), dK (B, n_k, d_k), dV (B, n_k, d_v) of variant_forward's attention; return the mod's
    parameter gradients {name: array of the parameter's shape}, summed over the batch: each task adds into its
    own row of a partial, the rows are summed in a fixed order (deterministic)."""
    if _plain_variant(mod, mask):
        backward_into(Q, K, V, bias, batch, mask is not None, scale, code, O, LSE, dO, dQ, dK, dV)
        return {}
    module, extras = _variant_call(Q, K, bh, mod, mask, params)
    B, n_q, n_k = batch.shape[0], Q.shape[1], K.shape[1]
    small = B * n_q * n_k < SMALL
    bq, bk, groups = backward_tile_shape(B, n_k, "plain" if mask is None else "masked")
    tasks = 1 if small else B * groups
    names = _variant_params(mod)
    partials = [np.zeros((tasks,) + extras[n].shape, dtype=Q.dtype) for n in range(len(names))]
    if small:
        module.attention_backward(Q, K, V, bias, batch, bh, scale, code, O, LSE, dO, dQ, dK, dV, *extras, *partials)
    else:
        with one_blas_thread:
            module.backward_tiles(Q, K, V, bias, batch, bh, scale, code, O, LSE, dO, dQ, dK, dV, bq, bk, groups,
                                  *extras, *partials)
    return {name: partial.sum(axis=0) for (name, _), partial in zip(names, partials)}


def _plain_variant(mod, mask) -> bool:
    """No mod and no mask or the causal mask alone: today's kernels with the causal flag do exactly this (and the
    flag's diagonal cut is a little cheaper than a span per row)."""
    return mod is None and (mask is None or mask.text == "causal")


def _variant_params(mod) -> list[tuple[str, str]]:
    """(API name, kernel argument) of the mod's parameters (Param names; no SymPy)."""
    return [] if mod is None else [(fields[0], fields[1]) for fields in mod.declared]


def _variant_call(Q, K, bh, mod, mask, params) -> tuple:
    """The variant's kernel module and its extra arguments: the mod's parameters (kernel dtype), then the mask's
    run-time arrays (int64, one row per b). Bad parameters or mask data raise InputError."""
    B, n_q, n_k = bh.shape[0], Q.shape[1], K.shape[1]
    if bh.shape != (B, 2) or bh.dtype != np.int64:
        raise InputError(f"bh must be an int64 array (B, 2) of (b, h) per batch element, got {bh.dtype} {bh.shape}")
    extras = [_param(name, mod, params, Q) for name, _ in _variant_params(mod)]
    nb = int(bh[:, 0].max()) + 1 if B else 1
    for name, array in (mask.arrays if mask is not None else ()):
        extras.append(mask_array(name, array, nb, n_q, n_k))
    return load_variant(mod, mask), extras


def _param(name: str, mod, params, Q) -> np.ndarray:
    """The parameter `name` of `mod` as a C-contiguous array of the kernels' dtype, its shape checked."""
    if params is None or name not in params:
        raise InputError(f"score mod {mod.text} needs the parameter {name!r}")
    value = np.asarray(params[name])
    fields = next(f for f in mod.declared if f[0] == name)
    sizes = {**dict(mod.sizes), "d_k": Q.shape[2]}
    want = tuple(sizes.get(dim, -1) for dim in fields[5])
    if value.shape != want:
        raise InputError(f"parameter {name!r} of score mod {mod.text} must have shape {want}, got {value.shape}")
    return np.ascontiguousarray(value, dtype=Q.dtype)


def mask_array(name: str, array: np.ndarray, nb: int, n_q: int, n_k: int) -> np.ndarray:
    """A mask's run-time array (1 or nb, n) checked against the problem and given one row per b."""
    rows, n = array.shape
    if rows not in (1, nb):
        raise InputError(f"mask array {name!r} has {rows} rows; give 1 or one per batch index b ({nb})")
    if name.startswith("doc") and not n == n_q == n_k:
        raise InputError(f"document mask: {n} ids for n_q={n_q} queries and n_k={n_k} keys; document masks are "
                         f"for self-attention with one id per position")
    if name == "kv_len" and (array.min() < 0 or array.max() > n_k):
        raise InputError(f"key_padding lengths must lie in 0..n_k={n_k}, got {array.ravel().tolist()}")
    return np.ascontiguousarray(np.broadcast_to(array, (nb, n)), dtype=np.int64)
