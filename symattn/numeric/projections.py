"""The multi-head layer's projections as Numba kernels, so a whole layer, forward and backward, runs in one thread
pool (numeric/one_pool.py).

NumPy's matmul runs on OpenBLAS's threads and the attention kernels on Numba's; each pool keeps spinning for a
while after its call and takes a core from the other (measured at (4,256,512), 8 heads, 2 cores: the same four
GEMMs and attention took 8.6 ms alone, 12-17 ms interleaved). Here every GEMM is an np.dot tile in a prange with
BLAS held to one thread (symattn.numeric.kernels.one_blas_thread), writing straight into the layout the next
step reads: heads (Z, G, n, d) for the attention kernels, rows (Z, n, d_model) for the output (and for dx), and
per-head weight-gradient blocks summed over the batch in a fixed order.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

_JIT = dict(cache=True, error_model="numpy", fastmath={"nsz", "arcp", "contract", "reassoc"})


@numba.njit(parallel=True, **_JIT)
def project_heads(X, W, b, outs, groups, bn):
    """Every output's heads from one GEMM per task: X (Z, n, d_model); W (d_model, G·width) each key/value group's
    columns packed side by side (`group_blocks`); b (G·width,) or (0,) for none; outs a tuple of (Z, G·c, n, d)
    arrays whose c heads per group fill a group's width in order (Σ c·d = width): Q, K, V of every head from one
    product X[z, rows] W. One task per (z, block of bn rows); one wide product beat one per group by 6-9%."""
    Z, n = X.shape[0], X.shape[1]
    width = W.shape[1] // groups
    nb = (n + bn - 1) // bn
    for t in prange(Z * nb):
        z = t // nb
        i0 = (t % nb) * bn
        i1 = min(i0 + bn, n)
        T = np.empty((i1 - i0, W.shape[1]), dtype=X.dtype)  # (rows, G·width)
        np.dot(X[z, i0:i1], W, T)
        if b.shape[0] > 0:
            T += b
        for g in range(groups):
            at = g * width
            for A in outs:
                c, d = A.shape[1] // groups, A.shape[3]
                for r in range(c):
                    A[z, g * c + r, i0:i1] = T[:, at:at + d]
                    at += d


@numba.njit(parallel=True, **_JIT)
def merge_project(heads, W, b, out, bn, add):
    """out[z, i] (+)= Concat(every head of every array in `heads`, rows i) W (+ b): heads a tuple of (Z, h, n, d)
    arrays, W (Σ h·d, d_model) with rows in the same order, b (d_model,) or (0,), out (Z, n, d_model), added to
    where `add`. One task per (z, block of bn rows) gathers its rows of every head, then one GEMM."""
    Z, n = out.shape[0], out.shape[1]
    nb = (n + bn - 1) // bn
    for t in prange(Z * nb):
        z = t // nb
        i0 = (t % nb) * bn
        i1 = min(i0 + bn, n)
        C = np.empty((i1 - i0, W.shape[0]), dtype=W.dtype)  # (rows, Σ h·d) = Concat(heads) of these rows
        at = 0
        for A in heads:
            d = A.shape[3]
            for h in range(A.shape[1]):
                C[:, at:at + d] = A[z, h, i0:i1]
                at += d
        rows = out[z, i0:i1]
        if add:
            rows += np.dot(C, W)
        else:
            np.dot(C, W, rows)
        if b.shape[0] > 0:
            rows += b


def row_block(Z: int, n: int, threads: int) -> int:
    """Rows per task of project_heads and merge_project: the largest of 256, 128, 64 that still gives every thread
    two tasks (one core's GEMM of 256 rows ran 7-10% faster than of 128 at (4,256,512), 8 heads)."""
    for bn in (256, 128):
        if Z * -(-n // bn) >= 2 * threads:
            return bn
    return 64


#: Parts the batch sum of a head's weight gradient is split into (fixed, so this sum's order does not depend on
#: the number of threads; row_block does, so another thread count may move float32 gradients in the last bits):
#: enough tasks for 8 threads with a single head.
PARTS = 8


@numba.njit(parallel=True, **_JIT)
def head_grads(A, D):
    """Σ_z A[z]ᵀ D[z, g] for every g: A (Z, n, m), D (Z, G, n, d) -> (G, m, d). One task per (g, part of the batch
    elements); the parts' partial sums are then added in order, so the result is deterministic."""
    Z, G, d, m = A.shape[0], D.shape[1], D.shape[3], A.shape[2]
    P = min(Z, max(1, PARTS // G))
    partial = np.zeros((G, P, m, d), dtype=A.dtype)
    for t in prange(G * P):
        g, p = t // P, t % P
        tmp = np.empty((m, d), dtype=A.dtype)
        for z in range(p * Z // P, (p + 1) * Z // P):
            np.dot(A[z].T, D[z, g], tmp)
            partial[g, p] += tmp
    out = np.empty((G, m, d), dtype=A.dtype)
    for g in prange(G):
        out[g] = partial[g, 0]
        for p in range(1, P):
            out[g] += partial[g, p]
    return out


def group_blocks(weights, groups: int) -> np.ndarray:
    """Weights (d_model, G·c·d) each -> (d_model, G·width): for every key/value group g, the columns of its heads
    in every weight, in order (Q's R heads, then K's and V's one), groups side by side: `project_heads`'s W."""
    d_model = weights[0].shape[0]
    return np.concatenate([W.reshape(d_model, groups, -1) for W in weights], axis=2).reshape(d_model, -1)


def group_biases(biases, widths, groups: int, dtype) -> np.ndarray:
    """Biases (G·c·d,) or None, of weights `widths` columns wide -> (G·width,) packed as `group_blocks` packs the
    columns (zeros for a None among given ones), or (0,) when none is given."""
    if all(b is None for b in biases):
        return np.zeros(0, dtype)
    parts = [np.zeros((groups, w // groups), dtype) if b is None else np.reshape(b, (groups, -1))
             for b, w in zip(biases, widths)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=dtype).reshape(-1)
