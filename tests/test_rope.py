import numpy as np
import pytest

from kvcells.rope import NEOX, NORM, rope


def rope_by_hand(x, pos, base, mode):
    """Rotate each pair with an explicit 2x2 matrix, one token at a time."""
    out = x.astype(np.float64).copy()
    d = x.shape[-1]
    for t in range(x.shape[0]):
        for i in range(d // 2):
            theta = pos[t] * base ** (-2 * i / d)
            c, s = np.cos(theta), np.sin(theta)
            j, k = (2 * i, 2 * i + 1) if mode == NORM else (i, i + d // 2)
            a, b = x[t, :, j], x[t, :, k]
            out[t, :, j], out[t, :, k] = c * a - s * b, s * a + c * b
    return out


@pytest.mark.parametrize("mode", [NORM, NEOX])
def test_rope_matches_rotation_matrices(mode):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 8)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 4096])
    np.testing.assert_allclose(rope(x, pos, 10000.0, mode),
                               rope_by_hand(x, pos, 10000.0, mode), atol=1e-5)


@pytest.mark.parametrize("mode", [NORM, NEOX])
def test_rotations_compose(mode):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 2, 16)).astype(np.float32)
    p, q = np.array([3, 10, 50, 0]), np.array([5, -7, 200, 9])
    np.testing.assert_allclose(rope(rope(x, p, 1e6, mode), q, 1e6, mode),
                               rope(x, p + q, 1e6, mode), atol=1e-4)


def test_position_zero_is_identity_and_norms_are_kept():
    x = np.random.default_rng(2).standard_normal((3, 2, 8)).astype(np.float32)
    np.testing.assert_array_equal(rope(x, np.zeros(3), 1e4, NEOX), x)
    y = rope(x, np.array([1, 2, 3]), 1e4, NEOX)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_bad_arguments():
    x = np.zeros((2, 1, 4), np.float32)
    with pytest.raises(ValueError):
        rope(x, [0, 1], 1e4, "sideways")
    with pytest.raises(ValueError):
        rope(x, [0, 1, 2], 1e4, NORM)
