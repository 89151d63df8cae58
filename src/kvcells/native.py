"""The one door between Python and the C core.

This is the only module that imports the compiled extension `kvcells._core`
(built by cffi from csrc/). Every C function that can fail returns a
kvc_status; `check` turns a failure into the matching exception carrying the
C side's message. The argument checks every wrapper shares, the element
type table, the thread count and the SIMD switch live here too.
"""
import operator
import os

import numpy as np

from ._core import ffi, lib
from .errors import CacheFullError, KVCellsError, StateError

I32_MIN, I32_MAX = -2**31, 2**31 - 1

# Element types by ggml's names, with ggml's ids (gguf.GGMLQuantizationType).
TYPES = {"F32": lib.KVC_TYPE_F32, "F16": lib.KVC_TYPE_F16, "BF16": lib.KVC_TYPE_BF16,
         "Q4_0": lib.KVC_TYPE_Q4_0, "Q4_1": lib.KVC_TYPE_Q4_1, "Q5_0": lib.KVC_TYPE_Q5_0,
         "Q5_1": lib.KVC_TYPE_Q5_1, "Q8_0": lib.KVC_TYPE_Q8_0, "Q4_K": lib.KVC_TYPE_Q4_K,
         "Q5_K": lib.KVC_TYPE_Q5_K, "Q6_K": lib.KVC_TYPE_Q6_K}
# The K/V storage types, named as llama.cpp's --cache-type-k names them; a
# type's index here is its code in state files.
KV_TYPES = ("f32", "f16", "q8_0", "q4_0")

_ERRORS = {lib.KVC_EINVAL: ValueError, lib.KVC_EFULL: CacheFullError,
           lib.KVC_ESTATE: StateError, lib.KVC_ENOMEM: MemoryError,
           lib.KVC_EBROKEN: KVCellsError}


def check(status, context=""):
    """Raise the exception of a failed C call, with its message."""
    if status != lib.KVC_OK:
        msg = ffi.string(lib.kvc_last_error()).decode(errors="replace")
        raise _ERRORS.get(status, KVCellsError)(context + msg)


def as_int(x, name, lo=I32_MIN, hi=I32_MAX):
    """x as a Python int in [lo, hi] (hi None: no upper bound), else ValueError."""
    try:
        if isinstance(x, (bool, np.bool_)):
            raise TypeError
        v = operator.index(x)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {x!r}") from None
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} = {v} outside [{lo}, {hi if hi is not None else 'inf'}]")
    return v


def kv_type_id(name):
    """The C id of a K/V storage type name."""
    if name not in KV_TYPES:
        raise ValueError(f"unknown K/V type {name!r}, expected one of {KV_TYPES}")
    return TYPES[name.upper()]


def row_bytes(type_id, n):
    """Bytes of one row of n values of the element type type_id."""
    out = ffi.new("int64_t *")
    check(lib.quant_row_bytes(type_id, as_int(n, "row length", hi=None), out))
    return out[0]


# ---- buffers ----

_FLOATS = ffi.typeof("float[]")
_I32S = ffi.typeof("int32_t[]")


def floats(a):
    """A C float* view of a C-contiguous float32 array."""
    return ffi.from_buffer(_FLOATS, a)


def int32s(a):
    return ffi.from_buffer(_I32S, a)


def bytes_of(a, writable=False):
    return ffi.from_buffer(a, require_writable=writable)


def rows_ptr(raw):
    """A uint8_t* to the first row of a 2-D uint8 array whose rows may be
    strided (raw.strides[0] apart) but are each contiguous."""
    if raw.flags.c_contiguous:
        return ffi.from_buffer(raw)
    return ffi.cast("const uint8_t *", raw.__array_interface__["data"][0])


# ---- the one thread setting and the one SIMD switch ----

_num_threads = len(os.sched_getaffinity(0))


def set_num_threads(n):
    """Threads of the pool that matmul and attention share, for calls that do
    not name their own (default: the usable cores)."""
    global _num_threads
    _num_threads = check_threads(n)


def get_num_threads():
    return _num_threads


def check_threads(n):
    return as_int(n, "n_threads", 1, lib.KVC_MAX_THREADS)


def simd_supported():
    """True when this CPU has AVX2, FMA and F16C."""
    return bool(lib.kvc_simd_supported())


def set_simd(on):
    """Use the AVX2 kernels (if supported) or force the portable C ones, for
    matmul and attention alike."""
    lib.kvc_set_simd(1 if on else 0)


def simd_enabled():
    return bool(lib.kvc_simd_enabled())


# ---- the C entry points, as numpy-level calls ----
# The hot ones (a decode step makes ~200 of these calls) spell their buffers
# out and call check() only on a failure: each extra Python call costs.

def rms_norm(x, w, y, eps):
    n = x.shape[-1]
    status = lib.ops_rms_norm(ffi.from_buffer(_FLOATS, x), ffi.from_buffer(_FLOATS, w),
                              ffi.from_buffer(_FLOATS, y), x.size // n, n, eps)
    if status:
        check(status)


def rms_norm_rope_neox(x, w, cos, sin, y, eps):
    n, heads, d = x.shape
    status = lib.ops_rms_norm_rope_neox(
        ffi.from_buffer(_FLOATS, x), ffi.from_buffer(_FLOATS, w), ffi.from_buffer(_FLOATS, cos),
        ffi.from_buffer(_FLOATS, sin), ffi.from_buffer(_FLOATS, y), n, heads, d, eps)
    if status:
        check(status)


def quantize(type_id, x, out):
    n = x.shape[-1]
    check(lib.quant_quantize(type_id, floats(x), x.size // n, n, bytes_of(out, True)))


def matmul(type_id, raw, stride, n_out, n_in, x, y, n_threads):
    w = ffi.from_buffer(raw) if raw.flags.c_contiguous else rows_ptr(raw)
    status = lib.matmul(type_id, w, stride, n_out, n_in, ffi.from_buffer(_FLOATS, x),
                        x.shape[0], ffi.from_buffer(_FLOATS, y), n_threads)
    if status:
        check(status)


def read_probe(buf, n_threads):
    """Reads the uint8 array buf (size a multiple of 64) on n_threads threads
    as matmul streams weights; returns the sum of its uint64 words mod 2^64."""
    out = ffi.new("uint64_t *")
    check(lib.matmul_read_probe(bytes_of(buf), buf.nbytes, check_threads(n_threads), out))
    return out[0]


def dequantize_rows(type_id, raw, stride, n_rows, n_in, ids, out):
    check(lib.matmul_dequantize_rows(type_id, rows_ptr(raw), stride, n_rows, n_in,
                                     ffi.cast("const int64_t *", ffi.from_buffer(ids)),
                                     ids.size, ffi.cast("float *", ffi.from_buffer(out))))


def kv_attend(type_k, k, type_v, v, n_rows, n_head_kv, head_dim, cells, lo, hi, q, scale,
              out, n_threads):
    status = lib.kv_attend(type_k, ffi.from_buffer(k), type_v, ffi.from_buffer(v), n_rows,
                           n_head_kv, head_dim, ffi.from_buffer(_I32S, cells), len(cells), len(q),
                           ffi.from_buffer(_I32S, lo), ffi.from_buffer(_I32S, hi),
                           ffi.from_buffer(_FLOATS, q), q.shape[1], float(scale),
                           ffi.from_buffer(_FLOATS, out), n_threads)
    if status:
        check(status)


def kv_rope_shift(type_id, layers, n_rows, n_head, head_dim, cells, delta, base, freq_scale,
                  neox):
    bufs = [bytes_of(a, True) for a in layers]
    check(lib.kv_rope_shift(type_id, ffi.new("uint8_t *[]", bufs), len(bufs), n_rows, n_head,
                            head_dim, int32s(cells), int32s(delta), len(cells), base, freq_scale,
                            1 if neox else 0))


KV_SEGMENT = lib.KV_SEGMENT
