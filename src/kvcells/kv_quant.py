"""Element types of the K/V storage: f32, f16 and GGML's q8_0 and q4_0 blocks.

A quantised row is a run of blocks of 32 values, each block an f16 scale `d`
followed by the codes (GGML's byte layout, so a row is what ggml would store):
  q8_0: 2 + 32 bytes, x = d * q with q int8 in [-127, 127], d = amax / 127
  q4_0: 2 + 16 bytes, x = d * (q - 8) with q in [0, 15], d = max / -8 where
        max is the value of largest magnitude; byte j holds q[j] in its low
        nibble and q[j + 16] in its high nibble.
Quantising is csrc/quants.c (quant_quantize), rounding as ggml's reference
quantisers do (half away from zero for q8_0, truncation of x/d + 8.5 clamped
to 15 for q4_0); widening is numpy.
"""
import numpy as np

from . import native
from .native import KV_TYPES as TYPES

BLOCK = 32
_BLOCK_BYTES = {"q8_0": 2 + BLOCK, "q4_0": 2 + BLOCK // 2}


def check_type(type_name):
    if type_name not in TYPES:
        raise ValueError(f"unknown K/V type {type_name!r}, expected one of {TYPES}")
    return type_name


def row_bytes(type_name, n):
    """Bytes of one row of n values stored as type_name."""
    check_type(type_name)
    if type_name == "f32":
        return 4 * n
    if type_name == "f16":
        return 2 * n
    if n % BLOCK:
        raise ValueError(f"{type_name} needs a row length divisible by {BLOCK}, got {n}")
    return n // BLOCK * _BLOCK_BYTES[type_name]


def quantize(x, type_name):
    """float32 (..., n) -> uint8 (..., row_bytes(type_name, n))."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    lead, n = x.shape[:-1], x.shape[-1]
    nbytes = row_bytes(type_name, n)
    if type_name == "f32":
        return x.view(np.uint8).reshape(*lead, nbytes)
    if type_name == "f16":
        return x.astype(np.float16).view(np.uint8).reshape(*lead, nbytes)
    out = np.empty((*lead, nbytes), np.uint8)
    if out.size == 0:
        return out
    native.quantize(native.kv_type_id(type_name), x, out)
    return out


def dequantize(raw, type_name, n):
    """uint8 (..., row_bytes(type_name, n)) -> float32 (..., n)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    lead = raw.shape[:-1]
    if raw.shape[-1] != row_bytes(type_name, n):
        raise ValueError(f"{type_name} row of {n} values needs {row_bytes(type_name, n)} "
                         f"bytes, got {raw.shape[-1]}")
    if type_name == "f32":
        return raw.view(np.float32).reshape(*lead, n).copy()
    if type_name == "f16":
        return raw.view(np.float16).astype(np.float32).reshape(*lead, n)
    blocks = raw.reshape(-1, _BLOCK_BYTES[type_name])
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if type_name == "q8_0":
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
    else:
        nib = blocks[:, 2:]
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=1).astype(np.float32) - 8.0
    return (d * q).reshape(*lead, n)
