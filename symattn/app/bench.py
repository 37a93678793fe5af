"""`symattn bench`: NumPy reference vs unrolled vs loop kernels, ratios measured in one run, table + PNG.

Cases (batch*heads, n, d); forward and forward+backward; float32 and float64; PyTorch and JAX columns when
installed. Targets (2 cores): (1,5,2) unrolled forward within 5x of an empty njit call and >= 8x NumPy;
(8,256,64) and larger: loop kernels >= 1.5x NumPy, forward and forward+backward. The multi-head layer at
(batch 4, n 256, d_model 512, h 8) and (batch 1, n 1024, d_model 512, h 8, kv_heads 2), float32: >= 1.3x.
"""
from __future__ import annotations

import json
import os
import platform
import timeit
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..numeric import reference
from ..numeric.api import attention, attention_backward
from ..numeric.kernels import load_unrolled
from ..errors import SymattnError
from ..outputs import output_folder, save_figure, write_atomic
from ..progress import Progress, silent
from ..symbolic.spec import AttentionSpec

CASES = ((1, 5, 2), (1, 16, 16), (8, 64, 64), (8, 256, 64), (8, 1024, 64))
LAYER_CASES = ((4, 256, 512, 8, 8), (1, 1024, 512, 8, 2))  # (batch, n, d_model, heads, kv_heads), float32
LAYER_TARGET = 1.3
QUICK = ((1, 5, 2), (8, 256, 64))
BIG = 8 * 256 * 256 * 64  # from here on the >= 1.5x target applies


@dataclass(frozen=True)
class Row:
    batch: int
    n: int
    d: int
    dtype: str
    mode: str  # "forward" | "forward+backward"
    seconds: dict  # path -> best seconds per call


def _time(f, budget: float = 0.25) -> float:
    """Best seconds per call: calls grouped so one group takes ~budget/5, best of 5 groups."""
    f()
    timer = timeit.Timer(f)
    number, elapsed = timer.autorange()
    number = max(1, int(number * budget / 5 / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=5, number=number)) / number


def environment() -> dict:
    """Versions, threads and BLAS configuration the numbers were taken with."""
    import numba
    import sympy
    env = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
           "sympy": sympy.__version__, "cpus": os.cpu_count(), "numba_threads": numba.get_num_threads(),
           "machine": platform.machine()}
    env.update({k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                           "MKL_NUM_THREADS", "NUMBA_NUM_THREADS") if k in os.environ})
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        env["blas"] = f"{blas.get('name')} {blas.get('version', '')}".strip()
    except Exception:  # older NumPy: no dict mode
        env["blas"] = "unknown"
    return env


def _optional_paths(q, k, v, dO) -> dict:
    """PyTorch / JAX forward and forward+backward closures, where installed."""
    paths = {}
    try:
        import torch
        tq, tk, tv, tdO = (torch.from_numpy(x) for x in (q, k, v, dO))

        def torch_fwd():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

        def torch_bwd():
            a, b, c = (x.clone().requires_grad_() for x in (tq, tk, tv))
            torch.nn.functional.scaled_dot_product_attention(a, b, c).backward(tdO)
        paths["PyTorch"] = (torch_fwd, torch_bwd)
    except ImportError:
        pass
    try:
        import jax
        import jax.numpy as jnp
        jq, jk, jv, jdO = (jnp.asarray(x[:, :, None, :]) for x in (q, k, v, dO))  # (B, T, heads=1, d)
        fwd = jax.jit(jax.nn.dot_product_attention)
        vjp = jax.jit(lambda a, b, c, g: jax.vjp(jax.nn.dot_product_attention, a, b, c)[1](g))
        paths["JAX"] = (lambda: fwd(jq, jk, jv).block_until_ready(),
                        lambda: [x.block_until_ready() for x in vjp(jq, jk, jv, jdO)])
    except ImportError:
        pass
    return paths


def run_case(batch: int, n: int, d: int, dtype, progress: Progress = silent) -> list[Row]:
    rng = np.random.default_rng(0)
    q, k, v, dO = (rng.standard_normal((batch, n, d)).astype(dtype) for _ in range(4))
    fwd = {"NumPy": lambda: reference.attention(q, k, v), "loop kernel": lambda: attention(q, k, v)}
    both = {"NumPy": lambda: (reference.attention(q, k, v), reference.attention_backward(q, k, v, dO)),
            "loop kernel": lambda: attention_backward(q, k, v, dO)}
    module = load_unrolled(AttentionSpec(n, n, d), progress=progress) if batch == 1 else None
    if module is not None:
        name = AttentionSpec(n, n, d).name
        f, b = getattr(module, f"{name}_forward"), getattr(module, f"{name}_backward")
        O, grads = np.empty((n, d), dtype), [np.empty((n, d), dtype) for _ in range(3)]
        fwd["unrolled kernel"] = lambda: f(q[0], k[0], v[0], O)
        both["unrolled kernel"] = lambda: (f(q[0], k[0], v[0], O), b(q[0], k[0], v[0], dO[0], *grads))
    for label, (pf, pb) in _optional_paths(q, k, v, dO).items():
        fwd[label], both[label] = pf, pb
    rows = []
    for mode, paths in (("forward", fwd), ("forward+backward", both)):
        progress(f"bench ({batch}, {n}, {d}) {np.dtype(dtype).name} {mode}")
        rows.append(Row(batch, n, d, np.dtype(dtype).name, mode, {p: _time(f) for p, f in paths.items()}))
    return rows


def run_layer_case(batch: int, n: int, d_model: int, heads: int, kv_heads: int, dtype=np.float32,
                   progress: Progress = silent) -> list[Row]:
    """The multi-head layer: NumPy reference (head by head) vs symattn.multihead_attention."""
    from ..numeric.layer import multihead_attention, multihead_attention_backward
    rng = np.random.default_rng(0)
    d_k = d_model // heads
    x, d_out = (rng.standard_normal((batch, n, d_model)).astype(dtype) for _ in range(2))
    w = [(rng.standard_normal(shape) / np.sqrt(d_model)).astype(dtype) for shape in
         ((d_model, heads * d_k), (d_model, kv_heads * d_k), (d_model, kv_heads * d_k), (heads * d_k, d_model))]
    kw = dict(heads=heads, kv_heads=kv_heads)
    fwd = {"NumPy": lambda: reference.multihead_attention(x, *w, **kw),
           "loop kernel": lambda: multihead_attention(x, *w, **kw)}
    both = {"NumPy": lambda: (reference.multihead_attention(x, *w, **kw),
                              reference.multihead_attention_backward(x, *w, d_out, **kw)),
            "loop kernel": lambda: (multihead_attention(x, *w, **kw), multihead_attention_backward(x, *w, d_out, **kw))}
    rows = []
    for mode, paths in (("forward", fwd), ("forward+backward", both)):
        progress(f"bench layer ({batch}, {n}, {d_model}, h={heads}, kv={kv_heads}) {mode}")
        rows.append(Row(batch, n, d_model, np.dtype(dtype).name, f"layer h={heads} kv={kv_heads} {mode}",
                        {p: _time(f) for p, f in paths.items()}))
    return rows


def empty_call_seconds() -> float:
    """An empty njit call with the unrolled forward's four array arguments: the floor of call overhead."""
    import numba

    @numba.njit
    def empty(Q, K, V, O):
        return None
    x = np.zeros((5, 2))
    return _time(lambda: empty(x, x, x, x))


def targets(rows: list[Row], empty: float) -> list[tuple[str, bool]]:
    out = []
    for r in rows:
        s = r.seconds
        if (r.batch, r.n, r.d) == (1, 5, 2) and r.mode == "forward" and "unrolled kernel" in s:
            out.append((f"(1,5,2) {r.dtype} unrolled forward {s['unrolled kernel'] / empty:.1f}x an empty njit call "
                        f"(target <= 5x)", s["unrolled kernel"] <= 5 * empty))
            out.append((f"(1,5,2) {r.dtype} unrolled forward {s['NumPy'] / s['unrolled kernel']:.1f}x faster than "
                        f"NumPy (target >= 8x)", s["NumPy"] >= 8 * s["unrolled kernel"]))
        if r.mode.startswith("layer"):
            ratio = s["NumPy"] / s["loop kernel"]
            out.append((f"({r.batch},{r.n},{r.d}) {r.dtype} {r.mode}: {ratio:.2f}x NumPy (target >= {LAYER_TARGET}x)",
                        ratio >= LAYER_TARGET))
        elif r.batch * r.n * r.n * r.d >= BIG:
            ratio = s["NumPy"] / s["loop kernel"]
            out.append((f"({r.batch},{r.n},{r.d}) {r.dtype} {r.mode}: loop kernel {ratio:.2f}x NumPy (target >= 1.5x)",
                        ratio >= 1.5))
    return out


def table(rows: list[Row]) -> str:
    paths = sorted({p for r in rows for p in r.seconds}, key=lambda p: (p != "NumPy", p))
    head = f"{'case':<14} {'dtype':<8} {'mode':<32}" + "".join(f"{p:>16}" for p in paths) + "   (time; ratio = NumPy/path)"
    lines = [head]
    for r in rows:
        cells = []
        for p in paths:
            t = r.seconds.get(p)
            cells.append(f"{'-':>16}" if t is None else f"{_fmt(t):>9} {r.seconds['NumPy'] / t:5.1f}x")
        lines.append(f"{str((r.batch, r.n, r.d)):<14} {r.dtype:<8} {r.mode:<32}" + "".join(cells))
    return "\n".join(lines)


def _fmt(seconds: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g}{unit}"
    return f"{seconds * 1e9:.3g}ns"


def plot(rows: list[Row], path: Path) -> None:
    """Speed-up over NumPy per case and path, one panel per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = sorted({p for r in rows for p in r.seconds if p != "NumPy"})
    panels = [("forward", lambda r: r.mode == "forward"), ("forward+backward", lambda r: r.mode == "forward+backward"),
              ("multi-head layer", lambda r: r.mode.startswith("layer"))]
    panels = [(title, keep) for title, keep in panels if any(keep(r) for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (mode, keep) in zip(axes, panels):
        sel = [r for r in rows if keep(r)]
        x = np.arange(len(sel))
        width = 0.8 / max(1, len(paths))
        for n, p in enumerate(paths):
            ratios = [r.seconds["NumPy"] / r.seconds[p] if p in r.seconds else 0 for r in sel]
            ax.bar(x + n * width, ratios, width, label=p)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.5, color="grey", lw=0.8, ls="--")
        labels = [f"{r.batch},{r.n},{r.d}\n{r.dtype}" + (f"\n{r.mode[6:].replace(' forward', chr(10) + 'forward')}"
                                                        if r.mode.startswith("layer") else "") for r in sel]
        ax.set_xticks(x + width * (len(paths) - 1) / 2, labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{mode}: speed-up over NumPy (higher is better)")
    axes[0].set_ylabel("NumPy time / path time")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def bench(cases=CASES, dtypes=(np.float32, np.float64), *, layer_cases=LAYER_CASES,
          out_dir: str | Path | None = "bench-results", progress: Progress = silent, say=print) -> dict:
    if out_dir is not None:
        output_folder(out_dir)  # before minutes of timing, not after
    env = environment()
    say("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    if env.get("OPENBLAS_CORETYPE"):
        say(f"note: OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']} is set; it can slow OpenBLAS (NumPy's matmul).")
    empty = empty_call_seconds()
    rows = [row for b, n, d in cases for dt in dtypes for row in run_case(b, n, d, dt, progress)]
    rows += [row for case in layer_cases for row in run_layer_case(*case, progress=progress)]
    say(table(rows))
    say(f"empty njit call: {_fmt(empty)}")
    checks = targets(rows, empty)
    for text, ok in checks:
        say(f"  [{'met' if ok else 'MISSED'}] {text}")
    result = {"environment": env, "empty_call_seconds": empty, "rows": [asdict(r) for r in rows],
              "targets": [{"target": t, "met": ok} for t, ok in checks]}
    if out_dir is not None:
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SymattnError(f"cannot create the folder {str(out)!r}: {e.strerror}") from None
        write_atomic(out / "bench.json", json.dumps(result, indent=1))
        plot(rows, out / "bench.png")
        say(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return result
