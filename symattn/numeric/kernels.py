"""Dispatch to the generated kernels (symattn/numeric/attention_loops.py): serial loop kernels for small problems,
flash-style tile kernels (BLAS tiles, prange) for the rest, with BLAS held to one thread while they run.

Arrays arrive validated and flattened: Q (Bq, n_q, d_k), K (Bk, n_k, d_k), V (Bv, n_k, d_v) C-contiguous,
bias (Bm, n_q, n_k) or (0, 0, 0), batch (B, 4) int64 rows [q, k, v, bias] of each flattened batch element.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import numba
import numpy as np

from . import attention_loops as loops
from ..errors import SymattnError
from ..filestamp import damage
from ..progress import silent

MASKED_ROWS = {"zero": 0, "uniform": 1, "nan": 2}
#: Below this many score entries (B·n_q·n_k) the serial loop kernels win: no BLAS call, no thread start.
SMALL = 1 << 15
#: Tile sizes (query rows x keys): forward 128 x 256 (64 x 64 measured 35% slower), backward 128 x 128.
BQ, BK, BQ_BWD, BK_BWD = 128, 256, 128, 128


class _Blas:
    """The BLAS libraries loaded in this process (threadpoolctl's controllers), held to one thread while a tile
    kernel runs: its prange workers call BLAS on small tiles, and BLAS's own threads (which keep spinning after
    every call) would fight them for the cores. Numba's np.dot calls SciPy's OpenBLAS (scipy.linalg.cython_blas),
    not NumPy's; both are held, so the caller's NumPy matmuls before and after are untouched. The controllers are
    found once (threadpoolctl scans the loaded libraries: milliseconds); holding and restoring them then costs
    microseconds (threadpool_limits() per call was measured at 1.3-2.2 ms)."""

    def __init__(self):
        self._libs = None

    def libs(self):
        if self._libs is None:
            import scipy.linalg.cython_blas  # noqa: F401  (loaded, so threadpoolctl lists the BLAS np.dot uses)
            from threadpoolctl import ThreadpoolController
            self._libs = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        return self._libs

    def __enter__(self):
        self._held = [(lib, n) for lib in self.libs() if (n := lib.get_num_threads()) != 1]
        for lib, _ in self._held:
            lib.set_num_threads(1)

    def __exit__(self, *exc):
        for lib, n in self._held:
            lib.set_num_threads(n)


one_blas_thread = _Blas()


def forward_into(Q, K, V, bias, batch, causal: bool, scale: float, code: int, O, LSE) -> None:
    """Write O (B, n_q, d_v) and the row log-sum-exp LSE (B, n_q); `code` is MASKED_ROWS[policy]."""
    if batch.shape[0] * Q.shape[1] * K.shape[1] < SMALL:
        loops.attention_forward(Q, K, V, bias, batch, causal, scale, code, O, LSE)
    else:
        with one_blas_thread:
            loops.forward_tiles(Q, K, V, bias, batch, causal, scale, code, O, LSE, BQ, BK)


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
    if B * n_q * n_k < SMALL:
        loops.attention_backward(Q, K, V, bias, batch, causal, scale, code, O, LSE, dO, dQ, dK, dV)
        return
    threads = numba.get_num_threads()
    groups = 1 if B >= threads else min(-(-n_k // BK_BWD), -(-2 * threads // max(B, 1)))
    with one_blas_thread:
        loops.backward_tiles(Q, K, V, bias, batch, causal, scale, code, O, LSE, dO, dQ, dK, dV, BQ_BWD, BK_BWD,
                             groups)


def backward(Q, K, V, bias, batch, causal: bool, scale: float, masked_rows: str, O, LSE, dO):
    """dQ (B, n_q, d_k), dK (B, n_k, d_k), dV (B, n_k, d_v), one slice per flattened batch element."""
    B = batch.shape[0]
    dQ = np.empty((B,) + Q.shape[1:], dtype=Q.dtype)
    dK = np.empty((B,) + K.shape[1:], dtype=Q.dtype)
    dV = np.empty((B,) + V.shape[1:], dtype=Q.dtype)
    backward_into(Q, K, V, bias, batch, causal, scale, MASKED_ROWS[masked_rows], O, LSE, dO, dQ, dK, dV)
    return dQ, dK, dV


@functools.cache
def _fingerprint() -> str:
    """Hash of symattn's own source: generated kernels are cached per generator version (read once a process:
    the source does not change under a running program)."""
    import hashlib
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where verify/bench keep generated unrolled kernels: $SYMATTN_CACHE or ~/.cache/symattn/kernels/<fingerprint>
    (a changed generator never reuses kernels written by an older one)."""
    return _cache_root() / _fingerprint()


def _cache_root() -> Path:
    return Path(os.environ.get("SYMATTN_CACHE") or Path.home() / ".cache" / "symattn") / "kernels"


def load_unrolled(spec, folder=None, progress=None):
    """The module of `spec`'s unrolled kernels, generated into `folder` (default: cache_dir()) if needed.

    A cached file is imported only when its content hash holds; a missing one is generated, an empty, truncated
    or edited one regenerated with one line saying so (through `progress`, else on stderr). A file that fails to
    import is regenerated once, then reported (SymattnError naming its path). Returns None where unrolled kernels
    do not pay (see codegen.unrolled.UNROLL_LIMIT)."""
    folder = cache_dir() if folder is None else Path(folder)
    path = folder / f"{spec.name}.py"
    name = f"symattn_generated_{spec.name}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    fault = _fault(path)
    if fault is not None:
        if fault != "missing":
            _notice(progress, f"{path} was {fault}; regenerated")
        if not _regenerate(spec, folder, progress):
            return None
    try:
        return _import(name, path, spec)
    except Exception as e:  # SyntaxError, a missing kernel, ...: whatever stops the file from loading
        _notice(progress, f"{path} failed to load ({_why(e)}); regenerated")
    if not _regenerate(spec, folder, progress):
        return None
    try:
        return _import(name, path, spec)
    except Exception as e:
        raise SymattnError(f"generated kernels {path} fail to load even after regenerating them: {_why(e)}") from e


def _fault(path: Path) -> str | None:
    """'missing', a damage kind ('empty', 'truncated', 'edited') or None for a file as symattn wrote it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "unreadable"
    fault = damage(data)
    return None if fault is None else fault.kind


def _regenerate(spec, folder: Path, progress) -> bool:
    """Write `spec`'s kernels into `folder` over whatever is there; False where unrolled kernels do not pay."""
    from ..codegen import generate  # codegen needs SymPy: loaded only when kernels must be written
    from ..codegen.unrolled import pays_for
    if not pays_for(spec):
        return False
    generate(spec, folder, progress=progress or silent, force=True)
    return True


def _import(name: str, path: Path, spec):
    """Import the generated module at `path` from the very bytes whose content hash was checked."""
    data = path.read_bytes()
    fault = damage(data)
    if fault is not None:
        raise SymattnError(fault.reason)
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # Numba's cache pickles the module name: it must resolve on reload
    try:
        exec(module_spec.loader.source_to_code(data, str(path)), module.__dict__)  # what exec_module does
        for kind in ("forward", "backward"):
            getattr(module, f"{spec.name}_{kind}")
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _why(error: BaseException) -> str:
    """One line: the error's type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return type(error).__name__ + (f": {lines[0]}" if lines else "")


def _notice(progress, message: str) -> None:
    """One line through `progress`, or on stderr."""
    if progress is not None:
        progress(message)
    else:
        print(f"symattn: {message}", file=sys.stderr, flush=True)
