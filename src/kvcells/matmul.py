"""y = x @ W.T with W kept in its GGUF type (C kernels, threads, GIL released).

`raw` is a weight matrix as GGUF stores it: np.uint8 (n_out, row_bytes), one
row of n_in values per output. Quantised types multiply with activations
quantised per block of 32 to int8 (llama.cpp's approach); F32/F16/BF16
multiply with the f32 activations. See docs/benchmarks.md for the figures.
"""
import os

import numpy as np
from gguf import GGMLQuantizationType

from ._core import ffi, lib

TYPE_NAMES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
TYPES = {name: int(GGMLQuantizationType[name]) for name in TYPE_NAMES}

_num_threads = len(os.sched_getaffinity(0))


def set_num_threads(n):
    """Threads used by matmul when its n_threads is None (default: usable cores)."""
    global _num_threads
    _num_threads = _check_threads(n)


def get_num_threads():
    return _num_threads


def simd_supported():
    """True when this CPU has AVX2, FMA and F16C."""
    return bool(lib.matmul_simd_supported())


def set_simd(on):
    """Use the AVX2 kernels (if supported) or force the portable C ones."""
    lib.matmul_set_simd(1 if on else 0)


def simd_enabled():
    return bool(lib.matmul_simd_enabled())


def row_bytes(type_name, n_in):
    """Bytes of one row of n_in values of type_name."""
    n = lib.quant_row_bytes(_type_id(type_name), _check_int(n_in, "n_in"))
    if n == 0:
        raise ValueError(f"n_in={n_in} is not a positive multiple of {type_name}'s block size")
    return n


def matmul(raw, type_name, n_out, n_in, x, n_threads=None):
    """x @ W.T: x float32 (n, n_in) -> float32 (n, n_out)."""
    type_id, stride = _check_raw(raw, type_name, n_out, n_in)
    n_threads = _num_threads if n_threads is None else _check_threads(n_threads)
    if type(x) is not np.ndarray or x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"x must have shape (n, {n_in}), got {x.shape}")
    y = np.empty((x.shape[0], n_out), dtype=np.float32)
    if x.shape[0] == 0:
        return y
    rc = lib.matmul(type_id, _ptr(raw), stride, n_out, n_in, ffi.from_buffer(_FLOATS, x),
                    x.shape[0], ffi.from_buffer(_FLOATS, y), n_threads)
    _check_rc(rc)
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
    rc = lib.matmul_dequantize_rows(type_id, _ptr(raw), stride, n_rows, n_in,
                                    ffi.cast("const int64_t *", ffi.from_buffer(ids)),
                                    ids.size, ffi.cast("float *", ffi.from_buffer(out)))
    _check_rc(rc)
    return out


def _type_id(type_name):
    if type_name not in TYPES:
        raise ValueError(f"unsupported weight type {type_name!r}; known: {', '.join(TYPE_NAMES)}")
    return TYPES[type_name]


def _check_int(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{what} must be an int, got {v!r}")
    return int(v)


def _check_threads(n):
    n = _check_int(n, "n_threads")
    if n < 1:
        raise ValueError(f"n_threads must be >= 1, got {n}")
    return n


_layouts = {}   # (type_name, n_in) -> (type id, row bytes), once validated
_U8 = np.dtype(np.uint8)
_FLOATS = ffi.typeof("float[]")


def _check_raw(raw, type_name, n_out, n_in):
    """Returns (type id, row stride in bytes) of a valid raw weight matrix.

    Kept cheap: a decode step calls matmul ~130 times."""
    layout = _layouts.get((type_name, n_in))
    if layout is None:
        layout = _type_id(type_name), row_bytes(type_name, n_in)
        _layouts[(type_name, n_in)] = layout
    type_id, nbytes = layout
    if not isinstance(raw, np.ndarray) or raw.dtype != _U8 or raw.ndim != 2:
        raise ValueError("raw must be a 2-D np.uint8 array (n_out, row_bytes)")
    if type(n_out) is not int:
        n_out = _check_int(n_out, "n_out")
    if raw.shape[0] != n_out or n_out < 1:
        raise ValueError(f"raw has {raw.shape[0]} rows, expected n_out={n_out} >= 1")
    if raw.shape[1] != nbytes:
        raise ValueError(f"{type_name} rows of {n_in} values take {nbytes} bytes, raw has {raw.shape[1]}")
    stride = raw.strides
    if stride[1] != 1 or stride[0] < nbytes:
        raise ValueError("raw rows must be contiguous and not overlap")
    return type_id, stride[0]


def _ptr(raw):
    if raw.flags.c_contiguous:
        return ffi.from_buffer(raw)
    return ffi.cast("const uint8_t *", raw.__array_interface__["data"][0])


def _check_rc(rc):
    if rc != 0:   # MATMUL_OK
        if rc == lib.MATMUL_ENOMEM:
            raise MemoryError("matmul: out of memory")
        raise ValueError("matmul: invalid arguments")
