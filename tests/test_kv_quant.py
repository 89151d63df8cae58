"""K/V element types against gguf-py's reference quantisers and the formats' error bounds."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants

from kvcells import kv_quant

GGUF_TYPE = {"q8_0": QT.Q8_0, "q4_0": QT.Q4_0}


def sample_rows(seed, n_rows=64, n=256):
    """Rows mixing scales, signs, zero blocks, ties and exact half steps."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n)).astype(np.float32)
    x *= (10.0 ** rng.uniform(-4, 3, size=(n_rows, 1))).astype(np.float32)
    x[0, :32] = 0.0                                  # an all-zero block
    x[1, :32] = np.arange(32) - 16.0                 # negative extreme first
    x[2, 0], x[2, 1:32] = 127.0, np.arange(31) - 15.5  # q8_0 step 1: exact ties
    x[3, :32] = 3.0                                  # constant block
    x[4, :32] = -np.abs(x[4, :32])                   # all negative
    return x


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0"])
@pytest.mark.parametrize("seed", range(4))
def test_bytes_match_gguf_reference(type_name, seed):
    x = sample_rows(seed)
    ours = kv_quant.quantize(x, type_name)
    ref = quants.quantize(x, GGUF_TYPE[type_name])
    assert ours.shape == ref.shape == (len(x), kv_quant.row_bytes(type_name, x.shape[1]))
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(kv_quant.dequantize(ours, type_name, x.shape[1]),
                                  quants.dequantize(ref, GGUF_TYPE[type_name]))


def block_scales(raw, type_name):
    per_block = 34 if type_name == "q8_0" else 18
    b = raw.reshape(-1, per_block)
    return b[:, :2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)


@pytest.mark.parametrize("seed", range(4))
def test_q8_0_error_is_half_a_step(seed):
    x = sample_rows(seed)
    raw = kv_quant.quantize(x, "q8_0")
    err = np.abs(kv_quant.dequantize(raw, "q8_0", x.shape[1]) - x).reshape(-1, 32)
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)  # the exact step
    d16 = block_scales(raw, "q8_0")
    # half a step, plus what rounding the scale to f16 costs the largest code
    bound = 0.5 * d + 127 * np.abs(d16 - d) + 1e-6 * np.abs(blocks).max(axis=1, keepdims=True)
    assert np.all(err <= bound)


@pytest.mark.parametrize("seed", range(4))
def test_q4_0_error_is_half_a_step_except_the_clamped_code(seed):
    x = sample_rows(seed)
    raw = kv_quant.quantize(x, "q4_0")
    err = np.abs(kv_quant.dequantize(raw, "q4_0", x.shape[1]) - x).reshape(-1, 32)
    blocks = x.reshape(-1, 32)
    imax = np.abs(blocks).argmax(axis=1)[:, None]
    d = np.take_along_axis(blocks, imax, axis=1) / np.float32(-8)
    d16 = block_scales(raw, "q4_0")
    tiny = 1e-6 * np.abs(blocks).max(axis=1, keepdims=True)
    scale_err = 8 * np.abs(d16 - d)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d == 0, 0, blocks / d)
    # codes run from -8 to 7: values beyond 7.5 steps (the side opposite the
    # largest magnitude) clamp to 7 and may be off by up to one full step
    clamped = t > 7.5
    half = 0.5 * np.abs(d) + scale_err + tiny
    full = 1.0 * np.abs(d) + scale_err + tiny
    assert np.all(err[~clamped] <= np.broadcast_to(half, err.shape)[~clamped])
    assert np.all(err[clamped] <= np.broadcast_to(full, err.shape)[clamped])
    assert clamped.any()  # the sample does exercise the clamp


def test_f16_and_f32():
    x = sample_rows(7)
    np.testing.assert_array_equal(kv_quant.dequantize(kv_quant.quantize(x, "f32"), "f32", 256), x)
    back = kv_quant.dequantize(kv_quant.quantize(x, "f16"), "f16", 256)
    np.testing.assert_array_equal(back, x.astype(np.float16).astype(np.float32))


def test_row_bytes_follow_ggml_block_sizes():
    assert kv_quant.row_bytes("f32", 256) == 1024
    assert kv_quant.row_bytes("f16", 256) == 512
    assert kv_quant.row_bytes("q8_0", 256) == 8 * 34
    assert kv_quant.row_bytes("q4_0", 256) == 8 * 18
    for t in ("q8_0", "q4_0"):
        assert kv_quant.row_bytes(t, 256) == quants.quant_shape_to_byte_shape((256,), GGUF_TYPE[t])[0]


def test_bad_arguments():
    with pytest.raises(ValueError):
        kv_quant.row_bytes("q5_0", 32)
    with pytest.raises(ValueError):
        kv_quant.quantize(np.zeros((2, 40), np.float32), "q8_0")
    with pytest.raises(ValueError):
        kv_quant.dequantize(np.zeros((2, 33), np.uint8), "q8_0", 32)
