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
    A process-wide count (OpenBLAS, pthreads) is held while any hold is open in the process; a per-thread count
    (OpenMP builds, other libraries: threadpoolctl sets the calling thread's) while one is open in this thread.
    Holding and restoring costs microseconds (threadpool_limits() per call was measured at 1.3-2.2 ms)."""

    def __init__(self):
        self._libs = None
        self._setters = None  # {process_wide: [(controller, setter)]}, found once
        self._lock = threading.Lock()
        self._depth = 0  # holds open in the process
        self._saved = []  # (setter, count) of process-wide counts changed by the first hold, restored by the last
        self._local = threading.local()  # .depth, .saved: the same for this thread's per-thread counts

    def libs(self) -> list:
        """threadpoolctl's controllers of the BLAS libraries loaded (SciPy's, which Numba's np.dot calls, included)."""
        if self._libs is None:
            import scipy.linalg.cython_blas  # noqa: F401  (loaded, so threadpoolctl lists the BLAS np.dot uses)
            from threadpoolctl import ThreadpoolController
            self._libs = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        return self._libs

    def _pairs(self, process_wide: bool) -> list:
        """(controller, setter) of the libraries whose count is process-wide (or per thread)."""
        if self._setters is None:
            found = [(lib, *_setter(lib)) for lib in self.libs()]
            self._setters = {w: [(lib, set_) for lib, set_, wide in found if wide == w] for w in (True, False)}
        return self._setters[process_wide]

    def __enter__(self):
        local = self._local
        if getattr(local, "depth", 0) == 0:
            local.saved = _hold(self._pairs(process_wide=False))
        local.depth = getattr(local, "depth", 0) + 1
        try:
            with self._lock:
                if self._depth == 0:
                    self._saved = _hold(self._pairs(process_wide=True))
                self._depth += 1
        except BaseException:
            self._leave_thread()
            raise

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                _restore(self._saved)
                self._saved = []
        self._leave_thread()

    def _leave_thread(self) -> None:
        local = self._local
        local.depth -= 1
        if local.depth == 0:
            _restore(local.saved)
            local.saved = []


def _hold(pairs) -> list:
    """Set each library to one thread; the (setter, count) pairs changed. A failure part-way restores those set."""
    saved = []
    try:
        for lib, set_ in pairs:
            n = lib.get_num_threads()
            if n != 1:
                set_(1)
                saved.append((set_, n))
    except BaseException:
        _restore(saved)
        raise
    return saved


def _restore(saved: list) -> None:
    for set_, n in saved:
        set_(n)


def _setter(lib) -> tuple:
    """(setter, process_wide) of `lib`'s thread count: OpenBLAS's own openblas_set_num_threads for a pthreads
    build (one count for the process), else the controller's (OpenMP builds and other libraries: per thread)."""
    if lib.internal_api == "openblas" and getattr(lib, "threading_layer", "") != "openmp":
        try:
            dll = ctypes.CDLL(lib.filepath)
        except OSError:
            return lib.set_num_threads, False
        for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_", "_64")):
            fn = getattr(dll, f"{prefix}openblas_set_num_threads{suffix}", None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], None
                return fn, True
    return lib.set_num_threads, False


one_blas_thread = BlasHold()
