"""`symattn bench`'s variant rows (issue 8's speed goals), measured in the same run as the plain rows.

- dot + ALiBi, dot + soft-cap and a sliding window (128) against plain dot-product attention at the same size,
  forward and forward+backward (target: within 1.3x of plain dot time);
- ALiBi (per-head slopes) + causal forward at (B 1, H 8, n 1024, d 64) against FlexAttention compiled by
  torch.compile, steady state, its compile time reported beside (target: >= 1.0x);
- the additive (d_a 64) and cosine scores, forward+backward, against PyTorch eager autograd of the same formula
  (target: >= 3x).
"""
from __future__ import annotations

import time as clock

import numpy as np

from ..numeric.api import attention, attention_vjp
from ..progress import Progress, silent

ME = "symattn"
PLAIN = "plain dot"
MOD_CASES = ((8, 256, 64), (8, 1024, 64))
SCORE_CASE = (8, 256, 64)
FLEX_CASE = (1, 8, 1024, 64)  # (B, H, n, d)
VARIANTS = {"dot + alibi": dict(score_mod="alibi"), "dot + softcap:30": dict(score_mod="softcap:30"),
            "window:128": dict(mask_mod="window:128")}


def _pair(q, k, v, dO, **options):
    """(forward, forward+backward) closures of symattn with the variant's options."""
    def vjp():
        O, pullback = attention_vjp(q, k, v, **options)
        return O, pullback(dO)
    return (lambda: attention(q, k, v, **options)), vjp


def _once(measure):
    return measure()


def mod_rows(cases, time, Row, progress: Progress = silent, rounds=_once) -> list:
    """Each mod/mask variant timed beside plain dot-product attention at the same size and inputs (in turn, each
    time the best of `rounds`)."""
    rows = []
    for batch, n, d in cases:
        rng = np.random.default_rng(0)
        q, k, v, dO = (rng.standard_normal((batch, n, d)).astype(np.float32) for _ in range(4))
        progress(f"bench variants {', '.join(VARIANTS)} ({batch}, {n}, {d})")
        pairs = {PLAIN: _pair(q, k, v, dO)} | {name: _pair(q, k, v, dO, **o) for name, o in VARIANTS.items()}
        found = rounds(lambda: {name: [time(f) for f in pair] for name, pair in pairs.items()})
        for name in VARIANTS:
            for m, mode in enumerate(("forward", "forward+backward")):
                rows.append(Row(batch, n, d, "float32", f"variant {name} {mode}",
                                {ME: found[name][m], PLAIN: found[PLAIN][m]}))
    return rows


def _torch_scores(name: str, theta: dict):
    """PyTorch eager formula of a score: f(q, k) -> S (B, n_q, n_k)."""
    import torch
    if name == "additive":
        W, U, va, ba = (theta[p] for p in ("W_a", "U_a", "v_a", "b_a"))
        return lambda q, k: torch.tanh((q @ W)[:, :, None, :] + (k @ U)[:, None, :, :] + ba) @ va
    F = torch.nn.functional
    return lambda q, k: theta["tau"] * (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2))


def _params(name: str, d: int, rng) -> dict[str, np.ndarray]:
    if name == "additive":
        h = 64
        return {"W_a": rng.standard_normal((d, h)) / np.sqrt(d), "U_a": rng.standard_normal((d, h)) / np.sqrt(d),
                "v_a": rng.standard_normal(h) / np.sqrt(h), "b_a": 0.1 * rng.standard_normal(h)}
    return {"tau": np.array(10.0)}


def score_rows(time, Row, progress: Progress = silent, rounds=_once) -> list:
    """Additive and cosine scores, forward+backward (every parameter's gradient), against PyTorch eager autograd."""
    batch, n, d = SCORE_CASE
    rows = []
    for name in ("additive", "cosine"):
        rng = np.random.default_rng(0)
        q, k, v, dO = (rng.standard_normal((batch, n, d)).astype(np.float32) for _ in range(4))
        params = {p: x.astype(np.float32) for p, x in _params(name, d, rng).items()}
        progress(f"bench score {name} ({batch}, {n}, {d})")
        closures = {ME: _pair(q, k, v, dO, score=name, params=params)[1]}
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            leaves = {p: torch.from_numpy(x).requires_grad_() for p, x in params.items()}
            tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
            tdO = torch.from_numpy(dO)
            scores = _torch_scores(name, leaves)

            def autograd():
                O = torch.softmax(scores(tq, tk), dim=-1) @ tv
                return torch.autograd.grad(O, [tq, tk, tv, *leaves.values()], tdO)
            closures["PyTorch eager"] = autograd
        seconds = rounds(lambda: {who: time(f) for who, f in closures.items()})
        rows.append(Row(batch, n, d, "float32", f"score {name} forward+backward", seconds))
    return rows


def flex_rows(time, Row, progress: Progress = silent, rounds=_once) -> list:
    """ALiBi + causal forward at FLEX_CASE against compiled FlexAttention (steady state; compile time beside)."""
    B, H, n, d = FLEX_CASE
    from ..symbolic.mods import alibi
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, n, d)).astype(np.float32) for _ in range(3))
    mod = alibi(heads=H)
    progress(f"bench ALiBi + causal ({B}, {H}, {n}, {d})")
    mine = lambda: attention(q, k, v, score_mod=mod, mask_mod="causal")  # noqa: E731
    seconds, notes = None, {}
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return [Row(B * H, n, d, "float32", "variant alibi(heads) + causal forward", {ME: time(mine)})]
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    try:
        start = clock.perf_counter()
        block_mask = create_block_mask(causal, None, None, n, n, device="cpu")
        compiled = torch.compile(flex_attention)
        with torch.no_grad():
            compiled(tq, tk, tv, score_mod=score_mod, block_mask=block_mask)
        notes["FlexAttention compile seconds"] = clock.perf_counter() - start

        def flex():
            with torch.no_grad():
                return compiled(tq, tk, tv, score_mod=score_mod, block_mask=block_mask)
        seconds = rounds(lambda: {ME: time(mine), "FlexAttention": time(flex)})
    except Exception as e:  # no C++ compiler for inductor, an unsupported CPU: report, do not fail the bench
        notes["FlexAttention"] = f"not measured: {type(e).__name__}: {str(e)[:120]}"
    seconds = seconds or {ME: time(mine)}
    return [Row(B * H, n, d, "float32", "variant alibi(heads) + causal forward", seconds, variants=notes)]


def targets(rows: list) -> list[tuple[str, bool]]:
    """Issue 8's speed goals the variant rows measure, each (text, met)."""
    out = []
    for r in rows:
        if PLAIN in r.seconds:
            slower = r.seconds[ME] / r.seconds[PLAIN]
            out.append((f"{r.label} {r.mode[8:]}: {slower:.2f}x plain dot time (target <= 1.3x)", slower <= 1.3))
        elif "FlexAttention" in r.seconds:
            ratio = r.seconds["FlexAttention"] / r.seconds[ME]
            compile_s = r.variants.get("FlexAttention compile seconds", 0.0)
            out.append((f"(B 1, H 8, 1024, 64) ALiBi + causal forward: {ratio:.2f}x compiled FlexAttention "
                        f"(compiled in {compile_s:.1f} s; target >= 1.0x)", ratio >= 1.0))
        elif "PyTorch eager" in r.seconds:
            ratio = r.seconds["PyTorch eager"] / r.seconds[ME]
            out.append((f"{r.label} {r.mode}: {ratio:.2f}x PyTorch eager autograd (target >= 3x)", ratio >= 3.0))
    return out


def rows(time, Row, *, quick: bool = False, progress: Progress = silent, rounds=_once) -> list:
    """Every variant row; `quick`: the (8, 256, 64) mod rows and the score rows only. rounds(measure) repeats a
    row's measurement (a dict of times), symattn and the other side in turn, and keeps the best of each."""
    out = mod_rows(MOD_CASES[:1] if quick else MOD_CASES, time, Row, progress, rounds)
    out += score_rows(time, Row, progress, rounds)
    if not quick:
        out += flex_rows(time, Row, progress, rounds)
    return out
