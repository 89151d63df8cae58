"""One transformer layer in one C call (csrc/block.c, native.block_run), and
a whole stack of layers and the head in one (native.stack_run): against the
same layers written out in numpy with the dense reference's pieces
(tests/reference_forward.py), on random F32 weights."""
import numpy as np
import pytest
from reference_forward import attention, causal_mask, gelu_tanh, rms_norm, rotate, silu

from kvcells import KVCache, native
from kvcells.kv_quant import dequantize
from kvcells.rope import NEOX, NORM, inv_freq, rope_tables

E, H, HKV, D, FF, EPS = 64, 4, 2, 32, 96, 1e-6
SHAPES = {"attn_q": (H * D, E), "attn_k": (HKV * D, E), "attn_v": (HKV * D, E),
          "attn_output": (E, H * D), "ffn_gate": (FF, E), "ffn_up": (FF, E), "ffn_down": (E, FF)}


def weights(seed, gemma):
    rng = np.random.default_rng(seed)
    w = {name: (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
         for name, shape in SHAPES.items()}
    norms = ["attn_norm", "ffn_norm"] + (["attn_q_norm", "attn_k_norm", "post_attention_norm",
                                          "post_ffw_norm"] if gemma else [])
    for name in norms:
        n = D if name in ("attn_q_norm", "attn_k_norm") else E
        w[name] = (1.0 + 0.3 * rng.standard_normal(n)).astype(np.float32)
    return w


def make_block(w, gemma):
    tensors = {name: native.Matrix("F32", a.view(np.uint8), *a.shape) if a.ndim == 2 else a
               for name, a in w.items()}
    return native.Block(E, H, HKV, D, FF, "gelu_tanh" if gemma else "silu", gemma, EPS,
                        1.0 / np.sqrt(D), tensors)


def numpy_layer(w, x, gemma, base, speed=1.0):
    """The layer in numpy, tokens at positions 0..n-1 of one sequence (RoPE
    turned as for positions times speed); (x after the layer, the K rows
    the cache should hold)."""
    n = len(x)
    h = rms_norm(x, w["attn_norm"], EPS)
    q = (h @ w["attn_q"].T).reshape(n, H, D)
    k = (h @ w["attn_k"].T).reshape(n, HKV, D)
    v = (h @ w["attn_v"].T).reshape(n, HKV, D)
    if gemma:
        q, k = rms_norm(q, w["attn_q_norm"], EPS), rms_norm(k, w["attn_k_norm"], EPS)
    q, k = rotate(q, base, gemma, speed), rotate(k, base, gemma, speed)
    a = attention(q, k, v, causal_mask(n), 1.0 / np.sqrt(D)).reshape(n, -1) @ w["attn_output"].T
    x = x + (rms_norm(a, w["post_attention_norm"], EPS) if gemma else a)
    h = rms_norm(x, w["ffn_norm"], EPS)
    g, u = h @ w["ffn_gate"].T, h @ w["ffn_up"].T
    f = ((gelu_tanh(g) if gemma else silu(g)) * u) @ w["ffn_down"].T
    x = x + (rms_norm(f, w["post_ffw_norm"], EPS) if gemma else f)
    return x, k


def applied_cache(n, n_cells=16):
    mem = KVCache(n_cells, 1, 1, HKV, D, "f32", "f32")
    pos = np.arange(n, dtype=np.int32)
    (slot,) = mem.prepare([(pos, [[0]] * n)])
    mem.apply(slot, pos, [[0]] * n)
    return mem, slot


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_one_block_equals_the_layer_in_numpy(gemma, n_threads, simd_path):
    n, base = 6, 10000.0
    w = weights(1, gemma)
    x = np.random.default_rng(2).standard_normal((n, E)).astype(np.float32)
    want, k_want = numpy_layer(w, x, gemma, base)
    block = make_block(w, gemma)
    mem, slot = applied_cache(n)
    got = x.copy()
    native.block_run(block, *mem.layer_kv(0), native.Scratch(block, 8), got,
                     *rope_tables(np.arange(n), base, D), None, n_threads)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    k_cached = dequantize(mem.k[0][slot], "f32", HKV * D).reshape(n, HKV, D)
    np.testing.assert_allclose(k_cached, k_want, rtol=1e-4, atol=1e-4)


def test_only_the_output_rows_go_on_after_attention():
    n = 5
    w = weights(3, True)
    x = np.random.default_rng(4).standard_normal((n, E)).astype(np.float32)
    want, _ = numpy_layer(w, x, True, 10000.0)
    block = make_block(w, True)
    mem, _ = applied_cache(n)
    got = x.copy()
    native.block_run(block, *mem.layer_kv(0), native.Scratch(block, n), got,
                     *rope_tables(np.arange(n), 10000.0, D), np.array([3, 0], np.int32), 1)
    np.testing.assert_allclose(got[:2], want[[3, 0]], rtol=1e-4, atol=1e-4)


def test_rope_layouts_differ():
    """The block's rope_neox flag is what picks the pairs: the NORM block
    and the NEOX block give different K rows for the same weights."""
    w = weights(5, False)
    x = np.random.default_rng(6).standard_normal((3, E)).astype(np.float32)
    ks = []
    for neox in (False, True):
        tensors = {name: native.Matrix("F32", a.view(np.uint8), *a.shape) if a.ndim == 2 else a
                   for name, a in w.items()}
        block = native.Block(E, H, HKV, D, FF, "silu", neox, EPS, 1.0 / np.sqrt(D), tensors)
        mem, slot = applied_cache(3)
        native.block_run(block, *mem.layer_kv(0), native.Scratch(block, 3), x.copy(),
                         *rope_tables(np.arange(3), 10000.0, D), None, 1)
        ks.append(dequantize(mem.k[0][slot], "f32", HKV * D).reshape(3, HKV, D))
    h = rms_norm(x, w["attn_norm"], EPS)
    k = (h @ w["attn_k"].T).reshape(3, HKV, D)
    for got, mode in zip(ks, (NORM, NEOX)):
        np.testing.assert_allclose(got, rotate(k, 10000.0, mode == NEOX), rtol=1e-4, atol=1e-4)
    assert np.abs(ks[0] - ks[1]).max() > 0.1


def test_output_norms_the_rows_and_soft_caps_the_logits(simd_path):
    rng = np.random.default_rng(7)
    head = rng.standard_normal((50, E)).astype(np.float32)
    norm = (1.0 + 0.3 * rng.standard_normal(E)).astype(np.float32)
    head[:10] *= 30   # logits far out, where tanh is +-1
    x = rng.standard_normal((3, E)).astype(np.float32)
    plain = rms_norm(x, norm, EPS) @ head.T
    block = make_block(weights(8, False), False)
    m = native.Matrix("F32", head.view(np.uint8), 50, E)
    got = native.block_output(norm, EPS, m, 2.0, x.copy(), native.Scratch(block, 4), 1)
    np.testing.assert_allclose(got, 2.0 * np.tanh(plain / 2.0), rtol=1e-5, atol=1e-5)
    assert np.abs(plain).max() > 100 and np.abs(got).max() <= 2.0
    np.testing.assert_allclose(native.block_output(norm, EPS, m, 0.0, x.copy(),
                                                   native.Scratch(block, 4), 1),
                               plain, rtol=1e-4, atol=1e-3)


def test_bad_calls_raise_and_write_no_kv_row():
    n = 3
    block = make_block(weights(9, True), True)
    mem, slot = applied_cache(n)
    scratch = native.Scratch(block, n)
    cos, sin = rope_tables(np.arange(n), 10000.0, D)
    x = np.ones((n, E), np.float32)
    before = mem.k[0].copy()
    kv, ub = mem.layer_kv(0)
    with pytest.raises(ValueError, match="scratch holds"):
        native.block_run(block, kv, ub, native.Scratch(block, 2), x, cos, sin, None, 1)
    with pytest.raises(ValueError, match="float32"):
        native.block_run(block, kv, ub, scratch, np.ones((n, E + 1), np.float32), cos, sin,
                         None, 1)
    with pytest.raises(ValueError, match="cos and sin"):
        native.block_run(block, kv, ub, scratch, x, cos[:1], sin[:1], None, 1)
    with pytest.raises(ValueError, match="output row 3 outside"):
        native.block_run(block, kv, ub, scratch, x, cos, sin, np.array([3], np.int32), 1)
    slots = ub.keep[0].copy()
    slots[2] = 99
    bad = native.UbatchView(slots, *ub.keep[1:])
    bad.set(ub.c.n_tokens, ub.c.n_list)
    with pytest.raises(ValueError, match="cell 99 outside"):
        native.block_run(block, kv, bad, scratch, x, cos, sin, None, 1)
    with pytest.raises(ValueError, match="n_threads"):
        native.block_run(block, kv, ub, scratch, x, cos, sin, None, 0)
    assert np.array_equal(mem.k[0], before) and np.array_equal(x, np.ones((n, E), np.float32))
    with pytest.raises(ValueError, match="attn_q must be"):
        native.Block(E, H, HKV, D, FF, "silu", False, EPS, 1.0, {})
    with pytest.raises(ValueError, match="activation"):
        native.Block(E, H, HKV, D, FF, "relu", False, EPS, 1.0, {})


def two_layer_stack(gemma, softcap, scale=1.5):
    """A stack of 50 token embeddings times scale, two layers, RoPE base
    10000 (table 0) then 1e6 at half speed (table 1), and a head;
    (stack, layer weights, embeddings, head, norm)."""
    rng = np.random.default_rng(11)
    ws = [weights(12, gemma), weights(13, gemma)]
    embd, head = (rng.standard_normal((50, E)).astype(np.float32) for _ in range(2))
    norm = (1.0 + 0.3 * rng.standard_normal(E)).astype(np.float32)
    stack = native.Stack(native.Matrix("F32", embd.view(np.uint8), 50, E), scale,
                         [make_block(w, gemma) for w in ws], [0, 1],
                         [(inv_freq(10000.0, D), 1.0), (inv_freq(1e6, D), 0.5)], norm, EPS,
                         native.Matrix("F32", head.view(np.uint8), 50, E), softcap)
    return stack, ws, embd, head, norm


def stack_cache(n):
    mem = KVCache(16, 1, 2, HKV, D, "f32", "f32")
    pos = np.arange(n, dtype=np.int32)
    (slot,) = mem.prepare([(pos, [[0]] * n)])
    mem.apply(slot, pos, [[0]] * n)
    return mem


@pytest.mark.parametrize("gemma,softcap", [(False, 0.0), (True, 3.0)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_a_stack_equals_its_embeddings_layers_and_head_in_numpy(gemma, softcap, n_threads):
    n, rows = 5, np.array([3, 0], np.int32)
    tokens = np.array([7, 49, 0, 7, 21], np.int32)
    stack, ws, embd, head, norm = two_layer_stack(gemma, softcap)
    want = embd[tokens] * np.float32(1.5)
    want, _ = numpy_layer(ws[0], want, gemma, 10000.0)
    # table 1 turns at half speed: positions 0, 0.5, 1, ... at base 1e6
    want, _ = numpy_layer(ws[1], want, gemma, 1e6, speed=0.5)
    want = rms_norm(want[rows], norm, EPS) @ head.T
    if softcap:
        want = softcap * np.tanh(want / softcap)
    mem = stack_cache(n)
    got = native.stack_run(stack, mem.layer_views(2), native.Scratch(stack.blocks[0], n),
                           tokens, np.arange(n, dtype=np.int32), rows, n_threads)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    none = native.stack_run(stack, stack_cache(n).layer_views(2),
                            native.Scratch(stack.blocks[0], n), tokens,
                            np.arange(n, dtype=np.int32), np.zeros(0, np.int32), n_threads)
    assert none.shape == (0, 50)


def test_a_bad_stack_call_writes_no_kv_row_of_any_layer():
    n = 3
    stack, _, embd, head, norm = two_layer_stack(True, 0.0)
    mem = stack_cache(n)
    views, scratch = mem.layer_views(2), native.Scratch(stack.blocks[0], n)
    tokens, pos, row = np.array([1, 2, 3], np.int32), np.arange(n, dtype=np.int32), \
        np.array([0], np.int32)
    before = [mem.k[il].copy() for il in (0, 1)]
    with pytest.raises(ValueError, match="output row 3 outside"):   # checked at the last layer
        native.stack_run(stack, views, scratch, tokens, pos, np.array([3], np.int32), 1)
    with pytest.raises(ValueError, match="token id 50 outside"):
        native.stack_run(stack, views, scratch, np.array([1, 50, 3], np.int32), pos, row, 1)
    with pytest.raises(ValueError, match="position -1"):
        native.stack_run(stack, views, scratch, tokens, np.array([0, -1, 2], np.int32), row, 1)
    with pytest.raises(ValueError, match="positions"):
        native.stack_run(stack, views, scratch, tokens, pos[:2], row, 1)
    with pytest.raises(ValueError, match="int32"):
        native.stack_run(stack, views, scratch, tokens.astype(np.int64), pos, row, 1)
    with pytest.raises(ValueError, match="layer views"):
        native.stack_run(stack, KVCache(16, 1, 1, HKV, D, "f32", "f32").layer_views(1),
                         scratch, tokens, pos, row, 1)
    with pytest.raises(ValueError, match="scratch holds"):
        native.stack_run(stack, views, native.Scratch(stack.blocks[0], 2), tokens, pos, row, 1)
    mem.seq_rm(0)   # no ubatch applied any more
    with pytest.raises(ValueError, match="a ubatch of 0 tokens"):
        native.stack_run(stack, views, scratch, tokens, pos, row, 1)
    assert all(np.array_equal(mem.k[il], k) for il, k in zip((0, 1), before))
    m = native.Matrix("F32", head.view(np.uint8), 50, E)
    e = native.Matrix("F32", embd.view(np.uint8), 50, E)
    rot = [(inv_freq(10000.0, D), 1.0)]
    with pytest.raises(ValueError, match="RoPE table"):
        native.Stack(e, 1.0, stack.blocks, [0, 1], rot, norm, EPS, m, 0.0)
    with pytest.raises(ValueError, match="RoPE table"):
        native.Stack(e, 1.0, stack.blocks, [0, 0], rot * 3, norm, EPS, m, 0.0)
    with pytest.raises(ValueError, match="frequencies"):
        native.Stack(e, 1.0, stack.blocks, [0, 0], [(inv_freq(1e4, 2 * D), 1.0)], norm, EPS, m,
                     0.0)
    with pytest.raises(ValueError, match="sizes"):
        native.Stack(native.Matrix("F32", embd[:40].view(np.uint8), 40, E), 1.0, stack.blocks,
                     [0, 0], rot, norm, EPS, m, 0.0)
