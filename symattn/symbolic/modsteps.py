"""The score mod's steps: S_ij = f(S̄_ij, i, j; θ) forward, dS̄ = dS ∂f/∂s and dθ = Σ dS ∂f/∂θ backward, each
derivative by SymPy (FlexAttention's score_mod, applied to any score)."""
from __future__ import annotations

import sympy

from .score import derivative
from .spec import AttentionSpec
from .tensors import BATCH, HEAD, SIZES, TENSORS, i, j


def mod_slope(mod, s_bar, x, y, theta, h=0, b=0) -> sympy.Expr:
    """∂f/∂s of a score mod at s = s̄, by sympy.diff (batch element b and head h: 0 in explicit forms, BATCH and
    HEAD in indexed ones)."""
    sigma = sympy.Symbol("sigma", real=True)
    return derivative(mod.formula(sigma, b, h, x, y, theta), sigma).subs(sigma, s_bar)


def mod_theta(spec: AttentionSpec) -> dict:
    return {p.name: (lambda *ix, t=p.tensor: TENSORS[t].base[ix]) for p in spec.mod_object.params}


def mod_rows(spec: AttentionSpec) -> list[tuple]:
    """The score mod's forward step: S_ij = f(S̄_ij, i, j; θ)."""
    mod = spec.mod_object
    if mod is None:
        return []
    return [("mod", "forward", "S", (i, j), f"Score mod: {mod.text}", f"Each score is modified by {mod.description} "
             f"(FlexAttention's score_mod(score, b, h, q_idx, kv_idx)): $S_{{ij}} = f(\\bar{{S}}_{{ij}})$.",
             mod.formula(TENSORS["Sr"].base[i, j], BATCH, HEAD, i, j, mod_theta(spec)), None)]


def mod_gradient_rows(spec: AttentionSpec) -> list[tuple]:
    """dS̄_ij = dS_ij ∂f/∂s at s = S̄_ij, the derivative by SymPy."""
    mod = spec.mod_object
    if mod is None:
        return []
    slope = mod_slope(mod, TENSORS["Sr"].base[i, j], i, j, mod_theta(spec), HEAD, BATCH)
    return [("dSr", "backward", "dSr", (i, j), "Gradient through the score mod",
             r"The score mod is applied element by element: $\mathrm{d}\bar{S}_{ij} = \mathrm{d}S_{ij}\, "
             r"\partial f / \partial s$ at $s = \bar{S}_{ij}$ (the derivative by SymPy).",
             TENSORS["dS"].base[i, j] * slope, None)]


def mod_param_rows(spec: AttentionSpec) -> list[tuple]:
    """dθ of the score mod's parameters: Σ_ij dS_ij ∂f_ij/∂θ."""
    if spec.mod_object is None:
        return []
    nq, nk = SIZES["n_q"], SIZES["n_k"]
    f = spec.mod_object.formula(TENSORS["Sr"].base[i, j], BATCH, HEAD, i, j, mod_theta(spec))
    return [(f"d{p.tensor}", "backward", f"d{p.tensor}", TENSORS[p.tensor].indices(), f"Gradient of the parameter "
             f"${p.latex}$", f"${p.latex}$ enters the modified scores: $\\mathrm{{d}}{p.latex} = \\sum_{{i,j}} "
             f"\\mathrm{{d}}S_{{ij}}\\, \\partial f_{{ij}} / \\partial {p.latex}$.",
             sympy.Sum(TENSORS["dS"].base[i, j] * derivative(f, TENSORS[p.tensor].base[TENSORS[p.tensor].indices()]),
                       (i, 0, nq - 1), (j, 0, nk - 1)), None) for p in spec.mod_object.params]
