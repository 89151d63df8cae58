"""The K/V memory against independent truths: naive dense attention over the
table's kq_mask, attention recomputed from scratch at shifted positions, the
size formula of docs/architecture.md, and a plain model of which tokens each sequence holds
(hypothesis state machine at the end)."""
import copy
import struct
import zlib

import numpy as np
import pytest
from cells_reference import RefCells, is_masked_swa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvcells import CacheFullError, KVCellsError, StateError, kv_quant, native
from kvcells.cache import ISWACache, KVCache
from kvcells.rope import NEOX, NORM, rope

TYPES = ["f32", "f16", "q8_0", "q4_0"]
N_HEAD_KV, HEAD_DIM, N_HEAD = 2, 32, 4
SCALE = HEAD_DIM ** -0.5


def rows(seed, n, n_heads=N_HEAD_KV):
    return np.random.default_rng(seed).standard_normal((n, n_heads, HEAD_DIM)).astype(np.float32)


def naive_attention(q, k, v, mask, scale):
    """Dense softmax(q.K^T * scale + mask).V in float64, GQA by head // g."""
    g = q.shape[1] // k.shape[1]
    out = np.zeros(q.shape)
    for t in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = k[:, h // g].astype(np.float64) @ q[t, h] * scale + mask[t]
            if np.isneginf(s).all():
                continue
            p = np.exp(s - s.max())
            out[t, h] = p / p.sum() @ v[:, h // g]
    return out


def dense(cache, layer):
    """Every cell's K and V, widened to float32."""
    n = N_HEAD_KV * HEAD_DIM
    k = kv_quant.dequantize(cache.k[layer], cache.type_k, n)
    v = kv_quant.dequantize(cache.v[layer], cache.type_v, n)
    return k.reshape(-1, N_HEAD_KV, HEAD_DIM), v.reshape(-1, N_HEAD_KV, HEAD_DIM)


def place(mem, pos, seq_ids, layers, seed):
    """Place one ubatch and store random K/V for it in `layers`."""
    pos = np.asarray(pos, dtype=np.int32)
    slot, = mem.prepare([(pos, seq_ids)])
    mem.apply(slot, pos, seq_ids)
    for il in layers:
        mem.store(il, rows(seed + 1000 * il, len(pos)), rows(seed + 1000 * il + 1, len(pos)))


def decode(mem, pos, seq_ids, layers, seed):
    """place(), then attend in each layer; returns {layer: (q, out)}."""
    place(mem, pos, seq_ids, layers, seed)
    result = {}
    for il in layers:
        q = rows(seed + 1000 * il + 2, len(pos), N_HEAD)
        result[il] = q, mem.attend(il, q, SCALE)
    return result


def reference_mask(table, pos, seq_ids, n_kv):
    """The attention mask by the reference's rule over the cells the table
    holds: 0 where a token (its first sequence) may see cell j, else -inf."""
    ref = RefCells(table.n_cells, table.n_seq_max, table.n_swa, table.swa_type)
    ref.pos = [table.pos(j) for j in range(table.n_cells)]
    ref.seq = [set(table.seqs(j)) for j in range(table.n_cells)]
    firsts = [s[0] if isinstance(s, (list, tuple)) else s for s in seq_ids]
    return np.where(ref.kq_mask(pos, firsts, n_kv), 0.0, -np.inf).astype(np.float32)


def check_against_mask(cache, pos, seq_ids, result, atol=1e-5):
    """attend() equals naive attention over all cells with the reference's mask."""
    mask = reference_mask(cache.table, pos, seq_ids, cache.n_cells)
    for il, (q, out) in result.items():
        k, v = dense(cache, il)
        np.testing.assert_allclose(out, naive_attention(q, k, v, mask, SCALE), atol=atol)


def fill_shared_prefix(mem, layers, n_prompt=6):
    """Seq 0 gets a prompt; seqs 1 and 2 share its first cells (seq_cp), then
    each decodes on its own; returns the number of tokens placed."""
    decode(mem, np.arange(n_prompt), [[0]] * n_prompt, layers, 1)
    mem.seq_cp(0, 1, 0, 4)
    mem.seq_cp(0, 2)
    decode(mem, [4, 5, n_prompt], [[1], [1], [2]], layers, 2)
    return n_prompt + 3


@pytest.mark.parametrize("type_k,type_v", [(t, t) for t in TYPES] + [("q8_0", "f16")])
def test_attend_matches_dense_masked_attention(type_k, type_v, simd_path):
    mem = KVCache(40, 3, [0, 3], N_HEAD_KV, HEAD_DIM, type_k, type_v)
    fill_shared_prefix(mem, [0, 3])
    # one ubatch mixing sequences, one token in two sequences at once
    pos = np.array([7, 8, 6, 7, 9])
    seqs = [[1], [1], [0, 2], [2], [0]]
    result = decode(mem, pos, seqs, [0, 3], 3)
    check_against_mask(mem, pos, seqs, result)


@pytest.mark.parametrize("swa_type", ["standard", "chunked", "symmetric"])
def test_sliding_window_attend_matches_dense(swa_type):
    mem = KVCache(24, 2, [0], N_HEAD_KV, HEAD_DIM, "f32", "f32", n_swa=5, swa_type=swa_type)
    nxt = [0, 0]
    for step in range(14):       # far beyond the cells: masked cells get reused
        seqs = [[step % 2], [step % 2]] if step % 3 else [[0], [1]]
        pos = []
        for (s,) in seqs:
            pos.append(nxt[s])
            nxt[s] += 1
        result = decode(mem, pos, seqs, [0], 10 + step)
        check_against_mask(mem, pos, seqs, result)
    assert mem.table.used <= 24


def test_many_sequences_decoding_on_two_threads_matches_dense():
    """Enough work (20 sequences x 500 cells x 2 kv heads) for kv_attend to
    split the tokens over two threads."""
    mem = KVCache(20 * 501, 20, [0], N_HEAD_KV, HEAD_DIM, "f16", "q8_0")
    mem.n_threads = 2
    for s in range(20):
        place(mem, np.arange(500), [[s]] * 500, [0], s)
    pos, seqs = [500] * 20, [[s] for s in range(20)]
    result = decode(mem, pos, seqs, [0], 99)
    check_against_mask(mem, pos, seqs, result)


@pytest.mark.parametrize("head_dim,n_head", [(40, 4), (48, 6), (16, 2)])
def test_any_head_dim_and_group_size(head_dim, n_head, simd_path):
    """head_dim not a multiple of 16 takes the plain loops; query heads
    grouped by 4 and then one at a time (6 over 2 kv heads: 3 per kv head)."""
    mem = KVCache(32, 2, [0], 2, head_dim, "f16", "f32")
    rng = np.random.default_rng(head_dim)
    pos, seqs = np.arange(10), [[0]] * 6 + [[1]] * 4
    slot, = mem.prepare([(pos, seqs)])
    mem.apply(slot, pos, seqs)
    k, v = rng.standard_normal((2, 10, 2, head_dim)).astype(np.float32)
    mem.store(0, k, v)
    q = rng.standard_normal((10, n_head, head_dim)).astype(np.float32)
    out = mem.attend(0, q, 0.3)
    mask = reference_mask(mem.table, pos, seqs, 32)
    kd = kv_quant.dequantize(mem.k[0], "f16", 2 * head_dim).reshape(32, 2, head_dim)
    vd = kv_quant.dequantize(mem.v[0], "f32", 2 * head_dim).reshape(32, 2, head_dim)
    np.testing.assert_allclose(out, naive_attention(q, kd, vd, mask, 0.3), atol=1e-5)


def test_one_long_sequence_split_over_threads_matches_dense(simd_path):
    """Two (token, kv head) items of 17000 cells on three threads: each item's
    cells are split in parts whose partial softmax sums are merged."""
    mem = KVCache(17100, 2, [0], N_HEAD_KV, HEAD_DIM, "q8_0", "f16")
    mem.n_threads = 4
    for start in range(0, 17000, 4250):
        place(mem, np.arange(start, start + 4250), [[0]] * 4250, [0], start)
    result = decode(mem, [17000], [[0]], [0], 2)
    check_against_mask(mem, [17000], [[0]], result)


@pytest.mark.parametrize("swa_type", ["none", "standard", "chunked", "symmetric"])
@pytest.mark.parametrize("type_k", ["f32", "q8_0"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_prompt_ubatch_matches_dense(swa_type, type_k, n_threads, simd_path):
    """A prompt of one sequence (spanning several blocks of query tokens and
    chunks of cells) next to single tokens and a short prompt of others, in
    one ubatch; enough work for two threads."""
    mem = KVCache(400, 3, [0], N_HEAD_KV, HEAD_DIM, type_k, "f16", n_swa=100,
                  swa_type=swa_type)
    mem.n_threads = n_threads
    decode(mem, np.arange(60), [[0]] * 60, [0], 1)
    decode(mem, np.arange(5), [[1]] * 5, [0], 2)
    pos = np.concatenate([np.arange(60, 250), [5, 6], np.arange(50)])
    seqs = [[0]] * 190 + [[1], [1, 2]] + [[2]] * 50
    result = decode(mem, pos, seqs, [0], 3)
    check_against_mask(mem, pos, seqs, result)


@pytest.mark.parametrize("swa_type", ["none", "standard"])
def test_a_token_gets_the_same_bits_in_any_ubatch(swa_type, simd_path):
    """The tiled path (the default): a token's attention is bit-identical
    whether it comes in one prompt ubatch, alone, or next to other sequences
    in ubatches cut differently, in other cells, on 1 or 2 threads (what
    "decoding through the cache equals recomputing" relies on)."""
    n = 90
    k, v = rows(1, n), rows(2, n)
    q = rows(3, n, N_HEAD)

    def run(chunks, others, n_threads, n_cells=2600):
        mem = KVCache(n_cells, 3, [0], N_HEAD_KV, HEAD_DIM, "f16", "f16", n_swa=40,
                      swa_type=swa_type)
        mem.n_threads = n_threads
        if others:
            place(mem, np.arange(37), [[1]] * 37, [0], 9)
        out, p = [], 0
        for c in chunks:
            pos = list(range(p, p + c)) + list(range(p, p + others))
            seqs = [[2]] * c + [[0]] * others   # seq 0's cells come first in the list
            slot, = mem.prepare([(pos, seqs)])
            mem.apply(slot, pos, seqs)
            mem.store(0, np.concatenate([k[p:p + c], rows(p + 50, others)]),
                      np.concatenate([v[p:p + c], rows(p + 60, others)]))
            qq = np.concatenate([q[p:p + c], rows(p + 70, others, N_HEAD)])
            out.append(mem.attend(0, qq, SCALE)[:c])
            p += c
        return np.concatenate(out)

    whole = run([n], 0, 1)
    np.testing.assert_array_equal(run([n], 0, 2), whole)
    np.testing.assert_array_equal(run([1] * n, 0, 2), whole)
    np.testing.assert_array_equal(run([5, 1, 30, 1, 50, 3], 3, 2), whole)
    np.testing.assert_array_equal(run([33, 1, 56], 2, 1), whole)
    if swa_type == "standard":   # a small window cache that reuses cells
        np.testing.assert_array_equal(run([8] * 11 + [1, 1], 0, 1, n_cells=50), whole)
    if swa_type == "none":   # rows longer than a segment (2048 cells) of the tiled path
        n = 2300
        k, v, q = rows(4, n), rows(5, n), rows(6, n, N_HEAD)
        whole = run([n], 0, 2)
        np.testing.assert_array_equal(run([2040, 1, 1, 258], 3, 2), whole)
        np.testing.assert_array_equal(run([1000, 1300], 0, 1), whole)


def test_kv_attend_any_ranges_matches_naive(simd_path):
    """kv_attend straight from C's view: any cell list, any per-token ranges
    (empty, nested, disjoint, overlapping in no order, across the tiled
    path's 2048-cell segments), 1, 2 and 5 threads."""
    rng = np.random.default_rng(11)
    n_rows, n_list, n_tokens, g = 300, 5000, 70, 3
    k, v = rng.standard_normal((2, n_rows, N_HEAD_KV, HEAD_DIM)).astype(np.float32)
    q = rng.standard_normal((n_tokens, N_HEAD_KV * g, HEAD_DIM)).astype(np.float32)
    cells = rng.integers(0, n_rows, n_list).astype(np.int32)
    lo = rng.integers(0, n_list, n_tokens).astype(np.int32)
    hi = np.minimum(lo + rng.integers(0, 3000, n_tokens), n_list).astype(np.int32)
    lo[20:40], hi[20:40] = np.arange(20), np.arange(4400, 4420)   # a sliding run
    lo[5], hi[5] = 7, 7
    out = np.empty_like(q)
    for n_threads in (1, 2, 5):
        out[:] = np.nan
        f32 = native.TYPES["F32"]
        native.kv_attend(f32, k, f32, v, n_rows, N_HEAD_KV, HEAD_DIM, cells, lo, hi, q, 0.2,
                         out, n_threads)
        for t in range(n_tokens):
            ref = np.zeros((1, N_HEAD_KV * g, HEAD_DIM))
            if hi[t] > lo[t]:
                # a cell listed twice counts twice: attend the list, not the set
                sel = cells[lo[t]:hi[t]]
                ref = naive_attention(q[t:t + 1], k[sel], v[sel], np.zeros((1, len(sel))), 0.2)
            np.testing.assert_allclose(out[t], ref[0], atol=1e-5)


@pytest.mark.parametrize("n_new", [1, 6])
def test_attention_reads_only_the_sequence_own_cells(n_new):
    """Rows of other sequences and of unused cells are NaN: a read of any of
    them would turn the output into NaN (a decode step and a short prompt)."""
    mem = KVCache(64, 3, [0], N_HEAD_KV, HEAD_DIM, "f16", "f16")
    decode(mem, np.arange(20), [[1]] * 20, [0], 5)
    decode(mem, np.arange(6), [[0]] * 6, [0], 6)
    decode(mem, np.arange(10), [[2]] * 10, [0], 7)
    mine = mem.table.seq_cells(0)[0]
    poison = np.setdiff1d(np.arange(64), mine)
    k_nan = kv_quant.quantize(np.full((len(poison), N_HEAD_KV * HEAD_DIM), np.nan), "f16")
    mem.k[0][poison] = k_nan
    mem.v[0][poison] = k_nan
    pos, seqs = np.arange(6, 6 + n_new), [[0]] * n_new
    result = decode(mem, pos, seqs, [0], 8)
    assert np.isfinite(result[0][1]).all()
    hidden = np.setdiff1d(np.arange(64), mem.table.seq_cells(0)[0])
    mem.k[0][hidden] = 0   # the truth needs finite numbers where the mask hides them
    mem.v[0][hidden] = 0
    check_against_mask(mem, pos, seqs, result)


@pytest.mark.parametrize("mode", [NORM, NEOX])
@pytest.mark.parametrize("type_k,atol", [("f32", 2e-5), ("f16", 3e-3), ("q8_0", 4e-2)])
def test_k_shift_equals_recomputation_at_new_positions(mode, type_k, atol):
    """K stored at old positions, shifted by seq_add/seq_div, attends like K
    computed from scratch at the new positions (per-layer RoPE base)."""
    bases = {0: 10000.0, 1: 1e6}
    kw = dict(rope_base=bases, rope_mode=mode, rope_freq_scale=0.5)
    shifted = KVCache(32, 1, [0, 1], N_HEAD_KV, HEAD_DIM, type_k, "f32", **kw)
    fresh = KVCache(32, 1, [0, 1], N_HEAD_KV, HEAD_DIM, type_k, "f32", **kw)
    n = 12
    old = np.arange(n)
    new = old.copy()
    new[3:] += 7              # seq_add(0, 3, 100, 7)
    new = np.where((new >= 10) & (new < 30), new // 3, new)   # seq_div(0, 10, 30, 3)
    k_raw = {il: rows(20 + il, n) for il in bases}
    v = {il: rows(30 + il, n) for il in bases}

    def fill(mem, pos):
        slot, = mem.prepare([(pos, [[0]] * n)])
        mem.apply(slot, pos, [[0]] * n)
        for il in bases:
            mem.store(il, rope(k_raw[il], pos, bases[il], mode, 0.5), v[il])

    fill(shifted, old)
    shifted.seq_add(0, 3, 100, 7)
    shifted.seq_div(0, 10, 30, 3)
    fill(fresh, new)
    p_next = int(new.max()) + 1
    for mem in (shifted, fresh):
        assert mem.seq_pos_max(0) == p_next - 1
    a = decode(shifted, [p_next], [[0]], [0, 1], 40)
    b = decode(fresh, [p_next], [[0]], [0, 1], 40)
    for il in bases:
        np.testing.assert_allclose(a[il][1], b[il][1], atol=atol)


@pytest.mark.parametrize("mode", [NORM, NEOX])
@pytest.mark.parametrize("type_k", TYPES)
def test_k_shift_rows_equal_numpy_rope(mode, type_k, simd_path):
    """The C re-rotation gives the bytes of widening, kvcells.rope.rope by each
    cell's shift and quantising again, per layer with its base."""
    bases = {0: 1e4, 1: 1e6, 2: 1e4}
    mem = KVCache(64, 2, [0, 1, 2], N_HEAD_KV, HEAD_DIM, type_k, "f16", rope_base=bases,
                  rope_mode=mode, rope_freq_scale=0.5)
    place(mem, np.arange(40), [[0]] * 20 + [[1]] * 20, [0, 1, 2], 5)
    before = {il: mem.k[il].copy() for il in bases}
    pos0 = {s: dict(zip(*mem.table.seq_cells(s))) for s in (0, 1)}
    mem.seq_add(0, 5, -1, 1000)
    mem.seq_div(1, 24, 36, 3)
    delta = np.zeros(64, np.int64)
    for s in (0, 1):
        for cell, p in zip(*mem.table.seq_cells(s)):
            delta[cell] = p - pos0[s][cell]
    moved = np.nonzero(delta)[0]
    assert len(moved) == 15 + 12
    n = N_HEAD_KV * HEAD_DIM
    for il, base in bases.items():
        k = kv_quant.dequantize(before[il][moved], type_k, n).reshape(len(moved), N_HEAD_KV, -1)
        want = before[il].copy()
        want[moved] = kv_quant.quantize(
            rope(k, delta[moved], base, mode, 0.5).reshape(len(moved), n), type_k)
        np.testing.assert_array_equal(mem.k[il], want)


def test_iswa_k_shift_uses_each_half_rope():
    kw = dict(rope_base=1e4, rope_base_swa=50.0, rope_freq_scale=0.25, rope_freq_scale_swa=1.0)
    rot = {0: (1e4, 0.25), 1: (50.0, 1.0)}
    old, new = np.arange(8), np.r_[0:3, 8:13]
    mems = []
    for pos in (old, new):
        mem = ISWACache(300, 1, 8, [False, True], N_HEAD_KV, HEAD_DIM, "f32", "f32",
                        n_swa=16, **kw)
        slot, = mem.prepare([(pos, [[0]] * 8)])
        mem.apply(slot, pos, [[0]] * 8)
        for il, (base, fs) in rot.items():
            mem.store(il, rope(rows(il, 8), pos, base, NEOX, fs), rows(il + 5, 8))
        mems.append(mem)
    mems[0].seq_add(0, 3, -1, 5)
    a, b = (decode(m, [13], [[0]], [0, 1], 7) for m in mems)
    for il in rot:
        np.testing.assert_allclose(a[il][1], b[il][1], atol=2e-5)


@pytest.mark.parametrize("type_k", TYPES)
def test_defrag_keeps_attention_identical(type_k):
    def build():
        mem = KVCache(48, 3, [0, 1], N_HEAD_KV, HEAD_DIM, type_k, type_k)
        fill_shared_prefix(mem, [0, 1])
        decode(mem, np.arange(10), [[1]] * 3 + [[2]] * 7, [0, 1], 9)  # oddly mixed seqs
        mem.seq_rm(1, 2, 5)
        mem.seq_rm(0, 0, 3)
        return mem

    mem, twin = build(), build()
    used = mem.table.used
    mem.defrag()
    assert mem.table.used_max_p1 == used
    for s in range(3):
        np.testing.assert_array_equal(mem.table.seq_cells(s)[1], twin.table.seq_cells(s)[1])
    pos, seqs = [20, 21, 30], [[0], [1], [2]]
    a = decode(mem, pos, seqs, [0, 1], 50)
    b = decode(twin, pos, seqs, [0, 1], 50)
    for il in (0, 1):
        np.testing.assert_array_equal(a[il][1], b[il][1])


BYTES_PER_ELEMENT = {"f32": 4, "f16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}


@pytest.mark.parametrize("type_k,type_v", [(t, t) for t in TYPES] + [("f16", "q4_0")])
def test_kv_bytes_is_the_design_formula_and_what_is_allocated(type_k, type_v):
    n_layer, n_head_kv, head_dim, n_cells = 3, 2, 64, 100
    mem = KVCache(n_cells, 2, n_layer, n_head_kv, head_dim, type_k, type_v)
    per_token = n_layer * n_head_kv * head_dim * (BYTES_PER_ELEMENT[type_k]
                                                  + BYTES_PER_ELEMENT[type_v])
    assert mem.kv_bytes == per_token * n_cells
    assert mem.kv_bytes == sum(a.nbytes for a in [*mem.k.values(), *mem.v.values()])
    # Gemma 3 270M shapes: 18 x 1 x 256 x 2 x 2 = 18,432 bytes per token in f16
    gemma = KVCache(10, 1, 18, 1, 256, "f16", "f16")
    assert gemma.kv_bytes == 18432 * 10


def test_iswa_sizes_and_bytes():
    swa_layers = [True] * 5 + [False]
    mem = ISWACache(4096, 4, 512, swa_layers, 1, 256, "q8_0", "q8_0", n_swa=512)
    # llama.cpp: the window of every sequence plus a ubatch, padded to 256
    assert mem.swa.n_cells == 2560 and mem.base.n_cells == 4096
    per_cell = 2 * 256 * 34 / 32
    assert mem.kv_bytes == per_cell * (5 * 2560 + 1 * 4096)
    small = ISWACache(300, 1, 8, swa_layers, 1, 256, n_swa=512)
    assert small.swa.n_cells == 300


def test_q8_0_and_q4_0_attention_stay_close_to_f32():
    """Quantised K/V change the attention output by no more than a stated
    tolerance. Unit-normal K, V and q over 257 cells give outputs of up to
    ~0.3; q8_0 (steps of 1/127 of a block's largest value) stays within
    0.01 of f32 (measured 0.0023), q4_0 (steps of 1/8) within 0.1
    (measured 0.028)."""
    outs = {}
    for t in ("f32", "q8_0", "q4_0"):
        mem = KVCache(300, 1, [0], N_HEAD_KV, HEAD_DIM, t, t)
        decode(mem, np.arange(256), [[0]] * 256, [0], 60)
        outs[t] = decode(mem, [256], [[0]], [0], 61)[0][1]
    assert np.abs(outs["q8_0"] - outs["f32"]).max() < 0.01
    assert np.abs(outs["q4_0"] - outs["f32"]).max() < 0.1


def snapshot(mem):
    halves = mem.halves if isinstance(mem, ISWACache) else (mem,)
    return [h.table.to_bytes() for h in halves] + [mem.state_bytes()]


def test_prepare_leaves_the_tables_as_they_were_and_plans_in_order():
    mem, ref = KVCache(64, 2, [0], N_HEAD_KV, HEAD_DIM), RefCells(64, 2)
    decode(mem, np.arange(5), [[0]] * 5, [0], 1)
    ref.apply_ubatch(ref.find_slot(5), list(range(5)), [[0]] * 5)
    mem.seq_rm(0, 1, 3)       # holes are reused by the plan
    ref.seq_rm(0, 1, 3)
    before = snapshot(mem)
    ubatches = [(np.arange(5, 9), [[0]] * 4), (np.arange(4), [[1]] * 4),
                (np.arange(9, 12), [[0], [0], [0]])]
    slots = mem.prepare(ubatches)
    assert snapshot(mem) == before
    for (pos, seqs), slot in zip(ubatches, slots):
        expected = ref.find_slot(len(pos))
        np.testing.assert_array_equal(slot, expected)
        ref.apply_ubatch(expected, list(pos), seqs)
        mem.apply(slot, pos, seqs)
    assert sorted(mem.table.seq_cells(1)[1]) == [0, 1, 2, 3]


def test_cache_full_changes_nothing():
    mem = KVCache(8, 1, [0], N_HEAD_KV, HEAD_DIM)
    decode(mem, np.arange(6), [[0]] * 6, [0], 1)
    before = snapshot(mem)
    with pytest.raises(CacheFullError):
        mem.prepare([(np.arange(6, 8), [[0]] * 2), (np.arange(8, 10), [[0]] * 2)])
    assert snapshot(mem) == before


def test_iswa_ubatch_that_fits_one_half_only_changes_neither():
    swa_layers = [False, True]
    # the sliding-window half (256 cells) cannot take 300 new tokens at once
    mem = ISWACache(1024, 1, 8, swa_layers, N_HEAD_KV, HEAD_DIM, n_swa=4)
    assert mem.swa.n_cells == 256
    before = snapshot(mem)
    with pytest.raises(CacheFullError):
        mem.prepare([(np.arange(300), [[0]] * 300)])
    assert snapshot(mem) == before
    # the full half runs out first when the window half reuses its cells
    mem = ISWACache(256, 1, 8, swa_layers, N_HEAD_KV, HEAD_DIM, n_swa=4)
    for start in range(0, 256, 64):
        decode(mem, np.arange(start, start + 64), [[0]] * 64, [0, 1], start)
    mem.swa.prepare([([256], [[0]])])  # the window half alone would take it
    before = snapshot(mem)
    with pytest.raises(CacheFullError):
        mem.prepare([([256], [[0]])])
    assert snapshot(mem) == before


def test_iswa_apply_of_a_stale_slot_changes_neither_half():
    mem = ISWACache(300, 2, 8, [False, True], N_HEAD_KV, HEAD_DIM, n_swa=4)
    decode(mem, np.arange(3), [[0]] * 3, [0, 1], 1)
    slot, = mem.prepare([([3], [[0]])])
    mem.swa.table.apply_ubatch(slot[1], [0], [[0, 1]])   # the window half moved on
    before = snapshot(mem)
    with pytest.raises(ValueError):
        mem.apply(slot, [3], [[0]])
    assert snapshot(mem) == before


def test_iswa_routes_layers_and_reuses_window_cells():
    swa_layers = [False, True, True]
    mem = ISWACache(600, 1, 16, swa_layers, N_HEAD_KV, HEAD_DIM, "f32", "f32", n_swa=8)
    assert mem.swa.n_cells == 256
    for start in range(0, 560, 16):
        pos = np.arange(start, start + 16)
        result = decode(mem, pos, [[0]] * 16, [0, 1, 2], start)
        check_against_mask(mem.base, pos, [[0]] * 16, {0: result[0]})
        check_against_mask(mem.swa, pos, [[0]] * 16, {il: result[il] for il in (1, 2)})
    assert mem.base.table.used == 560 and mem.swa.table.used <= 256
    assert mem.seq_pos_max(0) == 559 and mem.seq_pos_min(0) > 0


# ---- state ----

def test_whole_state_round_trip_is_bit_exact():
    mem = KVCache(48, 3, [0, 2], N_HEAD_KV, HEAD_DIM, "q8_0", "f16")
    fill_shared_prefix(mem, [0, 2])
    mem.seq_rm(0, 1, 2)
    saved = mem.state_bytes()
    other = KVCache(48, 3, [0, 2], N_HEAD_KV, HEAD_DIM, "q8_0", "f16")
    decode(other, np.arange(3), [[2]] * 3, [0, 2], 70)   # whatever was there goes
    other.load_state_bytes(saved)
    assert other.state_bytes() == saved
    assert other.table.to_bytes() == mem.table.to_bytes()
    a = decode(mem, [6], [[0]], [0, 2], 71)
    b = decode(other, [6], [[0]], [0, 2], 71)
    for il in (0, 2):
        np.testing.assert_array_equal(a[il][1], b[il][1])


def test_sequence_state_loads_into_a_partly_used_cache_under_another_id():
    src = KVCache(48, 3, [0], N_HEAD_KV, HEAD_DIM, "f16", "f16")
    fill_shared_prefix(src, [0])
    saved = src.state_bytes(1)            # seq 1: 4 shared cells + 2 of its own
    dst = KVCache(32, 2, [0], N_HEAD_KV, HEAD_DIM, "f16", "f16")
    decode(dst, np.arange(7), [[0]] * 7, [0], 80)
    decode(dst, np.arange(3), [[1]] * 3, [0], 81)   # replaced by the load
    seq0 = dst.table.seq_cells(0)
    dst.load_state_bytes(saved, seq_id=1)
    np.testing.assert_array_equal(dst.table.seq_cells(0)[1], seq0[1])
    idxs, pos = dst.table.seq_cells(1)
    np.testing.assert_array_equal(pos, src.table.seq_cells(1)[1])
    a = decode(src, [6], [[1]], [0], 82)
    b = decode(dst, [6], [[1]], [0], 82)
    np.testing.assert_array_equal(a[0][1], b[0][1])


def test_iswa_state_round_trip():
    mem = ISWACache(300, 2, 8, [False, True], N_HEAD_KV, HEAD_DIM, n_swa=4)
    decode(mem, np.arange(12), [[0]] * 12, [0, 1], 90)
    decode(mem, np.arange(3), [[1]] * 3, [0, 1], 91)
    whole, seq0 = mem.state_bytes(), mem.state_bytes(0)
    other = ISWACache(300, 2, 8, [False, True], N_HEAD_KV, HEAD_DIM, n_swa=4)
    other.load_state_bytes(whole)
    assert other.state_bytes() == whole
    third = ISWACache(300, 2, 8, [False, True], N_HEAD_KV, HEAD_DIM, n_swa=4)
    third.load_state_bytes(seq0, seq_id=1)
    assert third.seq_pos_max(1) == 11
    # the window half saves only what the window can still see (llama.cpp):
    # a token at 12 sees 9..12
    assert list(third.swa.table.seq_cells(1)[1]) == [9, 10, 11]
    assert len(third.base.table.seq_cells(1)[0]) == 12
    a = decode(mem, [12], [[0]], [0, 1], 92)
    b = decode(third, [12], [[1]], [0, 1], 92)
    for il in (0, 1):
        np.testing.assert_array_equal(a[il][1], b[il][1])


def corruptions(b):
    yield b[:-1]                                   # truncated
    yield b[: len(b) // 2]
    yield b""
    flipped = bytearray(b)
    flipped[len(b) // 2] ^= 0x10                  # a flipped bit
    yield bytes(flipped)
    yield b + b"\0"                                # trailing data


@pytest.mark.parametrize("make", [
    lambda: KVCache(32, 2, [0], N_HEAD_KV, HEAD_DIM, "q8_0", "q8_0"),
    lambda: ISWACache(300, 2, 8, [False, True], N_HEAD_KV, HEAD_DIM, "q8_0", "q8_0", n_swa=4),
])
def test_bad_states_raise_state_error_and_change_nothing(make):
    mem = make()
    decode(mem, np.arange(5), [[0]] * 5, [0], 100)
    for seq_id in (None, 0):
        good = mem.state_bytes(seq_id)
        target = make()
        decode(target, np.arange(4), [[1]] * 4, [0], 101)
        before = snapshot(target)
        for bad in corruptions(good):
            with pytest.raises(StateError):
                target.load_state_bytes(bad, seq_id)
            assert snapshot(target) == before
    if isinstance(mem, ISWACache):
        return
    for other in (KVCache(32, 2, [0], N_HEAD_KV, HEAD_DIM, "f16", "q8_0"),     # type
                  KVCache(32, 2, [0], N_HEAD_KV, 64, "q8_0", "q8_0"),          # head_dim
                  KVCache(32, 2, [1], N_HEAD_KV, HEAD_DIM, "q8_0", "q8_0"),    # layers
                  KVCache(40, 2, [0], N_HEAD_KV, HEAD_DIM, "q8_0", "q8_0")):   # n_cells
        before = snapshot(other)
        with pytest.raises(StateError):
            other.load_state_bytes(mem.state_bytes())
        assert snapshot(other) == before
    with pytest.raises(StateError):                # a whole image is not a sequence
        make().load_state_bytes(mem.state_bytes(), seq_id=0)


def crc_sealed(body):
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("seq_id", [None, 0])
def test_state_checksum_alone_refuses_changed_kv_data(seq_id):
    """One byte of a V row changed: every other check accepts it (it loads
    once resealed and the row differs), so only the CRC can refuse it."""
    mem = KVCache(16, 1, [0], N_HEAD_KV, HEAD_DIM, "f32", "f32")
    decode(mem, np.arange(3), [[0]] * 3, [0], 120)
    good = mem.state_bytes(seq_id)
    body = bytearray(good[:-4])
    body[-1] ^= 0x01                       # the last byte of the last V row
    target = KVCache(16, 1, [0], N_HEAD_KV, HEAD_DIM, "f32", "f32")
    before = snapshot(target)
    with pytest.raises(StateError, match="checksum"):
        target.load_state_bytes(bytes(body) + good[-4:], seq_id)
    assert snapshot(target) == before
    target.load_state_bytes(crc_sealed(bytes(body)), seq_id)
    assert target.v[0][2].tobytes() != mem.v[0][2].tobytes()


def iswa_halves(b):
    """An ISWA image's header (magic, version, length) and its two halves."""
    head = 20 + struct.unpack("<q", b[12:20])[0]
    return b[:20], b[20:head], b[head:]


def iswa_image(base, swa, version=2):
    return b"KVCISWA\0" + struct.pack("<Iq", version, len(base)) + base + swa


def test_iswa_checksum_of_each_half_alone_refuses_a_change():
    """One byte of each half's last V row changed: the half's own CRC, the
    only checksum of the file, refuses it; resealed, it loads."""
    mem = ISWACache(300, 1, 8, [False, True], N_HEAD_KV, HEAD_DIM, "f32", "f32", n_swa=4)
    decode(mem, np.arange(3), [[0]] * 3, [0, 1], 121)
    _, base, swa = iswa_halves(mem.state_bytes())
    base, swa = bytearray(base[:-4]), bytearray(swa[:-4])
    base[-1] ^= 0x01
    swa[-1] ^= 0x01
    fresh = ISWACache(300, 1, 8, [False, True], N_HEAD_KV, HEAD_DIM, "f32", "f32", n_swa=4)
    before = snapshot(fresh)
    for bad in (iswa_image(bytes(base) + mem.state_bytes()[-4:], crc_sealed(bytes(swa))),
                iswa_image(crc_sealed(bytes(base)), bytes(swa) + mem.state_bytes()[-4:])):
        with pytest.raises(StateError, match="checksum"):
            fresh.load_state_bytes(bad)
        assert snapshot(fresh) == before
    fresh.load_state_bytes(iswa_image(crc_sealed(bytes(base)), crc_sealed(bytes(swa))))
    assert fresh.base.v[0][2].tobytes() != mem.base.v[0][2].tobytes()
    assert fresh.swa.v[1][2].tobytes() != mem.swa.v[1][2].tobytes()


def test_an_iswa_state_of_another_format_version_is_refused_clearly():
    """Version 1 wrapped the halves in one more CRC-32; version 2 does not."""
    mem = ISWACache(300, 1, 8, [False, True], N_HEAD_KV, HEAD_DIM, n_swa=4)
    decode(mem, np.arange(3), [[0]] * 3, [0, 1], 122)
    _, base, swa = iswa_halves(mem.state_bytes())
    fresh = ISWACache(300, 1, 8, [False, True], N_HEAD_KV, HEAD_DIM, n_swa=4)
    before = snapshot(fresh)
    for old in (crc_sealed(iswa_image(base, swa, version=1)), iswa_image(base, swa, version=3)):
        with pytest.raises(StateError, match=r"format version [13]; this kvcells reads version 2"):
            fresh.load_state_bytes(old)
        assert snapshot(fresh) == before
    fresh.load_state_bytes(iswa_image(base, swa))
    assert fresh.state_bytes() == mem.state_bytes()


def iswa_pair(decodes, n_seq=2):
    """A small ISWA cache (4 window cells of 8 plus a ubatch) after the given
    (positions, sequence) ubatches."""
    mem = ISWACache(64, n_seq, 4, [False, True], N_HEAD_KV, HEAD_DIM, n_swa=4)
    for pos, s in decodes:
        place(mem, pos, [[s]] * len(pos), [0, 1], len(pos))
    return mem


def test_iswa_halves_that_disagree_are_refused_and_change_nothing():
    """Crafted images whose halves each carry a correct CRC but could not
    come from one state_bytes call: a whole image beside a sequence one, two
    different saved sequences, window cells below the full half's window."""
    a = iswa_pair([(np.arange(6), 0)])
    b = iswa_pair([(np.arange(6), 0), (np.arange(3), 1)])
    _, a_base, a_swa = iswa_halves(a.state_bytes())
    _, a_base0, a_swa0 = iswa_halves(a.state_bytes(0))
    _, b_base1, b_swa1 = iswa_halves(b.state_bytes(1))
    # seq 0 at positions 0..11 in a cache with a window of 4: the window half
    # saves 9..11; put 2 (held by the full half) in place of 9
    d = iswa_pair([(np.arange(12), 0)])
    _, d_base0, d_swa0 = iswa_halves(d.state_bytes(0))
    body = bytearray(d_swa0[:-4])
    at = len(body) - 2 * 3 * d.swa.row_k - 12   # one layer's K and V rows follow the positions
    assert struct.unpack("<3i", body[at:at + 12]) == (9, 10, 11)
    body[at:at + 4] = struct.pack("<i", 2)
    low_window = crc_sealed(bytes(body))
    bad = [  # (what the error says, image, seq_id)
        ("different sequences", iswa_image(a_base, b_swa1), None),     # whole and sequence
        ("different sequences", iswa_image(a_base0, b_swa1), None),    # sequences 0 and 1
        ("outside the window of position 12", iswa_image(d_base0, low_window), None),
    ]
    target = iswa_pair([(np.arange(2), 1)])
    before = snapshot(target)
    for why, image, seq_id in bad:
        with pytest.raises(StateError, match=why):
            target.load_state_bytes(image, seq_id)
        assert snapshot(target) == before
    # the halves as saved load
    for image, seq_id in ((iswa_image(a_base, a_swa), None), (iswa_image(a_base0, a_swa0), None),
                          (iswa_image(d_base0, d_swa0), 1), (iswa_image(b_base1, b_swa1), None)):
        iswa_pair([]).load_state_bytes(image, seq_id)


def test_an_iswa_sequence_the_window_half_lost_round_trips():
    """seq_cp of cells the window half has reused copies them in the full
    half only: a state a live cache holds, so it must load."""
    def make():
        return ISWACache(400, 2, 16, [False, True], N_HEAD_KV, HEAD_DIM, n_swa=4)

    mem = make()
    for start in range(0, 300, 16):   # 300 tokens through 256 window cells
        place(mem, np.arange(start, min(start + 16, 300)), [[0]] * min(16, 300 - start), [], 0)
    assert mem.swa.table.seq_pos_min(0) > 4
    mem.seq_cp(0, 1, 0, 4)
    assert len(mem.base.table.seq_cells(1)[0]) == 4 and len(mem.swa.table.seq_cells(1)[0]) == 0
    for seq_id in (None, 1):
        fresh = make()
        fresh.load_state_bytes(mem.state_bytes(seq_id), seq_id)
        assert fresh.state_bytes(seq_id) == mem.state_bytes(seq_id)


def test_sequence_state_that_does_not_fit_changes_nothing():
    src = KVCache(32, 1, [0], N_HEAD_KV, HEAD_DIM)
    decode(src, np.arange(10), [[0]] * 10, [0], 110)
    dst = KVCache(12, 2, [0], N_HEAD_KV, HEAD_DIM)
    decode(dst, np.arange(8), [[0]] * 8, [0], 111)
    before = snapshot(dst)
    with pytest.raises(CacheFullError):
        dst.load_state_bytes(src.state_bytes(0), seq_id=1)
    assert snapshot(dst) == before


# ---- bad input ----

@pytest.mark.parametrize("kw", [dict(rope_base=-1.0), dict(rope_base=0.0),
                                dict(rope_base=float("nan")), dict(rope_base={0: float("inf")}),
                                dict(rope_freq_scale=float("inf")), dict(rope_freq_scale=-2.0),
                                dict(rope_base="10000"), dict(rope_freq_scale=True)])
def test_rope_parameters_must_be_finite_and_positive(kw):
    with pytest.raises(ValueError, match="rope"):
        KVCache(8, 1, [0], N_HEAD_KV, HEAD_DIM, **kw)
    iswa = {"rope_base_swa" if k == "rope_base" else "rope_freq_scale_swa": v
            for k, v in kw.items() if not isinstance(v, dict)}
    if iswa:
        with pytest.raises(ValueError, match="rope"):
            ISWACache(64, 1, 8, [False, True], N_HEAD_KV, HEAD_DIM, n_swa=4, **iswa)


def test_a_nan_query_or_scale_gives_nan_as_dense_attention_does():
    mem = KVCache(16, 1, [0], N_HEAD_KV, HEAD_DIM, "f32", "f32")
    pos, seqs = np.arange(4), [[0]] * 4
    place(mem, pos, seqs, [0], 130)
    q = rows(131, 4, N_HEAD)
    q[1, 2, 5] = np.nan
    q[3, 0, 0] = np.inf
    out = mem.attend(0, q, SCALE)
    assert np.isnan(out[1, 2]).all() and np.isnan(out[3, 0]).all()
    check_against_mask(mem, pos, seqs, {0: (q, out)})   # NaN where dense gives NaN, else equal
    assert np.isnan(mem.attend(0, rows(132, 4, N_HEAD), float("nan"))).all()


def test_a_sequence_state_out_of_order_is_refused():
    mem = KVCache(16, 1, [0], N_HEAD_KV, HEAD_DIM, "f32", "f32")
    decode(mem, np.arange(3), [[0]] * 3, [0], 140)
    body = bytearray(mem.state_bytes(0)[:-4])
    at = len(mem._header(1)) + 8                     # after the header, seq id and count
    body[at:at + 8] = struct.pack("<2i", 1, 0)       # positions 1, 0, 2
    target = KVCache(16, 1, [0], N_HEAD_KV, HEAD_DIM, "f32", "f32")
    with pytest.raises(StateError, match="order"):
        target.load_state_bytes(crc_sealed(bytes(body)), 0)
    assert target.table.used == 0


def test_a_sequence_at_int32_max_saves_loads_and_is_replaced_whole():
    """seq_add can put a cell at 2**31 - 1; the ranged operations' open end
    reaches it, so loading the sequence again replaces it rather than
    leaving a duplicate beside it."""
    mem = KVCache(16, 1, [0], N_HEAD_KV, HEAD_DIM, "f32", "f32")
    decode(mem, np.arange(3), [[0]] * 3, [0], 140)
    mem.seq_add(0, 0, -1, 2**31 - 3)
    assert (mem.seq_pos_min(0), mem.seq_pos_max(0)) == (2**31 - 3, 2**31 - 1)
    saved = mem.state_bytes(0)
    target = KVCache(16, 1, [0], N_HEAD_KV, HEAD_DIM, "f32", "f32")
    target.load_state_bytes(saved, 0)
    target.load_state_bytes(saved, 0)
    assert target.table.used == 3
    assert target.state_bytes(0) == saved
    target.seq_rm(0, 2**31 - 2)
    assert target.table.used == 1 and target.seq_pos_max(0) == 2**31 - 3


def test_a_sequence_state_a_live_cache_could_not_hold_is_refused():
    """With a correct CRC: a negative position, a sequence id beyond
    n_seq_max, a negative count, more cells than the cache has."""
    mem = KVCache(16, 2, [0], N_HEAD_KV, HEAD_DIM, "f32", "f32")
    decode(mem, np.arange(3), [[1]] * 3, [0], 141)
    body = mem.state_bytes(1)[:-4]
    at = len(mem._header(1))                         # seq id, count, positions
    rest = body[at + 8:]
    bad = [
        (StateError, "negative position", body[:at] + struct.pack("<2i3i", 1, 3, 0, -1, 2) + rest[12:]),
        (StateError, r"sequence id 2 outside \[0, 2\)", body[:at] + struct.pack("<i", 2) + body[at + 4:]),
        (StateError, "negative cell count", body[:at] + struct.pack("<2i", 1, -3) + rest),
        (CacheFullError, "17 cells", body[:at] + struct.pack("<2i", 1, 17) + rest),
    ]
    target = KVCache(16, 2, [0], N_HEAD_KV, HEAD_DIM, "f32", "f32")
    decode(target, np.arange(2), [[0]] * 2, [0], 142)
    before = snapshot(target)
    for error, why, image in bad:
        with pytest.raises(error, match=why):
            target.load_state_bytes(crc_sealed(image))
        assert snapshot(target) == before


def test_bad_arguments():
    with pytest.raises(ValueError):
        KVCache(8, 1, [0], 1, 40, "q8_0", "f16")        # blocks would straddle heads
    with pytest.raises(ValueError):
        KVCache(8, 1, [0], 1, 32, "q5_0", "f16")
    with pytest.raises(ValueError):
        KVCache(8, 1, [0, 0], 1, 32)
    for bad in (dict(n_head_kv=0), dict(head_dim=-32), dict(head_dim=32.5),
                dict(rope_base={1: 1e4}), dict(rope_mode="yarn"), dict(n_cells=0)):
        args = dict(n_cells=8, n_seq_max=1, layers=[0], n_head_kv=1, head_dim=32) | bad
        with pytest.raises(ValueError):
            KVCache(**args)
    for bad in (dict(n_swa=0), dict(swa_type="none"), dict(n_ubatch=0)):
        args = dict(n_ctx=64, n_seq_max=1, n_ubatch=8, swa_layers=[True], n_head_kv=1,
                    head_dim=32, n_swa=4) | bad
        with pytest.raises(ValueError):
            ISWACache(**args)
    mem = KVCache(8, 2, [0], N_HEAD_KV, HEAD_DIM)
    with pytest.raises(KVCellsError):
        mem.store(0, rows(0, 1), rows(1, 1))           # nothing applied yet
    slot, = mem.prepare([([0, 1], [[0], [0]])])
    mem.apply(slot, [0, 1], [[0], [0]])
    with pytest.raises(ValueError):
        mem.store(1, rows(0, 2), rows(1, 2))           # not a layer of this cache
    with pytest.raises(ValueError):
        mem.store(0, rows(0, 3), rows(1, 3))           # 3 rows for 2 tokens
    with pytest.raises(ValueError):
        mem.attend(0, rows(0, 2, 3), SCALE)            # 3 heads over 2 kv heads
    with pytest.raises(ValueError):
        mem.seq_rm(5)
    with pytest.raises(ValueError):
        mem.prepare([([0], [[7]])])
    for seq_ids in (None, [[True]], [["0"]]):
        with pytest.raises(ValueError):
            mem.prepare([([0], seq_ids)])
    with pytest.raises(ValueError):
        mem.load_state_bytes(mem.state_bytes(0), seq_id=9)
    mem.seq_rm(0, 1, -1)
    with pytest.raises(KVCellsError):
        mem.attend(0, rows(0, 2, 4), SCALE)            # the cache changed since apply


CACHES = {
    "full": lambda: KVCache(64, 3, [0, 1], N_HEAD_KV, HEAD_DIM, "f32", "f32"),
    "swa": lambda: KVCache(64, 3, [0, 1], N_HEAD_KV, HEAD_DIM, "f32", "f32", n_swa=4,
                           swa_type="standard"),
    "iswa": lambda: ISWACache(64, 3, 8, [False, True], N_HEAD_KV, HEAD_DIM, "f32", "f32", n_swa=3),
}
SEQ = st.integers(0, 2)
RANGE = st.tuples(st.integers(-1, 20), st.integers(-1, 24))
OPS = st.one_of(
    st.tuples(st.just("decode"), SEQ, st.integers(1, 4)),
    st.tuples(st.just("seq_rm"), st.integers(-1, 2), RANGE),
    st.tuples(st.just("seq_cp"), SEQ, SEQ, RANGE),
    st.tuples(st.just("seq_keep"), SEQ),
    st.tuples(st.just("seq_add"), SEQ, RANGE, st.integers(-5, 5)),
    st.tuples(st.just("seq_div"), SEQ, RANGE, st.integers(1, 3)),
    st.tuples(st.just("defrag")))


def run_ops(mem, ops):
    for k, op in enumerate(ops):
        name, args = op[0], op[1:]
        if name == "decode":
            s, n = args
            start = mem.seq_pos_max(s) + 1
            place(mem, np.arange(start, start + n), [[s]] * n, [0, 1], k)
        elif name == "defrag":
            mem.defrag()
        elif name in ("seq_rm", "seq_add", "seq_div"):
            s, (p0, p1), *rest = args
            getattr(mem, name)(s, p0, p1, *rest)
        elif name == "seq_cp":
            getattr(mem, name)(args[0], args[1], *args[2])
        else:
            getattr(mem, name)(*args)


def next_tokens(mem, seqs):
    """One token more on each of seqs, at its largest position + 1, with K, V
    and q that depend only on the sequence; {layer: attention output}."""
    pos = [mem.seq_pos_max(s) + 1 for s in seqs]
    slot, = mem.prepare([(pos, [[s] for s in seqs])])
    mem.apply(slot, pos, [[s] for s in seqs])
    out = {}
    for il in (0, 1):
        mem.store(il, *(np.concatenate([rows(600 + 10 * s + 3 * il + w, 1) for s in seqs])
                        for w in (0, 1)))
        q = np.concatenate([rows(700 + 10 * s + il, 1, N_HEAD) for s in seqs])
        out[il] = mem.attend(il, q, SCALE)
    return out


@given(kind=st.sampled_from(sorted(CACHES)), ops=st.lists(OPS, max_size=12))
@settings(max_examples=60, deadline=None)
def test_any_saved_state_loads_and_decodes_on_as_the_original(kind, ops):
    """Whatever a live cache holds after valid operations (seq_div and seq_rm
    leave duplicate and missing positions) saves, loads into a fresh cache
    with the same table, and takes one more token on each sequence with the
    original's attention: bit for bit for a whole image, to rounding for one
    sequence loaded alone (its cells sit elsewhere)."""
    mem = CACHES[kind]()
    run_ops(mem, ops)
    held = [s for s in range(3) if mem.seq_pos_max(s) >= 0]
    whole = CACHES[kind]()
    whole.load_state_bytes(mem.state_bytes())
    assert snapshot(whole) == snapshot(mem)
    alone = {}
    for s in held:
        alone[s] = CACHES[kind]()
        alone[s].load_state_bytes(mem.state_bytes(s))
        assert alone[s].state_bytes(s) == mem.state_bytes(s)
    if not held:
        return
    want = next_tokens(mem, held)
    got = next_tokens(whole, held)
    for il in (0, 1):
        np.testing.assert_array_equal(got[il], want[il])
    for i, s in enumerate(held):
        got = next_tokens(alone[s], [s])
        for il in (0, 1):
            np.testing.assert_allclose(got[il][0], want[il][i], atol=1e-5)


# ---- the state machine ----

class Tokens:
    """The truth: which tokens (key -> [position, sequences, uid]) the cache
    holds, edited with the API's sequence semantics and nothing about cells.
    K of a token is RoPE(k_raw(uid), its current position), whatever shifts
    it saw; a loaded copy of a token has a new key and the same uid."""

    def __init__(self, n_swa=0, swa_type="none"):
        self.t, self.n_swa, self.swa_type = {}, n_swa, swa_type

    def in_range(self, s, p0, p1):
        p0, p1 = max(p0, 0), (2**31 if p1 < 0 else p1)
        return [u for u, (p, ss, _) in self.t.items() if (s == -1 or s in ss) and p0 <= p < p1]

    def seq_rm(self, s, p0, p1):
        for u in self.in_range(s, p0, p1):
            ss = self.t[u][1]
            ss.difference_update(ss if s == -1 else {s})
            if not ss:
                del self.t[u]

    def seq_cp(self, src, dst, p0, p1):
        for u in self.in_range(src, p0, p1):
            self.t[u][1].add(dst)

    def seq_keep(self, s):
        for u in list(self.t):
            if s in self.t[u][1]:
                self.t[u][1] = {s}
            else:
                del self.t[u]

    def seq_add(self, s, p0, p1, delta):
        for u in self.in_range(s, p0, p1):
            self.t[u][0] += delta
            if self.t[u][0] < 0:
                del self.t[u]

    def seq_div(self, s, p0, p1, d):
        for u in self.in_range(s, p0, p1):
            self.t[u][0] //= d

    def positions(self, s):
        return sorted(p for p, ss, _ in self.t.values() if s in ss)

    def visible(self, s, p1):
        return [(u, p) for p, ss, u in self.t.values()
                if s in ss and p <= p1 and not is_masked_swa(self.n_swa, self.swa_type, p, p1)]

    def forget_reused(self, ref, n_seq):
        """A sliding-window cache overwrites cells the window has left and
        drops the older positions of their sequence; follow what the
        reference cell table kept (positions below its seq_pos_min are gone)."""
        for s in range(n_seq):
            lowest = ref.seq_pos_min(s)
            for u, (p, ss, _) in list(self.t.items()):
                if s in ss and (lowest < 0 or p < lowest):
                    ss.discard(s)
                    if not ss:
                        del self.t[u]


def raw(uid, layer, what):
    return rows(4 * uid + 2 * layer + (what == "v"), 1)[0]


CHUNKS = st.lists(st.tuples(st.integers(0, 2), st.sets(st.integers(0, 2)), st.integers(1, 3)),
                  min_size=1, max_size=3)


class MemoryMachine(RuleBasedStateMachine):
    """Starts from 6 to 16 decoded ubatches and decodes up to 4 per step, so
    the tables run near full (statistics: pytest --hypothesis-show-statistics).
    Each cell table has a twin in the reference (RefCells), given the same
    placements and operations: it says where a ubatch goes, when the cache
    is full and which cells a window reused."""
    N_SEQ = 3
    BASES = {0: 10000.0, 1: 500.0}

    @initialize(kind=st.sampled_from(["full", "swa", "iswa"]),
                mode=st.sampled_from([NORM, NEOX]), prefill=st.lists(CHUNKS, min_size=6, max_size=16))
    def setup(self, kind, mode, prefill):
        kw = dict(rope_mode=mode)
        if kind == "iswa":
            self.mem = ISWACache(40, self.N_SEQ, 8, [False, True], N_HEAD_KV, HEAD_DIM,
                                 "f32", "f32", n_swa=3, rope_base=self.BASES[0],
                                 rope_base_swa=self.BASES[1], **kw)
            self.parts = [(self.mem.base, [0]), (self.mem.swa, [1])]
        elif kind == "swa":
            self.mem = KVCache(20, self.N_SEQ, [0, 1], N_HEAD_KV, HEAD_DIM, "f32", "f32",
                               n_swa=4, swa_type="standard", rope_base=self.BASES, **kw)
            self.parts = [(self.mem, [0, 1])]
        else:
            self.mem = KVCache(40, self.N_SEQ, [0, 1], N_HEAD_KV, HEAD_DIM, "f32", "f32",
                               rope_base=self.BASES, **kw)
            self.parts = [(self.mem, [0, 1])]
        self.kind, self.mode = kind, mode
        self.truth = [Tokens(c.n_swa, c.swa_type) for c, _ in self.parts]
        self.refs = [RefCells(c.n_cells, c.n_seq_max, c.n_swa, c.swa_type) for c, _ in self.parts]
        self.uid = self.n_copies = self.n_decodes = 0
        self.occupancy = []
        for chunks in prefill:
            self.decode_one(chunks)

    def k_at(self, uid, layer, p):
        return rope(raw(uid, layer, "k")[None], [p], self.BASES[layer], self.mode)[0]

    def seq_op(self, name, *args):
        getattr(self.mem, name)(*args)
        for tokens, ref in zip(self.truth, self.refs):
            getattr(tokens, name)(*args)
            getattr(ref, name)(*args)

    @rule(ubatches=st.lists(CHUNKS, min_size=1, max_size=4))
    def decode(self, ubatches):
        for chunks in ubatches:
            self.decode_one(chunks)

    def decode_one(self, chunks):
        """One ubatch: per chunk, n tokens of a sequence (shared with others)."""
        self.n_decodes += 1
        pos, seqs = [], []
        nxt = {s: self.mem.seq_pos_max(s) + 1 for s in range(self.N_SEQ)}
        for s, extra, n in chunks:
            ss = [s] + sorted(extra - {s})
            start = max(nxt[x] for x in ss)
            for p in range(start, start + n):
                pos.append(p)
                seqs.append(ss)
            for x in ss:
                nxt[x] = start + n
        want = [ref.find_slot(len(pos)) for ref in self.refs]
        before = snapshot(self.mem)
        try:
            slot, = self.mem.prepare([(np.array(pos), seqs)])
        except CacheFullError:
            assert None in want
            assert snapshot(self.mem) == before
            self.full = True
            return
        assert snapshot(self.mem) == before
        slots = slot if isinstance(self.mem, ISWACache) else (slot,)
        assert [list(x) for x in slots] == want
        self.mem.apply(slot, pos, seqs)
        uids = list(range(self.uid, self.uid + len(pos)))
        self.uid += len(pos)
        for (cache, layers), tokens, ref, idxs in zip(self.parts, self.truth, self.refs, want):
            ref.apply_ubatch(idxs, pos, seqs)
            for u, p, ss in zip(uids, pos, seqs):
                tokens.t[u] = [p, set(ss), u]
            if cache.swa_type != "none":
                tokens.forget_reused(ref, self.N_SEQ)
            for il in layers:
                k = np.stack([self.k_at(u, il, p) for u, p in zip(uids, pos)])
                v = np.stack([raw(u, il, "v") for u in uids])
                self.mem.store(il, k, v)
                q = rows(self.uid * 7 + il, len(pos), N_HEAD)
                out = self.mem.attend(il, q, SCALE)
                for t, (p1, ss) in enumerate(zip(pos, seqs)):
                    vis = tokens.visible(ss[0], p1)
                    kk = np.stack([self.k_at(u, il, p) for u, p in vis])
                    vv = np.stack([raw(u, il, "v") for u, _ in vis])
                    want = naive_attention(q[t:t + 1], kk, vv, np.zeros((1, len(vis))), SCALE)
                    np.testing.assert_allclose(out[t:t + 1], want, atol=1e-4)

    ranges = st.tuples(st.integers(-1, 12), st.integers(-1, 14))

    @rule(s=st.integers(-1, N_SEQ - 1), r=ranges)
    def seq_rm(self, s, r):
        self.seq_op("seq_rm", s, *r)

    @rule(src=st.integers(0, N_SEQ - 1), dst=st.integers(0, N_SEQ - 1), r=ranges)
    def seq_cp(self, src, dst, r):
        if src != dst:
            self.seq_op("seq_cp", src, dst, *r)

    @rule(s=st.integers(0, N_SEQ - 1))
    def seq_keep(self, s):
        self.seq_op("seq_keep", s)

    @rule(s=st.integers(0, N_SEQ - 1), r=ranges, delta=st.integers(-6, 6))
    def seq_add(self, s, r, delta):
        self.seq_op("seq_add", s, *r, delta)

    @rule(s=st.integers(0, N_SEQ - 1), r=ranges, d=st.integers(1, 3))
    def seq_div(self, s, r, d):
        self.seq_op("seq_div", s, *r, d)

    @rule()
    def defrag(self):
        self.mem.defrag()
        for ref in self.refs:
            ref.defrag()

    @rule()
    def whole_state_round_trip(self):
        saved = self.mem.state_bytes()
        self.mem.clear()
        self.mem.load_state_bytes(saved)
        assert self.mem.state_bytes() == saved

    @rule(src=st.integers(0, N_SEQ - 1), dst=st.integers(0, N_SEQ - 1))
    def sequence_state_copy(self, src, dst):
        saved = self.mem.state_bytes(src)
        before = snapshot(self.mem)
        # the reference: the saved positions (those the window still sees
        # from the full half's next position) go into the cells find_slot
        # gives once dst is gone
        refs = [copy.deepcopy(ref) for ref in self.refs]
        horizon = refs[0].seq_pos_max(src) + 1
        fits = True
        for ref in refs:
            pos = [p for _, p in ref.seq_cells(src)
                   if not is_masked_swa(ref.n_swa, ref.swa_type, p, horizon)]
            ref.seq_rm(dst)
            idxs = ref.find_slot(len(pos)) if pos else []
            if idxs is None:
                fits = False
            elif pos:
                ref.apply_ubatch(idxs, pos, [[dst]] * len(pos))
        try:
            self.mem.load_state_bytes(saved, seq_id=dst)
        except CacheFullError:
            assert not fits
            assert snapshot(self.mem) == before
            return
        assert fits
        self.refs = refs
        if src == dst:   # bit-exact round trip of one sequence
            assert self.mem.state_bytes(dst) == saved
        kept = self.truth[0].positions(src)
        horizon = (kept[-1] + 1) if kept else 0
        for (cache, _), tokens, ref in zip(self.parts, self.truth, self.refs):
            copied = [(p, u) for p, ss, u in tokens.t.values() if src in ss and not
                      is_masked_swa(cache.n_swa, cache.swa_type, p, horizon)]
            tokens.seq_rm(dst, -1, -1)
            for p, u in copied:
                self.n_copies += 1
                tokens.t[("copy", self.n_copies)] = [p, {dst}, u]
            if cache.swa_type != "none":
                tokens.forget_reused(ref, self.N_SEQ)

    @invariant()
    def tables_hold_the_truth(self):
        if not hasattr(self, "mem"):
            return
        self.occupancy.append(max(c.table.used / c.n_cells for c, _ in self.parts))
        for (cache, _), tokens, ref in zip(self.parts, self.truth, self.refs):
            cache.table.check()
            assert cache.table.positions().tolist() == ref.pos
            assert [set(cache.table.seqs(i)) for i in range(cache.n_cells)] == ref.seq
            for s in range(self.N_SEQ):
                assert list(cache.table.seq_cells(s)[1]) == tokens.positions(s)

    def teardown(self):
        if getattr(self, "occupancy", None):
            mean = sum(self.occupancy) / len(self.occupancy)
            event(f"mean occupancy {min(int(mean * 4), 3) * 25}%+")
            event(f"{min(self.n_decodes // 10, 5) * 10}+ ubatches decoded")
            if getattr(self, "full", False):
                event("a ubatch found the cache full")


TestMemoryMachine = MemoryMachine.TestCase
TestMemoryMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])


def test_holds_prefix_says_whether_a_cut_sequence_can_continue():
    """Without a window every earlier position is needed; with one, only the
    last n_swa; an ISWA cache's window half reuses cells out of every window."""
    plain = KVCache(32, 1, 1, N_HEAD_KV, HEAD_DIM)
    slot, = plain.prepare([(np.arange(10), [0] * 10)])
    plain.apply(slot, np.arange(10), [0] * 10)
    plain.seq_rm(0, 3, 5)
    assert plain.holds_prefix(0, 3) and not plain.holds_prefix(0, 6)
    iswa = ISWACache(1024, 1, 16, [True, False], N_HEAD_KV, HEAD_DIM, n_swa=4)
    for start in range(0, 300, 16):   # 300 tokens through 256 window cells
        pos = np.arange(start, min(start + 16, 300))
        slot, = iswa.prepare([(pos, [0] * len(pos))])
        iswa.apply(slot, pos, [0] * len(pos))
    _, held = iswa.swa.table.seq_cells(0)
    gone = sorted(set(range(300)) - set(held.tolist()))
    assert gone and iswa.holds_prefix(0, 299) and not iswa.holds_prefix(0, gone[-1] + 1)
