"""The cosine score s = tau·q̂·k̂ on the dot-product kernels (x̂ = x / max(‖x‖, ε), torch.nn.functional.normalize's
clamp): the forward normalises the rows once and runs dot-product attention with scale 1 on Qs = tau·Q̂ and K̂, so
the score mods and masks, tile skipping included, are the dot kernels'; the backward takes dQs and dK̂ from the dot
kernels and carries them through the norms. Each step is one parallel pass over the rows (fused, vectorised).
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import prange

#: torch.nn.functional.normalize's clamp of the norm (symattn.symbolic.score.NORM_EPS, read without SymPy)
NORM_EPS = 1e-12

_JIT = dict(cache=True, error_model="numpy", fastmath={"nsz", "arcp", "contract", "reassoc"})


@dataclass
class Normalized:
    """What the forward computed and the backward reads again (per stored row of Q and K)."""
    Qs: np.ndarray  # (Bq, n_q, d_k) tau·Q̂: the dot kernels' queries
    Qh: np.ndarray  # (Bq, n_q, d_k) Q̂
    NQ: np.ndarray  # (Bq, n_q) clamped norms max(‖q‖, ε)
    Kh: np.ndarray  # (Bk, n_k, d_k) K̂: the dot kernels' keys
    NK: np.ndarray  # (Bk, n_k)
    tau: np.floating


@numba.njit(parallel=True, **_JIT)
def _normalize(X, tau, Xh, Xs, N):
    """Every row x of X (B, n, d): N = max(‖x‖, ε), and Xh = x / N and Xs = tau·x / N where they are not empty."""
    B, n, d = X.shape
    eps = X.dtype.type(NORM_EPS)
    unit, scaled = Xh.shape[0] > 0, Xs.shape[0] > 0
    for t in prange(B * n):
        z, i = t // n, t % n
        total = X.dtype.type(0.0)
        for a in range(d):
            total += X[z, i, a] * X[z, i, a]
        norm = max(np.sqrt(total), eps)
        N[z, i] = norm
        inv = X.dtype.type(1.0) / norm
        if unit:
            for a in range(d):
                Xh[z, i, a] = X[z, i, a] * inv
        if scaled:
            for a in range(d):
                Xs[z, i, a] = tau * (X[z, i, a] * inv)


def normalized(Q: np.ndarray, K: np.ndarray, tau, backward: bool = True) -> Normalized:
    """The forward's normalised rows (tau a scalar of Q's dtype); Q̂ only where a backward will read it."""
    none = np.empty((0, 0, 0), Q.dtype)
    Qh, Qs, Kh = np.empty_like(Q) if backward else none, np.empty_like(Q), np.empty_like(K)
    NQ, NK = np.empty(Q.shape[:2], Q.dtype), np.empty(K.shape[:2], K.dtype)
    _normalize(Q, tau, Qh, Qs, NQ)
    _normalize(K, tau, Kh, none, NK)
    return Normalized(Qs, Qh, NQ, Kh, NK, tau)


@numba.njit(parallel=True, **_JIT)
def _through_norm(Xh, N, rows, coef, dXh, along):
    """In place, dXh[z] (B, n, d) -> dx of x̂ = x / max(‖x‖, ε) given dx̂ = coef·dXh[z], with x̂ = Xh[rows[z]] and
    the clamped norms N[rows[z]] (n,): (dx̂ − x̂ (x̂·dx̂)) / ‖x‖ where the norm exceeds ε, dx̂ / ε where the clamp
    holds (its derivative is 0, as torch's clamp_min). along (B, n) receives x̂·dXh of every row."""
    B, n, d = dXh.shape
    zero, eps = Xh.dtype.type(0.0), Xh.dtype.type(NORM_EPS)  # eps as _normalize clamped
    for t in prange(B * n):
        z, i = t // n, t % n
        r = rows[z]
        dot = zero
        for a in range(d):
            dot += Xh[r, i, a] * dXh[z, i, a]
        along[z, i] = dot
        inv = coef / N[r, i]
        radial = dot if N[r, i] > eps else zero  # the clamp holds: no gradient along x̂
        for a in range(d):
            dXh[z, i, a] = (dXh[z, i, a] - Xh[r, i, a] * radial) * inv


def pull_back(c: Normalized, batch: np.ndarray, dQ: np.ndarray, dK: np.ndarray) -> np.ndarray:
    """In place: the dot kernels' dQs (B, n_q, d_k) and dK̂ (B, n_k, d_k) -> dq and dk; returns dtau (1,) =
    Σ q̂·dQs over every row, summed in a fixed order (deterministic whatever the threads)."""
    along = np.empty(dQ.shape[:2], dQ.dtype)
    _through_norm(c.Qh, c.NQ, batch[:, 0], c.tau, dQ, along)
    dtau = along.astype(np.float64).sum()
    _through_norm(c.Kh, c.NK, batch[:, 1], dK.dtype.type(1.0), dK, np.empty(dK.shape[:2], dK.dtype))
    return np.array([dtau], dtype=dQ.dtype)
