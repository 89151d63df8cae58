"""y = x @ W.T with W kept in its GGUF type (C kernels, threads, GIL released).

`raw` is a weight matrix as GGUF stores it: np.uint8 (n_out, row_bytes), one
row of n_in values per output. Quantised types multiply with activations
quantised per block of 32 to int8 (llama.cpp's approach); F32/F16/BF16
multiply with the f32 activations. See docs/benchmarks.md for the figures.
"""
import numpy as np

from . import native
from .native import TYPES


def row_bytes(type_name, n_in):
    """Bytes of one row of n_in values of type_name."""
    return native.row_bytes(_type_id(type_name), n_in)


def matmul(raw, type_name, n_out, n_in, x, n_threads=None):
    """x @ W.T: x float32 (n, n_in) -> float32 (n, n_out)."""
    type_id, stride = _check_raw(raw, type_name, n_out, n_in)
    if n_threads is None:
        n_threads = native.get_num_threads()
    elif type(n_threads) is not int:
        n_threads = native.check_threads(n_threads)   # C checks a plain int's range
    if type(x) is not np.ndarray or x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"x must have shape (n, {n_in}), got {x.shape}")
    y = np.empty((x.shape[0], n_out), dtype=np.float32)
    if x.shape[0] == 0:
        return y
    native.matmul(type_id, raw, stride, n_out, n_in, x, y, n_threads)
    return y


def dequantize_rows(raw, type_name, n_in, ids):
    """Rows ids of W as float32 (len(ids), n_in), e.g. an embedding lookup."""
    n_rows = raw.shape[0] if isinstance(raw, np.ndarray) and raw.ndim == 2 else -1
    type_id, stride = _check_raw(raw, type_name, n_rows, n_in)
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError("ids must be a 1-D sequence of integers")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
        raise ValueError(f"row ids must be in [0, {n_rows})")
    out = np.empty((ids.size, n_in), dtype=np.float32)
    if ids.size == 0:
        return out
    native.dequantize_rows(type_id, raw, stride, n_rows, n_in, ids, out)
    return out


def _type_id(type_name):
    if type_name not in TYPES:
        raise ValueError(f"unsupported weight type {type_name!r}; known: {', '.join(TYPES)}")
    return TYPES[type_name]


def _check_raw(raw, type_name, n_out, n_in):
    """Returns (type id, row stride in bytes) of a valid raw weight matrix."""
    type_id = _type_id(type_name)
    return type_id, native.matrix_stride(raw, type_id, n_out, n_in)
