"""Rotary position embedding, in llama.cpp's two layouts.

NORM rotates the pairs (x[2i], x[2i+1]) (llama); NEOX rotates the pairs
(x[i], x[i + d/2]) (Gemma, GPT-NeoX). Pair i turns by pos * base^(-2i/d),
scaled by `freq_scale`. A rotation by p then by q equals one by p + q, which
is what re-rotating shifted K rows relies on.
"""
import functools

import numpy as np

NORM = "norm"
NEOX = "neox"


def rope(x, pos, base, mode, freq_scale=1.0):
    """Rotate x (n_tokens, n_heads, head_dim) by positions pos (n_tokens,)."""
    if mode not in (NORM, NEOX):
        raise ValueError(f"unknown RoPE mode {mode!r}")
    pos = np.asarray(pos, dtype=np.float64)
    if pos.shape != (x.shape[0],):
        raise ValueError("rope: need one position per token")
    return apply_rope(x, *rope_tables(pos, base, x.shape[2], freq_scale), mode)


def rope_tables(pos, base, head_dim, freq_scale=1.0):
    """(cos, sin), float32 (n_tokens, 1, head_dim / 2), for apply_rope: a
    forward pass computes them once per RoPE base rather than once per layer."""
    angle = (np.asarray(pos, dtype=np.float64) * freq_scale)[:, None] * inv_freq(base, head_dim)
    return np.cos(angle).astype(np.float32)[:, None, :], np.sin(angle).astype(np.float32)[:, None, :]


@functools.lru_cache(maxsize=None)
def inv_freq(base, d):
    """Pair i's turn per position, base^(-2i/d), float64 (d / 2,)."""
    return base ** (-np.arange(0, d, 2, dtype=np.float64) / d)


def apply_rope(x, cos, sin, mode):
    """x (n_tokens, n_heads, head_dim) rotated by rope_tables' (cos, sin)."""
    d = x.shape[2]
    if mode == NORM:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : d // 2], x[..., d // 2:]
    out = np.empty_like(x, dtype=np.float32)
    ra, rb = (out[..., 0::2], out[..., 1::2]) if mode == NORM else (out[..., : d // 2],
                                                                     out[..., d // 2:])
    np.multiply(a, cos, out=ra)
    ra -= b * sin
    np.multiply(a, sin, out=rb)
    rb += b * cos
    return out
