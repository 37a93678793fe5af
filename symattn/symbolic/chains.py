"""Chain-rule lines of the backward steps: how each gradient formula follows, as a textbook writes it.

    dS_ij = Σ_l dP_il ∂P_il/∂S_ij = Σ_l dP_il P_il (δ_lj − P_ij) = P_ij (dP_ij − Σ_l P_il dP_il) = P_ij (dP_ij − D_i)
    D_i = Σ_l P_il dP_il = Σ_l P_il Σ_b dO_ib V_lb = Σ_b dO_ib Σ_l P_il V_lb = Σ_b dO_ib O_ib
    dQ_ia = Σ_j dS_ij ∂S_ij/∂Q_ia = (the derived formula), likewise dK and every dθ

Each chain is a tuple of SymPy expressions read `lhs = c_1 = c_2 = ...`; its last member is the step's indexed
right-hand side, so a printed chain ends where the step's formula begins. Also the matrix forms that need
symbols of their own: the softmax Jacobian of one row, diag(p_i) − p_i p_iᵀ, and the mask matrix M.
"""
from __future__ import annotations

import sympy
from sympy.matrices.expressions import DiagMatrix

from .tensors import SIZES, TENSORS, b, i, j, l

#: The mask as an additive matrix: M_ij = 0 where key j is visible to query i, −∞ where it is masked.
MASK = sympy.MatrixSymbol("M", SIZES["n_q"], SIZES["n_k"])
#: A column of n_k ones (D 1ᵀ repeats D_i along row i).
ONE = sympy.MatrixSymbol("1", SIZES["n_k"], 1)


def jacobian_matrix() -> sympy.Eq:
    """J^(i) = diag(p_i) − p_i p_iᵀ: the Jacobian ∂p_i/∂s_i of row i's softmax (p_i a column of n_k weights)."""
    p = sympy.MatrixSymbol("p_i", SIZES["n_k"], 1)
    J = sympy.MatrixSymbol("J^(i)", SIZES["n_k"], SIZES["n_k"])
    return sympy.Eq(J, sympy.MatAdd(DiagMatrix(p), -p * p.T, evaluate=False), evaluate=False)


def dS_matrix() -> sympy.Eq:
    """dS = P ∘ (dP − D 1ᵀ), 1 a column of n_k ones."""
    M = {n: TENSORS[n].matrix_symbol() for n in ("P", "dP", "D", "dS")}
    return sympy.Eq(M["dS"], sympy.HadamardProduct(M["P"], sympy.MatAdd(M["dP"], -M["D"] * ONE.T, evaluate=False),
                                                   evaluate=False), evaluate=False)


def dS_chain(rhs: sympy.Expr) -> tuple:
    B = {n: TENSORS[n].base for n in ("P", "dP", "S", "D")}
    nk = SIZES["n_k"]
    P, dP = B["P"], B["dP"]
    return (sympy.Sum(dP[i, l] * sympy.Derivative(P[i, l], B["S"][i, j]), (l, 0, nk - 1)),
            sympy.Sum(dP[i, l] * P[i, l] * (sympy.KroneckerDelta(l, j) - P[i, j]), (l, 0, nk - 1)),
            P[i, j] * (dP[i, j] - sympy.Sum(P[i, l] * dP[i, l], (l, 0, nk - 1))),
            rhs)


def D_chain(rhs: sympy.Expr) -> tuple:
    B = {n: TENSORS[n].base for n in ("P", "dP", "dO", "V")}
    nk, dv = SIZES["n_k"], SIZES["d_v"]
    return (sympy.Sum(B["P"][i, l] * B["dP"][i, l], (l, 0, nk - 1)),
            sympy.Sum(B["P"][i, l] * sympy.Sum(B["dO"][i, b] * B["V"][l, b], (b, 0, dv - 1)), (l, 0, nk - 1)),
            sympy.Sum(B["dO"][i, b] * sympy.Sum(B["P"][i, l] * B["V"][l, b], (l, 0, nk - 1)), (b, 0, dv - 1)),
            rhs)


def gradient_chain(score_tensor: str, upstream: str, wrt: sympy.Indexed, over: tuple, rhs: sympy.Expr) -> tuple:
    """d(wrt) = Σ_over d(score)_ij ∂(score)_ij/∂(wrt), then the derived formula."""
    B = {n: TENSORS[n].base for n in (score_tensor, upstream)}
    S, dS = B[score_tensor][i, j], B[upstream][i, j]
    return (sympy.Sum(dS * sympy.Derivative(S, wrt), *over), rhs)


def chains(rows: dict, score_keys: set, mod_keys: set, modded: bool) -> dict:
    """key -> chain for the backward steps in `rows` (key -> (tensor, indices, rhs)): dS and D, the score's
    gradients (`score_keys`: dQ, dK, dθ through S, or through S̄ when a score mod follows the score) and the
    score mod's parameter gradients (`mod_keys`: through the modded S)."""
    nq, nk = SIZES["n_q"], SIZES["n_k"]
    out = {}
    if "dS" in rows:
        out["dS"] = dS_chain(rows["dS"][2])
    if "D" in rows:
        out["D"] = D_chain(rows["D"][2])
    for key, (tensor, indices, rhs) in rows.items():
        if key not in score_keys | mod_keys:
            continue
        through = ("Sr", "dSr") if modded and key in score_keys else ("S", "dS")
        over = ((j, 0, nk - 1),) if key == "dQ" else ((i, 0, nq - 1),) if key == "dK" else \
            ((i, 0, nq - 1), (j, 0, nk - 1))
        out[key] = gradient_chain(*through, TENSORS[tensor[1:]].base[indices], over, rhs)
    return out
