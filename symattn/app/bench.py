"""`symattn bench`: symattn vs PyTorch, JAX and NumPy, ratios measured side by side in one run; table, JSON, PNG.

Cases (batch·heads, n, d): (1,5,2), (8,256,64) in float32 and float64, (8,1024,64) and (2,4096,64) in float32,
plain and causal; forward and forward+backward (symattn: attention_vjp and its pullback, the forward running
once). The multi-head layer at (batch 4, n 256, d_model 512, h 8) against PyTorch's and JAX's layers, and a
grouped-query layer. Peers at their best (symattn/app/peers.py; `pip install -e ".[bench]"`); NumPy is
symattn.reference (n <= 1024). Each target of issue 10 is printed met or MISSED.
"""
from __future__ import annotations

import json
import os
import platform
import timeit
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import bench_variants, peers
from ..errors import SymattnError
from ..numeric import reference
from ..numeric.api import attention, attention_vjp
from ..numeric.kernels import load_unrolled
from ..outputs import output_folder, save_figure, write_atomic
from ..progress import Progress, silent
from ..symbolic.spec import AttentionSpec

CASES = ((1, 5, 2), (8, 256, 64), (8, 1024, 64), (2, 4096, 64))
QUICK = ((1, 5, 2), (8, 256, 64))
F64_MAX_N = 256  # float64 rows up to this n
CAUSAL_MIN_N = 256  # causal rows from this n (float32)
NUMPY_MAX_N = 1024  # the NumPy reference is timed up to this n
LAYER_CASES = ((4, 256, 512, 8, 8), (1, 1024, 512, 8, 2))  # (batch, n, d_model, heads, kv_heads), float32
ME = "symattn"


@dataclass(frozen=True)
class Row:
    batch: int
    n: int
    d: int
    dtype: str
    mode: str  # "forward" | "forward+backward" | "layer h=.. kv=.. forward" | ...
    seconds: dict  # path -> best seconds per call
    causal: bool = False
    flops: float = 0.0  # symattn's useful floating-point operations per call (0: not counted)
    variants: dict = field(default_factory=dict)  # peer -> the variant that was fastest

    @property
    def label(self) -> str:
        return f"({self.batch},{self.n},{self.d}) {self.dtype}{' causal' if self.causal else ''}"

    def ratio(self, peer: str) -> float | None:
        """How many times faster symattn ran than `peer` (peer seconds / symattn seconds)."""
        return self.seconds[peer] / self.seconds[ME] if peer in self.seconds else None

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds[ME] / 1e9 if self.flops else 0.0


#: Every row is measured ROUNDS times, symattn and its peers in turn, and each time is the best over the rounds:
#: this host's speed drifts by 15-50% over seconds (shared cores), and a drift that slows one side of a ratio in one
#: round rarely does so in the next.
ROUNDS = 2


def _time(f, budget: float = 0.25 / ROUNDS) -> float:
    """Best seconds per call: calls grouped so one group takes ~budget/5, best of 5 groups (after one warm call
    and a calibration of at least 10 ms)."""
    f()
    timer = timeit.Timer(f)
    number = 1
    while (elapsed := timer.timeit(number)) < 0.01:
        number *= 4
    number = max(1, int(number * budget / 5 / elapsed))
    return min(timer.repeat(repeat=5, number=number)) / number


def _rounds(measure):
    """measure() (a dict of times) ROUNDS times; every time the best over the rounds."""
    best = measure()
    for _ in range(ROUNDS - 1):
        best = _best_of(best, measure())
    return best


def _best_of(a, b):
    """The faster of two measurements of one shape: dicts by key, (seconds, which peer variant) pairs by seconds,
    tuples or lists of seconds element by element, plain seconds."""
    if isinstance(a, dict):
        return {key: _best_of(a[key], b[key]) for key in a}
    if isinstance(a, tuple) and len(a) == 2 and isinstance(a[1], str):
        return min(a, b)
    if isinstance(a, (tuple, list)):
        return type(a)(map(_best_of, a, b))
    return min(a, b)


def blas_kernels() -> str:
    """The kernels each loaded OpenBLAS picked (threadpoolctl's 'architecture'), e.g. 'SkylakeX' for AVX-512:
    NumPy's matmul and symattn's tiles (SciPy's OpenBLAS) run on them."""
    from ..numeric.kernels import one_blas_thread
    found = {lib.info().get("architecture") for lib in one_blas_thread.libs()} - {None}
    return ", ".join(sorted(found)) or "unknown"


def cpu_name() -> str:
    """The CPU LLVM compiles Numba's kernels for, e.g. 'znver5'."""
    import llvmlite.binding as llvm
    return llvm.get_host_cpu_name()


def blas_note(env: dict) -> str | None:
    """A warning when OPENBLAS_CORETYPE holds OpenBLAS to older kernels than the CPU has (AVX2 on an AVX-512
    CPU halves its GEMM: measured 100 vs 190 GF/s per core on float32 128 x 64 x 256 tiles), else None."""
    forced = env.get("OPENBLAS_CORETYPE")
    if not forced:
        return None
    import llvmlite.binding as llvm
    avx512 = llvm.get_host_cpu_features().get("avx512f", False)
    slower = avx512 and forced.lower() in ("haswell", "zen", "sandybridge", "nehalem", "prescott", "core2")
    return (f"note: OPENBLAS_CORETYPE={forced} is set, so OpenBLAS runs its {env.get('blas_kernels', forced)} "
            f"kernels" + (" on this AVX-512 CPU: GEMMs (NumPy's and symattn's BLAS tiles) run at about half speed; "
                          "unset it to measure OpenBLAS's own choice" if slower else "") + ".")


def environment() -> dict:
    """Versions, threads and BLAS configuration the numbers were taken with."""
    import numba
    import sympy
    env = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
           "sympy": sympy.__version__, **peers.versions(), "cpus": os.cpu_count(),
           "numba_threads": numba.get_num_threads(), "machine": platform.machine()}
    env.update({k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                           "MKL_NUM_THREADS", "NUMBA_NUM_THREADS") if k in os.environ})
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        env["blas"] = f"{blas.get('name')} {blas.get('version', '')}".strip()
    except Exception:  # older NumPy: no dict mode
        env["blas"] = "unknown"
    env["blas_kernels"] = blas_kernels()
    env["cpu"] = cpu_name()
    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    env["numpy_sgemm_gflops"] = round(2 * 1024 ** 3 / _time(lambda: a @ a, 0.5) / 1e9, 1)  # the machine's GEMM
    return env


def run_case(batch: int, n: int, d: int, dtype, causal: bool = False, progress: Progress = silent) -> list[Row]:
    rng = np.random.default_rng(0)
    q, k, v, dO = (rng.standard_normal((batch, n, d)).astype(dtype) for _ in range(4))

    def vjp():
        O, pullback = attention_vjp(q, k, v, is_causal=causal)
        return O, pullback(dO)
    paths = {ME: (lambda: attention(q, k, v, is_causal=causal), vjp)}
    if n <= NUMPY_MAX_N:
        paths["NumPy"] = (lambda: reference.attention(q, k, v, is_causal=causal),
                          lambda: (reference.attention(q, k, v, is_causal=causal),
                                   reference.attention_backward(q, k, v, dO, is_causal=causal)))
    spec = AttentionSpec(n, n, d, mask="causal" if causal else "none")
    module = load_unrolled(spec, progress=progress) if batch == 1 else None
    if module is not None:
        f, b = getattr(module, f"{spec.name}_forward"), getattr(module, f"{spec.name}_backward")
        O, grads = np.empty((n, d), dtype), [np.empty((n, d), dtype) for _ in range(3)]
        paths["unrolled kernel"] = (lambda: f(q[0], k[0], v[0], O),
                                    lambda: (f(q[0], k[0], v[0], O), b(q[0], k[0], v[0], dO[0], *grads)))
    progress(f"bench ({batch}, {n}, {d}) {np.dtype(dtype).name}{' causal' if causal else ''}")
    found, others = _rounds(lambda: ({name: (_time(pf), _time(pb)) for name, (pf, pb) in paths.items()},
                                     peers.attention(q, k, v, dO, causal, _time)))
    flops = 4 * batch * n * n * d * (0.5 if causal else 1.0)  # QK^T and PV; the backward adds 5 GEMMs: x3.5
    rows = []
    for m, mode in enumerate(("forward", "forward+backward")):
        seconds = {name: t[m] for name, t in found.items()} | {p: r[mode][0] for p, r in others.items()}
        rows.append(Row(batch, n, d, np.dtype(dtype).name, mode, seconds, causal, flops * (1, 3.5)[m],
                        {p: r[mode][1] for p, r in others.items()}))
    return rows


def run_layer_case(batch: int, n: int, d_model: int, heads: int, kv_heads: int, dtype=np.float32,
                   progress: Progress = silent) -> list[Row]:
    """The multi-head self-attention layer (no biases): symattn, the head-by-head NumPy reference, peers."""
    from ..numeric.layer import multihead_attention, multihead_attention_vjp
    rng = np.random.default_rng(0)
    d_k = d_model // heads
    x, d_out = (rng.standard_normal((batch, n, d_model)).astype(dtype) for _ in range(2))
    w = [(rng.standard_normal(shape) / np.sqrt(d_model)).astype(dtype) for shape in
         ((d_model, heads * d_k), (d_model, kv_heads * d_k), (d_model, kv_heads * d_k), (heads * d_k, d_model))]
    kw = dict(heads=heads, kv_heads=kv_heads)

    def vjp():
        out, pullback = multihead_attention_vjp(x, *w, **kw)
        return out, pullback(d_out)
    paths = {ME: (lambda: multihead_attention(x, *w, **kw), vjp),
             "NumPy": (lambda: reference.multihead_attention(x, *w, **kw),
                       lambda: (reference.multihead_attention(x, *w, **kw),
                                reference.multihead_attention_backward(x, *w, d_out, **kw)))}
    progress(f"bench layer ({batch}, {n}, {d_model}, h={heads}, kv={kv_heads})")
    found, others = _rounds(lambda: ({name: (_time(pf), _time(pb)) for name, (pf, pb) in paths.items()},
                                     peers.layer(x, *w, d_out, heads, kv_heads, _time)))
    rows = []
    for m, mode in enumerate(("forward", "forward+backward")):
        seconds = {name: t[m] for name, t in found.items()} | {p: r[mode][0] for p, r in others.items()}
        rows.append(Row(batch, n, d_model, np.dtype(dtype).name, f"layer h={heads} kv={kv_heads} {mode}", seconds,
                        variants={p: r[mode][1] for p, r in others.items()}))
    return rows


def empty_call_seconds() -> float:
    """An empty njit call with the unrolled forward's four array arguments: the floor of call overhead."""
    import numba

    @numba.njit
    def empty(Q, K, V, O):
        return None
    x = np.zeros((5, 2))
    return _rounds(lambda: _time(lambda: empty(x, x, x, x)))


def _at_least(r: Row, peer: str, target: float, what: str) -> tuple[str, bool] | None:
    ratio = r.ratio(peer)
    if ratio is None:
        return None
    return f"{r.label} {what}: {ratio:.2f}x {peer} (target >= {target}x)", ratio >= target


def targets(rows: list[Row], empty: float) -> list[tuple[str, bool]]:
    """Issue 10's targets that the rows measure, each (text, met)."""
    out: list[tuple[str, bool] | None] = []
    by = {(r.batch, r.n, r.d, r.dtype, r.causal, r.mode): r for r in rows}
    for r in rows:
        size, fwd = (r.batch, r.n, r.d), r.mode == "forward"
        if r.mode.startswith("layer"):
            if size == (4, 256, 512):
                out += [_at_least(r, p, 1.3, r.mode[6:]) for p in ("PyTorch", "JAX")]
            continue
        if size == (1, 5, 2) and fwd and "unrolled kernel" in r.seconds:
            t = r.seconds["unrolled kernel"]
            out.append((f"{r.label} unrolled forward {t / empty:.1f}x an empty njit call (target <= 5x)", t <= 5 * empty))
        if size == (1, 5, 2) and r.dtype == "float32" and not r.causal:
            out += ([_at_least(r, "JAX", 3, "forward call overhead"), _at_least(r, "PyTorch", 5, "forward call overhead")]
                    if fwd else [_at_least(r, "JAX", 5, "attention_vjp + pullback call overhead")])
        if size == (8, 256, 64) and not r.causal:
            best = min((r.seconds[p], p) for p in ("PyTorch", "JAX") if p in r.seconds) if \
                {"PyTorch", "JAX"} & set(r.seconds) else None
            if r.dtype == "float64" and best:
                out.append(_at_least(r, best[1], 1.0, f"{r.mode} (best peer)"))
            elif r.dtype == "float32":
                out += ([_at_least(r, "PyTorch", 1.2, "forward"), _at_least(r, "JAX", 1.2, "forward")] if fwd else
                        [_at_least(r, "PyTorch", 1.5, "forward+backward")])
        if size in ((8, 1024, 64), (2, 4096, 64)) and r.dtype == "float32":
            if fwd and not r.causal:
                out.append((f"{r.label} forward {r.gflops:.0f} GF/s (target >= 150)", r.gflops >= 150))
            if not fwd and not r.causal:
                out.append(_at_least(r, "PyTorch", 2, "forward+backward"))
            plain = by.get((r.batch, r.n, r.d, r.dtype, False, r.mode))
            if r.causal and plain:
                speed = plain.seconds[ME] / r.seconds[ME]
                out.append((f"{r.label} {r.mode}: {speed:.2f}x faster than non-causal (target >= 1.7x)", speed >= 1.7))
    return [t for t in out if t is not None]


def table(rows: list[Row]) -> str:
    paths = [ME] + sorted({p for r in rows for p in r.seconds} - {ME}, key=lambda p: (p == "NumPy", p))
    peer_cols = [p for p in paths if p != ME]
    head = (f"{'case':<28}{'mode':<44}" + "".join(f"{p:>16}" for p in paths) + f"{'GF/s':>8}"
            + "".join(f"{'x' + p:>10}" for p in peer_cols))
    lines = [head, "(times: best of 5 groups; GF/s: symattn's; xPEER: how many times faster symattn ran than PEER)"]
    for r in rows:
        cells = "".join(f"{_fmt(r.seconds[p]) if p in r.seconds else '-':>16}" for p in paths)
        ratios = "".join(f"{r.ratio(p):>10.2f}" if p in r.seconds else f"{'-':>10}" for p in peer_cols)
        lines.append(f"{r.label:<28}{r.mode:<44}{cells}{r.gflops:>8.1f}{ratios}")
    return "\n".join(lines)


def _fmt(seconds: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g}{unit}"
    return f"{seconds * 1e9:.3g}ns"


def plot(rows: list[Row], path: Path) -> None:
    """symattn's speed-up over each peer per case, one panel per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    others = sorted({p for r in rows for p in r.seconds} - {ME})
    panels = [("forward", lambda r: r.mode == "forward"), ("forward+backward", lambda r: r.mode == "forward+backward"),
              ("multi-head layer", lambda r: r.mode.startswith("layer")),
              ("variants", lambda r: r.mode.startswith(("variant", "score")))]
    panels = [(title, keep) for title, keep in panels if any(keep(r) for r in rows)]
    cols = min(2, len(panels))  # two panels a row: the case labels need the width
    grid_rows = -(-len(panels) // cols)
    fig, grid = plt.subplots(grid_rows, cols, figsize=(8.5 * cols, 5.6 * grid_rows), sharey=True, squeeze=False)
    axes = grid.ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    colors = {p: plt.get_cmap("tab10")(k % 10) for k, p in enumerate(others)}
    labelled: set = set()
    for ax, (mode, keep) in zip(axes, panels):
        sel = [r for r in rows if keep(r)]
        for x, r in enumerate(sel):  # each case's bars side by side, centred on it: only the peers it has
            present = [p for p in others if r.ratio(p)]
            width = 0.8 / max(1, len(present))
            for k, p in enumerate(present):
                ax.bar(x + (k - (len(present) - 1) / 2) * width, r.ratio(p), width, color=colors[p],
                       label=p if p not in labelled else None)
                labelled.add(p)
        ax.axhline(1.0, color="black", lw=0.8)
        if mode == "variants":  # long names: one slanted line each
            labels = [f"({r.batch},{r.n},{r.d}) {r.mode.split(' ', 1)[1]}" for r in sel]
            ax.set_xticks(range(len(sel)), labels, fontsize=7, rotation=35, ha="right")
        else:
            labels = [r.label.replace(" ", "\n") + ("\n" + r.mode.split(" ", 1)[1].replace(" forward", "\nforward")
                                                      if r.mode.startswith("layer") else "") for r in sel]
            ax.set_xticks(range(len(sel)), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{mode}: symattn speed-up (peer time / symattn time)", fontsize=9)
    for ax in grid[:, 0]:
        ax.set_ylabel("times faster than the peer (higher is better)")
    fig.legend(loc="upper center", ncol=len(others), fontsize=9, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.96))  # room for the legend above the panels
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def bench(cases=CASES, dtypes=(np.float32, np.float64), *, layer_cases=LAYER_CASES, variants: str | None = None,
          out_dir: str | Path | None = "bench-results", progress: Progress = silent, say=print) -> dict:
    """Time every case; `variants` "quick" or "all" adds issue 8's variant rows (bench_variants)."""
    if out_dir is not None:
        output_folder(out_dir)  # before minutes of timing, not after
    import numba
    peers.setup(numba.config.NUMBA_NUM_THREADS)  # before Numba's pool starts (peers.setup says why)
    env = environment()
    say("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    if note := blas_note(env):
        say(note)
    empty = empty_call_seconds()
    rows = []
    for b, n, d in cases:
        for dt in dtypes:
            if np.dtype(dt) == np.float64 and n > F64_MAX_N:
                continue
            for causal in (False, True) if np.dtype(dt) == np.float32 and n >= CAUSAL_MIN_N else (False,):
                rows += run_case(b, n, d, dt, causal, progress)
    rows += [row for case in layer_cases for row in run_layer_case(*case, progress=progress)]
    extra = [] if variants is None else bench_variants.rows(_time, Row, quick=variants == "quick", progress=progress,
                                                            rounds=_rounds)
    say(table(rows + extra))
    say(f"empty njit call: {_fmt(empty)}")
    checks = targets(rows, empty) + bench_variants.targets(extra)
    rows += extra
    for text, ok in checks:
        say(f"  [{'met' if ok else 'MISSED'}] {text}")
    result = {"environment": env, "empty_call_seconds": empty,
              "rows": [asdict(r) | {"gflops": r.gflops} for r in rows],
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
