"""The one door between Python and the C core.

This is the only module that imports the compiled extension `kvcells._core`
(built by cffi from csrc/). Every C function that can fail returns a
kvc_status; `check` turns a failure into the matching exception carrying the
C side's message. The argument checks every wrapper shares, the element
type table, the thread count and the kernel path live here too.
"""
import mmap
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
         "Q5_K": lib.KVC_TYPE_Q5_K, "Q6_K": lib.KVC_TYPE_Q6_K,
         "Q5_0_G4": lib.KVC_TYPE_Q5_0_G4}   # kvcells' own: Q5_0 regrouped (regroup_q5_0)
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


# The kernel paths by name, in the order of the C side's ids.
SIMD_PATHS = ("portable", "avx2", "avxvnni", "avx512")


def simd_paths():
    """The kernel paths this CPU runs, the default (the fastest) last:
    "portable" (plain C, the reference), "avx2" (AVX2, FMA, F16C),
    "avxvnni" (AVX2 with AVX-VNNI's vpdpbusd), "avx512" (AVX-512
    F/BW/VL/DQ and VNNI)."""
    bits = lib.kvc_simd_paths()
    return [name for i, name in enumerate(SIMD_PATHS) if bits >> i & 1]


def set_simd_path(name):
    """Run matmul and attention on the named path (see simd_paths)."""
    if name not in SIMD_PATHS:
        raise ValueError(f"kernel path {name!r} is not one of {SIMD_PATHS}")
    if name not in simd_paths():
        raise ValueError(f"this CPU cannot run the {name} kernels (it runs {simd_paths()})")
    check(lib.kvc_set_simd_path(SIMD_PATHS.index(name)))


def simd_path():
    return SIMD_PATHS[lib.kvc_simd_path()]


if os.environ.get("KVCELLS_SIMD"):
    set_simd_path(os.environ["KVCELLS_SIMD"])


# ---- the C entry points, as numpy-level calls ----
# The hot ones (a decode step makes ~200 of these calls) spell their buffers
# out and call check() only on a failure: each extra Python call costs.

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


def kv_store(type_id, rows, n_values, cells, x):
    """Row i of x (float32, n rows of n_values) into row cells[i] of rows
    (uint8 (n_rows, row bytes)) in the type type_id."""
    check(lib.kv_store(type_id, bytes_of(rows, True), rows.shape[0], n_values,
                       int32s(cells), len(cells), floats(x)))


def kv_rope_shift(type_id, layers, n_rows, n_head, head_dim, cells, delta, base, freq_scale,
                  neox):
    bufs = [bytes_of(a, True) for a in layers]
    check(lib.kv_rope_shift(type_id, ffi.new("uint8_t *[]", bufs), len(bufs), n_rows, n_head,
                            head_dim, int32s(cells), int32s(delta), len(cells), base, freq_scale,
                            1 if neox else 0))


KV_SEGMENT = lib.KV_SEGMENT


# ---- the transformer block (block.c) ----

ACTIVATIONS = {"silu": lib.KVC_ACT_SILU, "gelu_tanh": lib.KVC_ACT_GELU_TANH}
_U8 = np.dtype(np.uint8)
_F32 = np.dtype(np.float32)
_layouts = {}   # (type id, n_in) -> row bytes


def matrix_stride(raw, type_id, n_out, n_in):
    """The row stride in bytes of raw, a weight matrix of n_out rows of n_in
    values of type type_id as GGUF stores it: np.uint8 (n_out, row bytes),
    each row contiguous, rows apart without overlap."""
    nbytes = _layouts.get((type_id, n_in))
    if nbytes is None:
        nbytes = _layouts[(type_id, n_in)] = row_bytes(type_id, n_in)
    if not isinstance(raw, np.ndarray) or raw.dtype != _U8 or raw.ndim != 2:
        raise ValueError("raw must be a 2-D np.uint8 array (n_out, row_bytes)")
    if type(n_out) is not int:
        n_out = as_int(n_out, "n_out", hi=None)
    if raw.shape[0] != n_out or n_out < 1:
        raise ValueError(f"raw has {raw.shape[0]} rows, expected n_out={n_out} >= 1")
    if raw.shape[1] != nbytes:
        raise ValueError(f"rows of {n_in} values of type {type_id} take {nbytes} bytes, "
                         f"raw has {raw.shape[1]}")
    stride = raw.strides
    if stride[1] != 1 or stride[0] < nbytes:
        raise ValueError("raw rows must be contiguous and not overlap")
    return stride[0]


def _vector(a, n, name):
    if not isinstance(a, np.ndarray) or a.dtype != _F32 or a.shape != (n,) \
            or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous float32 vector of {n}")
    return ffi.from_buffer(_FLOATS, a)


def huge_page_buffer(n_bytes):
    """n_bytes of private anonymous memory, writable, on transparent huge
    pages where the kernel gives them. The weights are read once per decoded
    token; on 4 KiB pages the head's matmul took up to a third more time, the
    regrouped ffn_gate and ffn_up 7% more (docs/benchmarks.md)."""
    mem = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mem.madvise(mmap.MADV_HUGEPAGE)
    return mem


class HugePages:
    """Byte arrays cut in turn from huge_page_buffer regions of at least
    REGION bytes: room for the copies native.Matrix makes of a model's
    matrices, too small (0.1-1 MB) for huge pages of their own."""
    REGION = 64 << 20

    def __init__(self):
        self._region, self._used = None, 0

    def take(self, n_bytes):
        size = -(-n_bytes // 64) * 64   # whole cache lines
        if self._region is None or self._used + size > len(self._region):
            self._region, self._used = huge_page_buffer(max(size, self.REGION)), 0
        out = np.frombuffer(self._region, np.uint8, n_bytes, self._used)
        self._used += size
        return out


def regroup_q5_0(raw, n_out, n_in, memory=None):
    """The Q5_0 matrix raw (n_out rows of n_in values, n_in % 128 == 0) as
    Q5_0_G4: the same values in a layout the x86 kernels unpack faster. In
    memory (a HugePages) when given."""
    stride = matrix_stride(raw, TYPES["Q5_0"], n_out, n_in)
    shape = (n_out, row_bytes(TYPES["Q5_0_G4"], n_in))
    out = np.empty(shape, np.uint8) if memory is None else memory.take(shape[0] * shape[1]).reshape(shape)
    check(lib.quant_regroup_q5_0(rows_ptr(raw), stride, n_out, n_in, bytes_of(out, True)))
    return out


class Matrix:
    """A weight matrix as C sees it (kvc_matrix): n_out rows of n_in values
    of the element type type_name, in raw (checked by matrix_stride). A Q5_0
    matrix whose rows are whole groups of 128 values is kept as a regrouped
    copy (regroup_q5_0, in memory when given; 44 MB for Gemma 3 270M), which
    the x86 kernels unpack with fewer instructions (docs/benchmarks.md, "Q5_0
    regrouped")."""

    def __init__(self, type_name, raw, n_out, n_in, memory=None):
        if type_name not in TYPES:
            raise ValueError(f"unsupported weight type {type_name!r}; known: {', '.join(TYPES)}")
        if type_name == "Q5_0" and n_in % 128 == 0:
            type_name, raw = "Q5_0_G4", regroup_q5_0(raw, n_out, n_in, memory)
        self.n_out, self.n_in = n_out, n_in
        self.stride = matrix_stride(raw, TYPES[type_name], n_out, n_in)
        self.raw = raw
        self.c = ffi.new("kvc_matrix *", {"type": TYPES[type_name], "w": rows_ptr(raw),
                                          "row_stride": self.stride})


class Block:
    """One layer as block.c runs it (kvc_block). tensors: the layer's
    tensors by their GGUF names, a Matrix for each of attn_q, attn_k, attn_v,
    attn_output, ffn_gate, ffn_up, ffn_down, and a float32 vector for
    attn_norm, ffn_norm and, where the architecture has them, attn_q_norm,
    attn_k_norm, post_attention_norm, post_ffw_norm; act: a key of
    ACTIVATIONS; rope_neox: NEOX pairs, else NORM."""

    def __init__(self, n_embd, n_head, n_head_kv, head_dim, n_ff, act, rope_neox,
                 norm_eps, attn_scale, tensors):
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; one of {tuple(ACTIVATIONS)}")
        q, kv = n_head * head_dim, n_head_kv * head_dim
        shapes = {"attn_q": (q, n_embd), "attn_k": (kv, n_embd), "attn_v": (kv, n_embd),
                  "attn_output": (n_embd, q), "ffn_gate": (n_ff, n_embd),
                  "ffn_up": (n_ff, n_embd), "ffn_down": (n_embd, n_ff)}
        sizes = {"attn_norm": n_embd, "ffn_norm": n_embd, "attn_q_norm": head_dim,
                 "attn_k_norm": head_dim, "post_attention_norm": n_embd,
                 "post_ffw_norm": n_embd}
        fields = {}
        for name, shape in shapes.items():
            m = tensors.get(name)
            if not isinstance(m, Matrix) or (m.n_out, m.n_in) != shape:
                raise ValueError(f"{name} must be a {shape[0]} x {shape[1]} Matrix")
            fields[name] = m.c[0]
        for name, n in sizes.items():
            w = tensors.get(name)
            if w is None and name in ("attn_norm", "ffn_norm"):
                raise ValueError(f"{name} is required")
            fields[name] = ffi.NULL if w is None else _vector(w, n, name)
        self.keep = (dict(tensors), fields)   # the buffers the struct points into
        self.n_embd, self.n_rot = n_embd, head_dim // 2
        self.c = ffi.new("kvc_block *", dict(
            fields, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
            n_ff=n_ff, act=ACTIVATIONS[act], rope_neox=1 if rope_neox else 0,
            norm_eps=norm_eps, attn_scale=attn_scale))


class Scratch:
    """The intermediate rows of blocks shaped like `block`, for up to
    n_tokens tokens: allocated once (per context), freed with this object."""

    def __init__(self, block, n_tokens):
        out = ffi.new("kvc_scratch **")
        check(lib.block_scratch_new(block.c, as_int(n_tokens, "n_tokens", 1), out))
        self.c = ffi.gc(out[0], lib.block_scratch_free)
        self.n_tokens = n_tokens

    def times(self):
        """(seconds in matmuls, seconds in attention) of the calls so far."""
        mm, att = ffi.new("double *"), ffi.new("double *")
        lib.block_scratch_times(self.c, mm, att)
        return mm[0], att[0]


class LayerKV:
    """One layer's K/V rows as C sees them (kvc_layer_kv): k and v, uint8
    (n_rows, row bytes) arrays of rows of n_values values of type_k, type_v."""

    def __init__(self, type_k, k, type_v, v, n_values):
        n_rows = k.shape[0]
        for name, rows, t in (("k", k, type_k), ("v", v, type_v)):
            if not isinstance(rows, np.ndarray) or rows.dtype != _U8 \
                    or rows.shape != (n_rows, row_bytes(t, n_values)) \
                    or not rows.flags.c_contiguous:
                raise ValueError(f"{name} rows must be contiguous uint8 ({n_rows}, row bytes)")
        self.keep = (k, v)
        self.c = ffi.new("kvc_layer_kv *", {
            "type_k": type_k, "type_v": type_v, "k": bytes_of(k, True), "v": bytes_of(v, True),
            "n_rows": n_rows, "n_values": n_values})


def _int32_vector(a, name):
    if not isinstance(a, np.ndarray) or a.dtype != np.int32 or a.ndim != 1 \
            or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous int32 vector")
    return int32s(a) if len(a) else ffi.NULL


class UbatchView:
    """An applied ubatch as C sees it (kvc_ubatch), over int32 vectors made
    once: token t's K/V rows go to cell slots[t] and it attends
    cells[lo[t]:hi[t]]. set() says how many tokens and list entries are in
    use; it starts with none (C then refuses it)."""

    def __init__(self, slots, cells, lo, hi):
        for name, a in (("slots", slots), ("lo", lo), ("hi", hi), ("cells", cells)):
            _int32_vector(a, name)
        if len(lo) != len(slots) or len(hi) != len(slots):
            raise ValueError(f"{len(slots)} slots need {len(slots)} ranges")
        self.keep = (slots, cells, lo, hi)
        self.c = ffi.new("kvc_ubatch *", {
            "n_tokens": 0, "slots": int32s(slots), "lo": int32s(lo), "hi": int32s(hi),
            "cells": int32s(cells) if len(cells) else ffi.NULL, "n_list": 0})

    def set(self, n_tokens, n_list, cells=None):
        """n_tokens tokens and n_list list entries in use; cells: a new list
        vector in place of the old one."""
        if cells is not None:
            _int32_vector(cells, "cells")
            if not len(cells):
                raise ValueError("cells must not be empty")
            self.keep = (self.keep[0], cells, *self.keep[2:])
            self.c.cells = int32s(cells)
        if not (0 <= n_tokens <= len(self.keep[0]) and 0 <= n_list <= len(self.keep[1])):
            raise ValueError(f"{n_tokens} tokens and {n_list} cells do not fit the view")
        self.c.n_tokens, self.c.n_list = n_tokens, n_list


def block_run(block, kv, ubatch, scratch, x, cos, sin, out_rows, n_threads):
    """Runs one layer (Block) on x (float32 (n, n_embd), in place), its K/V
    rows kv (LayerKV) and the applied ubatch (UbatchView); cos, sin: float32
    (n, ..., head_dim/2); out_rows: None, or the int32 rows that go on after
    attention (x's first len(out_rows) rows are then theirs)."""
    n = x.shape[0] if x.ndim == 2 else 0
    if x.dtype != _F32 or x.shape != (n, block.n_embd) or not x.flags.c_contiguous \
            or not x.flags.writeable:
        raise ValueError(f"x must be a writable contiguous float32 (n, {block.n_embd}) array")
    for a in (cos, sin):
        if a.dtype != _F32 or a.size != n * block.n_rot or not a.flags.c_contiguous:
            raise ValueError(f"cos and sin must be contiguous float32, {n} x {block.n_rot}")
    rows, n_out = ffi.NULL, -1
    if out_rows is not None:
        rows, n_out = _int32_vector(out_rows, "out_rows"), len(out_rows)
    status = lib.block_run(block.c, kv.c, ubatch.c, scratch.c, ffi.from_buffer(_FLOATS, x), n,
                           ffi.from_buffer(_FLOATS, cos), ffi.from_buffer(_FLOATS, sin),
                           rows, n_out, check_threads(n_threads))
    if status:
        check(status)


def block_output(norm, eps, head, softcap, x, scratch, n_threads):
    """Logits float32 (n, head.n_out) of the rows x (float32 (n, n_embd),
    normed in place with norm): head(norm(x)), soft-capped when softcap > 0."""
    n = x.shape[0] if x.ndim == 2 else -1
    if x.dtype != _F32 or x.shape != (n, head.n_in) or not x.flags.c_contiguous \
            or not x.flags.writeable:
        raise ValueError(f"x must be a writable contiguous float32 (n, {head.n_in}) array")
    logits = np.empty((n, head.n_out), np.float32)
    if n:
        check(lib.block_output(_vector(norm, head.n_in, "norm"), eps, head.c, head.n_out,
                               head.n_in, softcap, ffi.from_buffer(_FLOATS, x), n,
                               ffi.from_buffer(_FLOATS, logits), scratch.c,
                               check_threads(n_threads)))
    return logits


class Stack:
    """A model as stack_run runs it (kvc_stack): the token embeddings
    token_embd (Matrix) scaled by embd_scale, the Blocks, per layer the
    index of its RoPE table among rotations ((inv_freq, freq_scale) pairs:
    pair i of a token at p turns by (p * freq_scale) * inv_freq[i], float64),
    and the head (norm: float32 vector, eps, head: Matrix, logits
    soft-capped when softcap > 0)."""

    def __init__(self, token_embd, embd_scale, blocks, rope, rotations, norm, eps, head,
                 softcap):
        n_rope = len(rotations)
        if not blocks or len(rope) != len(blocks) or not 1 <= n_rope <= lib.KVC_MAX_ROPE \
                or not all(0 <= r < n_rope for r in rope):
            raise ValueError(f"a stack needs one or more blocks, 1 to {lib.KVC_MAX_ROPE} RoPE "
                             f"tables and a table in [0, {n_rope}) for each block")
        self.blocks, self.n_layer = blocks, len(blocks)
        self.n_embd, self.n_rot, self.n_vocab = blocks[0].n_embd, blocks[0].n_rot, head.n_out
        if any((b.n_embd, b.n_rot) != (self.n_embd, self.n_rot) for b in blocks) \
                or head.n_in != self.n_embd \
                or (token_embd.n_out, token_embd.n_in) != (self.n_vocab, self.n_embd):
            raise ValueError("the embeddings, blocks and head of a stack must share their sizes")
        c_blocks = ffi.new("kvc_block[]", len(blocks))
        for i, b in enumerate(blocks):
            c_blocks[i] = b.c[0]
        rope = np.array(rope, np.int32)
        scales = np.array([fs for _, fs in rotations], np.float64)
        inv_freq = np.concatenate([np.asarray(f, np.float64) for f, _ in rotations])
        if inv_freq.shape != (n_rope * self.n_rot,):
            raise ValueError(f"each RoPE table needs {self.n_rot} frequencies")
        self.keep = (c_blocks, rope, scales, inv_freq, norm, head, token_embd)
        self.c = ffi.new("kvc_stack *", {
            "token_embd": token_embd.c[0], "embd_scale": embd_scale,
            "n_layer": len(blocks), "blocks": c_blocks, "rope": int32s(rope), "n_rope": n_rope,
            "freq_scale": ffi.from_buffer("double[]", scales),
            "inv_freq": ffi.from_buffer("double[]", inv_freq),
            "output_norm": _vector(norm, self.n_embd, "norm"), "output_eps": eps,
            "softcap": softcap, "head": head.c[0], "n_vocab": head.n_out})


class LayerViews:
    """Each layer's K/V rows and applied ubatch, (LayerKV, UbatchView) pairs,
    as stack_run takes them."""

    def __init__(self, pairs):
        self.n_layer = len(pairs)
        self.keep = pairs
        self.kv = ffi.new("kvc_layer_kv *[]", [kv.c for kv, _ in pairs])
        self.ub = ffi.new("kvc_ubatch *[]", [ub.c for _, ub in pairs])


def stack_run(stack, views, scratch, tokens, pos, out_rows, n_threads):
    """Logits float32 (len(out_rows), n_vocab) of the rows out_rows of the
    ubatch tokens at positions pos (int32 vectors) through the whole model
    (Stack), on the memory's views (LayerViews), its rows in scratch."""
    n = len(tokens)
    c_tokens, c_pos = _int32_vector(tokens, "tokens"), _int32_vector(pos, "pos")
    c_rows = _int32_vector(out_rows, "out_rows")
    if len(pos) != n:
        raise ValueError(f"{n} tokens need {n} positions")
    if views.n_layer != stack.n_layer:
        raise ValueError(f"{views.n_layer} layer views for {stack.n_layer} layers")
    logits = np.empty((len(out_rows), stack.n_vocab), np.float32)
    status = lib.stack_run(stack.c, views.kv, views.ub, scratch.c, c_tokens, c_pos, n, c_rows,
                           len(out_rows),
                           ffi.from_buffer(_FLOATS, logits) if len(out_rows) else ffi.NULL,
                           check_threads(n_threads))
    if status:
        check(status)
    return logits
