"""The fused C ops against the plain numpy formulas."""
import numpy as np
import pytest

from kvcells.arch import rms_norm, rms_norm_rope_neox
from kvcells.rope import rope_tables


def numpy_rms_norm(x, w, eps):
    x64 = x.astype(np.float64)
    return x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("shape", [(1, 640), (7, 640), (3, 4, 256), (2, 1, 1), (0, 8)])
def test_rms_norm_matches_numpy(shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 50).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, numpy_rms_norm(x, w, 1e-6), rtol=2e-6, atol=1e-6)


def test_rms_norm_row_does_not_depend_on_its_batch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    whole = rms_norm(x, w, 1e-5)
    for r in range(9):
        assert np.array_equal(rms_norm(x[r:r + 1], w, 1e-5), whole[r:r + 1])


def test_rms_norm_zero_row_is_zero_and_eps_matters():
    w = np.ones(4, np.float32)
    assert np.array_equal(rms_norm(np.zeros((1, 4), np.float32), w, 1e-6), np.zeros((1, 4)))
    x = np.full((1, 4), 0.5, np.float32)   # mean square 0.25
    np.testing.assert_allclose(rms_norm(x, w, 0.75), x / 1.0, rtol=1e-7)


def test_rms_norm_accepts_non_contiguous_input():
    x = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    w = np.full(3, 2.0, np.float32)
    np.testing.assert_allclose(rms_norm(x, w, 0.0), numpy_rms_norm(x, w, 0.0), rtol=2e-6)


def test_rms_norm_rejects_a_mismatched_weight():
    with pytest.raises(ValueError):
        rms_norm(np.ones((2, 8), np.float32), np.ones(4, np.float32), 1e-6)
    with pytest.raises(ValueError):
        rms_norm(np.ones((2, 8), np.float32), np.ones(8, np.float64), 1e-6)


def numpy_rope_neox(x, pos, base):
    d = x.shape[-1]
    angle = pos[:, None].astype(np.float64) * base ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    a, b = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)


@pytest.mark.parametrize("n_tokens, n_heads, d", [(1, 4, 256), (5, 1, 256), (3, 2, 8), (0, 2, 8)])
def test_rms_norm_rope_neox_matches_numpy(n_tokens, n_heads, d):
    rng = np.random.default_rng(n_tokens * 100 + d)
    x = (rng.standard_normal((n_tokens, n_heads, d)) * 20).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    pos = rng.integers(0, 30000, n_tokens)
    y = rms_norm_rope_neox(x, w, 1e-6, *rope_tables(pos, 10000.0, d))
    want = numpy_rope_neox(numpy_rms_norm(x, w, 1e-6), pos, 10000.0)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_rms_norm_rope_neox_rejects_bad_sizes():
    x = np.ones((2, 3, 8), np.float32)
    cos, sin = rope_tables(np.arange(2), 10000.0, 8)
    with pytest.raises(ValueError):
        rms_norm_rope_neox(x, np.ones(4, np.float32), 1e-6, cos, sin)
    with pytest.raises(ValueError):
        rms_norm_rope_neox(x, np.ones(8, np.float32), 1e-6, cos[:1], sin[:1])
