"""BLAS held to one thread while a tile kernel runs, from any Python thread.

The tile kernels' prange workers call BLAS (np.dot in Numba: SciPy's OpenBLAS) on small tiles; BLAS's own threads
keep spinning after every call and would fight the workers for the cores, and with 2 BLAS threads a float32 tile's
sums come out in another order (up to 2.5e-6 relative apart). The hold is process-wide, as OpenBLAS's pthreads
thread count is: the first hold to start saves every library's count and sets 1, the last to end restores it, so
concurrent calls from several Python threads neither undo each other's hold nor leave a count changed.
threadpoolctl finds the libraries (once: it scans the loaded libraries, milliseconds); OpenBLAS's count is set
through its own openblas_set_num_threads, since threadpoolctl lets only the first thread that set a limit change
it and silently ignores the others (a worker thread's hold did nothing). NumPy's OpenBLAS is held too, so the
caller's matmuls before and after are untouched; one in another Python thread during a hold runs on one thread.
"""
from __future__ import annotations

import ctypes
import itertools
import threading


class BlasHold:
    """`with one_blas_thread:` runs its body with every loaded BLAS library at one thread (re-entrant, any thread).
    Holding and restoring costs microseconds (threadpool_limits() per call was measured at 1.3-2.2 ms)."""

    def __init__(self):
        self._libs = None
        self._setters = None
        self._lock = threading.Lock()
        self._depth = 0  # holds open in the process
        self._saved = []  # (setter, count) changed by the first hold, restored by the last

    def libs(self) -> list:
        """threadpoolctl's controllers of the BLAS libraries loaded (SciPy's, which Numba's np.dot calls, included)."""
        if self._libs is None:
            import scipy.linalg.cython_blas  # noqa: F401  (loaded, so threadpoolctl lists the BLAS np.dot uses)
            from threadpoolctl import ThreadpoolController
            self._libs = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        return self._libs

    def _pairs(self) -> list:
        if self._setters is None:
            self._setters = [(lib, _setter(lib)) for lib in self.libs()]
        return self._setters

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                self._saved = [(set_, n) for lib, set_ in self._pairs() if (n := lib.get_num_threads()) != 1]
                for set_, _ in self._saved:
                    set_(1)
            self._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for set_, n in self._saved:
                    set_(n)
                self._saved = []


def _setter(lib):
    """The function that sets `lib`'s thread count for the whole process: OpenBLAS's own (pthreads build), else the
    controller's (OpenMP builds and other libraries keep a count per calling thread; threadpoolctl sets it)."""
    if lib.internal_api == "openblas" and getattr(lib, "threading_layer", "") != "openmp":
        try:
            dll = ctypes.CDLL(lib.filepath)
        except OSError:
            return lib.set_num_threads
        for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_", "_64")):
            fn = getattr(dll, f"{prefix}openblas_set_num_threads{suffix}", None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], None
                return fn
    return lib.set_num_threads


one_blas_thread = BlasHold()
