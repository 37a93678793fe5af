"""Attention variants in the numeric API: the score, its parameters θ, a score mod and an index mask, validated
up front, then run on kernels generated from the variant's derivation.

Dot-product variants run on the dot family's BLAS-tile kernels (kernels.variant_forward / variant_backward), and
so does the cosine score (numeric/cosine.py: rows normalised, tau folded into the queries); the general and
additive scores go to the generic element kernels (symattn/codegen/element.py). Either kind is one module per
variant, rendered on first use into kernels.cache_dir() and imported only when its content hash holds. Loading a
cached module needs no SymPy.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from . import cosine, kernel_cache, kernels
from ..errors import InputError, SpecError

#: Batch elements x scores below which the serial kernels run (no thread start).
PARALLEL_WORK = 1 << 15
#: Query rows per block of the element kernels (P, dP and the pair sums of T rows at a time).
ROWS = 64


@dataclass(frozen=True)
class Variant:
    """A validated variant: the score's name, its mod (a ScoreMod or None), its mask (a Mask or None: is_causal
    folded in) and θ (API name -> array, checked against the kernel's parameters by `bind`)."""

    score: str
    mod: object
    mask: object
    params: dict


def _scores() -> tuple[str, ...]:
    from ..symbolic.spec import SCORES  # names only: no SymPy
    return SCORES


def _unscaled() -> tuple[str, ...]:
    from ..symbolic.spec import UNSCALED
    return UNSCALED


def resolve(score, params, score_mod, mask_mod, causal: bool, scale) -> Variant | None:
    """The variant of the API's options, or None for plain dot-product attention (today's kernels). Names,
    types and the params dict's form are checked here; the arrays' shapes by `bind`."""
    if not isinstance(score, str) or score not in _scores():
        raise InputError(f"score must be one of {', '.join(map(repr, _scores()))}, got {score!r}")
    if scale is not None and score in _unscaled():
        raise InputError(f"scale does not apply to score={score!r} (it has no scale); leave scale=None")
    from ..symbolic.masks import and_masks, causal as causal_mask, mask_of  # no SymPy until a mask_mod is traced
    from ..symbolic.mods import mod_of
    try:
        mod = mod_of(score_mod)
    except SpecError as e:
        raise InputError(f"score_mod: {e}") from None
    try:
        mask = None if mask_mod is None else mask_of(mask_mod)
    except SpecError as e:
        raise InputError(f"mask_mod: {e}") from None
    if causal:
        mask = causal_mask if mask is None else and_masks(causal_mask, mask)
    if params is not None and not isinstance(params, dict):
        raise InputError(f"params must be a dict of arrays keyed by parameter name, got {type(params).__name__}")
    if score == "dot" and mod is None and mask_mod is None and not params:
        return None  # plain dot product (is_causal is the plain kernels' own flag)
    return Variant(score, mod, mask, dict(params or {}))


def prepare(score, params, score_mod, mask_mod, causal: bool, scale, batch_shape: tuple[int, ...], dtype, d_k: int,
            sizes: tuple[int, int] | None = None) -> tuple[Variant | None, dict]:
    """The variant of the options and θ bound to its kernels ((None, {}) for plain dot-product attention), every
    check done before any work: names, heads, parameters, and with `sizes` = (n_q, n_k) the mask's run-time
    arrays and a user mod's table reads."""
    variant = resolve(score, params, score_mod, mask_mod, causal, scale)
    if variant is None:
        return None, {}
    check_heads(variant, batch_shape)
    if sizes is not None:
        nb, heads = b_h_counts(batch_shape)
        for name, array in (variant.mask.arrays if variant.mask is not None else ()):
            kernels.mask_array(name, array, nb, *sizes)
        if getattr(variant.mod, "kind", "") == "user" and variant.mod.trace.tables:
            _table_reads(variant.mod.trace, nb, heads, *sizes)
    return variant, bind(variant, declared(variant), dtype, d_k)


def b_h_counts(batch_shape: tuple[int, ...]) -> tuple[int, int]:
    """How many FlexAttention batch indices b and heads h the batch shape holds (see bh_rows)."""
    if len(batch_shape) >= 2:
        return math.prod(batch_shape[:-1]), batch_shape[-1]
    return math.prod(batch_shape), 1


def check_heads(variant: Variant, batch_shape: tuple[int, ...]) -> None:
    """A per-head mod (alibi(heads=H)) reads h: q, k, v must be (..., H, n, d), as in FlexAttention."""
    heads = getattr(variant.mod, "heads", 0) if variant.mod is not None else 0
    if heads and (len(batch_shape) < 2 or batch_shape[-1] != heads):
        raise InputError(f"score_mod {variant.mod.text!r} has one slope per head: q, k, v must have shape "
                         f"(B, {heads}, n, d) (heads in dim -3), got batch dims {batch_shape}")


def check_layer_heads(score_mod, heads: int) -> None:
    """A per-head mod given to the layer has one slope per layer head (symbolic.mods.check_heads)."""
    from ..symbolic.mods import ScoreMod, check_heads, mod_of
    if not isinstance(score_mod, (str, ScoreMod)):
        return  # a user's function (traced later, by symattn.attention) has no slope per head
    try:
        mod = mod_of(score_mod)
    except SpecError as e:
        raise InputError(f"score_mod: {e}") from None
    try:
        check_heads(mod, heads, f"score_mod {getattr(mod, 'text', '')!r}", "alibi(heads={heads})")
    except SpecError as e:
        raise InputError(str(e)) from None


@functools.lru_cache(maxsize=64)
def _table_reads(trace, nb: int, heads: int, n_q: int, n_k: int) -> None:
    """A user's mod reads every table entry it indexes inside the table, at every (b, h, q_idx, kv_idx) of the
    call, masked or not (the reference's check): the kernels read and scatter entries unchecked, so an index
    outside would read and write memory that is not the table. Checked once per mod and sizes, each index on the
    coordinates it uses (kv_idx - q_idx: an n_q x n_k grid), q_idx in chunks of about 2^20 entries of the full
    grid; the trace already made every index a whole number of b, h, q_idx, kv_idx."""
    if not nb * heads * n_q * n_k:
        return  # no score, no read
    _, _, leaves = trace.numpy()
    shapes = {t.name: t.shape for t in trace.tables}
    b, h = np.arange(nb).reshape(-1, 1, 1, 1), np.arange(heads).reshape(1, -1, 1, 1)  # (nb, 1, 1, 1), (1, H, 1, 1)
    kv = np.arange(n_k).reshape(1, 1, 1, -1)  # (1, 1, 1, n_k)
    step = max(1, (1 << 20) // (nb * heads * n_k))
    for q0 in range(0, n_q, step):
        q = np.arange(q0, min(q0 + step, n_q)).reshape(1, 1, -1, 1)  # (1, 1, rows, 1)
        for name, index_fns, _ in leaves:
            index = [np.asarray(f(b, h, q, kv)) for f in index_fns]  # each broadcast over what it reads
            outside = np.zeros((), dtype=bool)
            for ix, n in zip(index, shapes[name]):
                outside = outside | (ix < 0) | (ix >= n)
            if outside.any():
                grid = (nb, heads, q.shape[2], n_k)
                at = np.unravel_index(int(np.argmax(np.broadcast_to(outside, grid))), grid)
                read = ", ".join(str(int(np.broadcast_to(ix, grid)[at])) for ix in index)
                raise InputError(f"score_mod reads {name}[{read}] at b={at[0]}, h={at[1]}, q_idx={q0 + at[2]}, "
                                 f"kv_idx={at[3]}, outside its shape {shapes[name]}; clip the index "
                                 f"(ops.minimum/ops.maximum, as relative_bias does) or declare a larger table")


@functools.lru_cache(maxsize=32)
def bh_rows(batch_shape: tuple[int, ...]) -> np.ndarray:
    """FlexAttention's (b, h) of every flattened batch element (B, 2): (Bn, H) -> (z // H, z % H),
    (Bn,) -> (z, 0), () -> (0, 0). Built once per batch shape and shared: callers and kernels only read it."""
    B = math.prod(batch_shape)
    z = np.arange(B, dtype=np.int64)
    if len(batch_shape) >= 2:
        return np.ascontiguousarray(np.stack([z // batch_shape[-1], z % batch_shape[-1]], axis=1))
    return np.ascontiguousarray(np.stack([z, np.zeros_like(z)], axis=1))


def bind(variant: Variant, declared: tuple, dtype, d_k: int) -> dict[str, np.ndarray]:
    """θ as C-contiguous arrays keyed by API name, checked against `declared` ((name, tensor, dims) of the
    kernel): every name present, no other, each of the expected shape (d_k from q; other sizes from the mod or
    from the first array that has them) and of q's dtype."""
    names = [name for name, _, _ in declared]
    given = variant.params
    missing, extra = [n for n in names if n not in given], sorted(set(given) - set(names), key=str)
    what = f"score={variant.score!r}" + ("" if variant.mod is None else f" with score_mod {variant.mod.text!r}")
    if missing or extra:
        expected = ", ".join(f"{n} {_shape_text(dims)}" for n, _, dims in declared) or "none"
        problem = (f"missing {', '.join(map(repr, missing))}" if missing else "") + \
                  ("; " if missing and extra else "") + (f"unexpected {', '.join(map(repr, extra))}" if extra else "")
        raise InputError(f"params for {what}: {problem}; expected {expected}")
    sizes = {"d_k": d_k, "one": 1, **dict(variant.mod.sizes if variant.mod is not None else ())}
    bound = {}
    for name, _, dims in declared:
        x = np.asarray(given[name])
        if dims == ("one",) and x.shape == ():  # a scalar parameter (cosine's tau) may be given as one
            x = x.reshape(1)
        if x.ndim == len(dims):
            for dim, n in zip(dims, x.shape):
                sizes.setdefault(dim, n)
        want = tuple(sizes.get(dim, -1) for dim in dims)
        if x.shape != want or any(n <= 0 for n in want):
            raise InputError(f"params[{name!r}] must have shape {_shape_text(dims)} = {want}, got {x.shape}")
        if x.dtype != dtype:
            raise InputError(f"params[{name!r}] must have the dtype of q, k, v ({dtype}), got {x.dtype}")
        bound[name] = np.ascontiguousarray(x)
    return bound


def _shape_text(dims) -> str:
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


# -- the generic element kernels -------------------------------------------------------------------------------

_MODULES: dict[str, object] = {}


def load(score: str, mod, mask, progress=None):
    """The element-kernel module of (score, mod, mask), generated into kernels.cache_dir() if missing or
    damaged (regenerated once if it fails to load, then SymattnError naming it)."""
    name = kernel_cache.element_name(score, mod, mask)
    if name in _MODULES:
        return _MODULES[name]
    folder = kernels.cache_dir()
    module = kernel_cache.load_generated(
        folder / f"{name}.py", f"symattn_generated_{name}", lambda: _generate(score, mod, mask, folder, name),
        ("forward", "forward_parallel", "backward", "backward_parallel", "PARAMS", "MASK_ARRAYS"), progress)
    _MODULES[name] = module
    return module


def _generate(score, mod, mask, folder: Path, name: str) -> None:
    from ..codegen.element import write  # SymPy: only when a kernel must be written
    write(score, mod, mask, folder, name)


def _mask_arrays(module, mask, bh: np.ndarray, n_q: int, n_k: int) -> list[np.ndarray]:
    """The run-time mask arrays the kernel takes, in its order, each (nb, n) int64: one row per FlexAttention
    batch index b (heads share it), as the kernels read row bh[z, 0] (kernels.mask_array checks and broadcasts)."""
    arrays = dict(getattr(mask, "arrays", ()) or ())
    nb = int(bh[:, 0].max()) + 1 if bh.shape[0] else 1
    return [kernels.mask_array(name, arrays[name], nb, n_q, n_k) for name in module.MASK_ARRAYS]


def _parallel(B: int, n_q: int, n_k: int) -> bool:
    return B > 1 and numba.get_num_threads() > 1 and B * n_q * n_k >= PARALLEL_WORK


def _blas(parallel: bool):
    """BLAS held to one thread while prange tasks call it on their blocks (kernels.one_blas_thread)."""
    return kernels.one_blas_thread if parallel else contextlib.nullcontext()


def variant_forward(score, Q, K, V, bias, batch, bh, scale, code, mod, mask, params, O, LSE) -> None:
    """Write O (B, n_q, d_v) and LSE (B, n_q) with the generic element kernels (the shared interface, with the
    score first); `params` API name -> array, as `bind` returns."""
    module = load(score, mod, mask)
    B = batch.shape[0]
    parallel = _parallel(B, Q.shape[1], K.shape[1])
    with _blas(parallel):
        (module.forward_parallel if parallel else module.forward)(
            Q, K, V, bias, batch, bh, scale, code, O, LSE, ROWS, *(params[n] for n, _, _ in module.PARAMS),
            *_mask_arrays(module, mask, bh, Q.shape[1], K.shape[1]))


def variant_backward(score, Q, K, V, bias, batch, bh, scale, code, mod, mask, params, O, LSE, dO, dQ, dK,
                     dV) -> dict:
    """Write dQ, dK, dV; return {θ name: gradient (θ's shape)}: one partial per batch element, summed in order."""
    module = load(score, mod, mask)
    B = batch.shape[0]
    theta = [params[n] for n, _, _ in module.PARAMS]
    partials = [np.empty((B,) + x.shape, dtype=Q.dtype) for x in theta]
    parallel = _parallel(B, Q.shape[1], K.shape[1])
    with _blas(parallel):
        (module.backward_parallel if parallel else module.backward)(
            Q, K, V, bias, batch, bh, scale, code, O, LSE, dO, dQ, dK, dV, ROWS, *theta, *partials,
            *_mask_arrays(module, mask, bh, Q.shape[1], K.shape[1]))
    return {n: _ordered_sum(g) for (n, _, _), g in zip(module.PARAMS, partials)}


def _ordered_sum(g: np.ndarray) -> np.ndarray:
    """Σ over the leading (batch) axis, element 0 first: a fixed order, whatever the threads did."""
    total = g[0].copy()
    for z in range(1, g.shape[0]):
        total += g[z]
    return total


def declared(variant: Variant) -> tuple:
    """(API name, kernel name, dims) of the variant's parameters: the mod's from the ScoreMod (no SymPy), the
    score's from its kernel module (the dot product has none)."""
    mod = tuple((f[0], f[1], tuple(f[5])) for f in variant.mod.declared) if variant.mod is not None else ()
    if variant.score == "cosine":  # runs on the dot kernels (see _cosine): tau, then the mod's
        return (("tau", "tau", ("one",)),) + mod
    return mod if variant.score == "dot" else load(variant.score, variant.mod, variant.mask).PARAMS


def forward(variant: Variant, p, params: dict, backward: bool = True):
    """O (B, n_q, d_v), LSE (B, n_q) and what the backward reads again (the cosine score's normalised rows, else
    None) of a prepared problem (api._Problem); backward=False: no backward will follow."""
    B, n_q, d_v = p.batch.shape[0], p.Q.shape[1], p.V.shape[2]
    O, LSE = np.empty((B, n_q, d_v), dtype=p.Q.dtype), np.empty((B, n_q), dtype=p.Q.dtype)
    saved = cosine.normalized(p.Q, p.K, params["tau"][0], backward) if variant.score == "cosine" else None
    Q, K, scale = (saved.Qs, saved.Kh, 1.0) if saved is not None else (p.Q, p.K, p.scale)  # (tau q̂)·k̂
    args = (Q, K, p.V, p.bias, p.batch, bh_rows(p.batch_shape), scale, kernels.MASKED_ROWS[p.masked_rows],
            variant.mod, variant.mask, params, O, LSE)
    if variant.score in ("dot", "cosine"):
        kernels.variant_forward(*args)
    else:
        variant_forward(variant.score, *args)
    return O, LSE, saved


def backward(variant: Variant, p, params: dict, O, LSE, dO, saved=None):
    """(dQ, dK, dV, {θ name: gradient}) of a prepared problem from the forward's O, LSE and saved rows."""
    B = p.batch.shape[0]
    dQ = np.empty((B,) + p.Q.shape[1:], dtype=p.Q.dtype)
    dK = np.empty((B,) + p.K.shape[1:], dtype=p.Q.dtype)
    dV = np.empty((B,) + p.V.shape[1:], dtype=p.Q.dtype)
    if variant.score == "cosine" and saved is None:
        saved = cosine.normalized(p.Q, p.K, params["tau"][0])
    Q, K, scale = (saved.Qs, saved.Kh, 1.0) if saved is not None else (p.Q, p.K, p.scale)
    args = (Q, K, p.V, p.bias, p.batch, bh_rows(p.batch_shape), scale, kernels.MASKED_ROWS[p.masked_rows],
            variant.mod, variant.mask, params, O, LSE, dO, dQ, dK, dV)
    if variant.score not in ("dot", "cosine"):
        return dQ, dK, dV, variant_backward(variant.score, *args)
    grads = kernels.variant_backward(*args)
    if saved is not None:  # the dot kernels gave dQs and dK̂: through the norms, in place
        grads["tau"] = cosine.pull_back(saved, p.batch, dQ, dK)
    return dQ, dK, dV, grads
