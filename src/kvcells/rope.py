"""Rotary position embedding, in llama.cpp's two layouts.

NORM rotates the pairs (x[2i], x[2i+1]) (llama); NEOX rotates the pairs
(x[i], x[i + d/2]) (Gemma, GPT-NeoX). Pair i turns by pos * base^(-2i/d),
scaled by `freq_scale`. A rotation by p then by q equals one by p + q, which
is what re-rotating shifted K rows relies on.
"""
import numpy as np

NORM = "norm"
NEOX = "neox"


def rope(x, pos, base, mode, freq_scale=1.0):
    """Rotate x (n_tokens, n_heads, head_dim) by positions pos (n_tokens,)."""
    if mode not in (NORM, NEOX):
        raise ValueError(f"unknown RoPE mode {mode!r}")
    n_tokens, _, d = x.shape
    pos = np.asarray(pos, dtype=np.float64)
    if pos.shape != (n_tokens,):
        raise ValueError("rope: need one position per token")
    inv_freq = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angle = (pos * freq_scale)[:, None] * inv_freq[None, :]
    cos = np.cos(angle).astype(np.float32)[:, None, :]
    sin = np.sin(angle).astype(np.float32)[:, None, :]
    if mode == NORM:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : d // 2], x[..., d // 2:]
    ra = a * cos - b * sin
    rb = a * sin + b * cos
    out = np.empty_like(x, dtype=np.float32)
    if mode == NORM:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., : d // 2], out[..., d // 2:] = ra, rb
    return out
