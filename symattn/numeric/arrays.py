"""Arrays as the numeric API takes them: q, k, v, dO checked for dtype and rank, named in the error when wrong."""
from __future__ import annotations

import numpy as np

from ..errors import InputError

DTYPES = (np.float32, np.float64)


def _array(name: str, x) -> np.ndarray:
    if isinstance(x, np.ma.MaskedArray) and np.ma.is_masked(x):
        raise InputError(f"{name} is a masked array with masked entries, whose mask would be dropped: give the data "
                         f"and pass the mask as mask= (True where a key is visible)")
    x = np.asarray(x)
    if x.dtype == np.float16:
        raise InputError(f"{name} has dtype float16, which is not supported: cast to float32 ({name}.astype(np.float32))")
    if x.dtype.type not in DTYPES:
        raise InputError(f"{name} must be a float32 or float64 array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise InputError(f"{name} must have shape (..., n, d) with at least 2 dims, got shape {x.shape}")
    if not x.dtype.isnative:  # big-endian data (from a file, say): the kernels take the machine's byte order
        x = x.astype(x.dtype.newbyteorder("="))
    return x


def _check_dO(dO, shape: tuple[int, ...], dtype) -> np.ndarray:
    """dO validated against the output's shape and dtype, as a C-contiguous array."""
    dO = _array("dO", dO)
    if dO.shape != shape:
        raise InputError(f"dO must have the output's shape {shape}, got {dO.shape}")
    if dO.dtype != dtype:
        raise InputError(f"dO must have the dtype of q, k, v ({dtype}), got {dO.dtype}")
    return np.ascontiguousarray(dO)
