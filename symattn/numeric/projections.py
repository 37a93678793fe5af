"""The multi-head layer's projections as Numba kernels, so a whole layer forward runs in one thread pool.

NumPy's matmul runs on OpenBLAS's threads and the attention kernels on Numba's; each pool keeps spinning for a
while after its call and takes a core from the other (measured at (4,256,512), 8 heads, 2 cores: the same four
GEMMs and attention took 8.6 ms alone, 12-17 ms interleaved). Here every GEMM is an np.dot tile in a prange with
BLAS held to one thread (symattn.numeric.kernels.one_blas_thread), writing straight into the layout the next
step reads: heads (Z, G, n, d) for the attention kernels, rows (Z, n, d_model) for the output.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

_JIT = dict(cache=True, error_model="numpy", fastmath={"nsz", "arcp", "contract", "reassoc"})


@numba.njit(parallel=True, **_JIT)
def project_heads(X, W, b, out, bn):
    """out[z, g, i] = X[z, i] W[g] (+ b[g]): X (Z, n, d_model), W (G, d_model, d) one block of columns per head,
    b (G, d) or (0, d) for none, out (Z, G, n, d); one task per (z, g, block of bn rows)."""
    Z, n = X.shape[0], X.shape[1]
    G = W.shape[0]
    nb = (n + bn - 1) // bn
    for t in prange(Z * G * nb):
        z = t // (G * nb)
        g = (t // nb) % G
        i0 = (t % nb) * bn
        i1 = min(i0 + bn, n)
        rows = out[z, g, i0:i1]  # (rows, d), contiguous
        np.dot(X[z, i0:i1], W[g], rows)
        if b.shape[0] > 0:
            rows += b[g]


@numba.njit(parallel=True, **_JIT)
def merge_project(O, W, b, out, bn):
    """out[z, i] = Concat_g(O[z, g, i]) W (+ b): O (Z, G, n, d) the heads' outputs, W (G·d, d_model), b (d_model,)
    or (0,), out (Z, n, d_model); one task per (z, block of bn rows) gathers its rows of every head, then one GEMM."""
    Z, G, n, d = O.shape
    nb = (n + bn - 1) // bn
    for t in prange(Z * nb):
        z = t // nb
        i0 = (t % nb) * bn
        i1 = min(i0 + bn, n)
        C = np.empty((i1 - i0, G * d), dtype=O.dtype)  # (rows, G·d) = Concat(heads) of these rows
        for g in range(G):
            C[:, g * d:(g + 1) * d] = O[z, g, i0:i1]
        rows = out[z, i0:i1]
        np.dot(C, W, rows)
        if b.shape[0] > 0:
            rows += b


def head_blocks(W: np.ndarray, groups: int) -> np.ndarray:
    """W (d_model, G·d) -> (G, d_model, d): each head's block of columns, contiguous."""
    d_model, width = W.shape
    return np.ascontiguousarray(W.reshape(d_model, groups, width // groups).transpose(1, 0, 2))
