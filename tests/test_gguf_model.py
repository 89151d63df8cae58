"""GGUF loading, checked against gguf-py's own reader and dequantiser.

Malformed files are made by re-serialising a valid tiny file (read with
gguf-py's GGUFReader) with one field changed, or by cutting/flipping bytes.
"""
import math
import struct
import time

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT
from hypothesis import HealthCheck, given, settings, strategies as st
from make_tiny_gguf import tiny_vocab

from kvcells import GGUFError, load_gguf
from kvcells.gguf_model import Weight

WEIGHT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                "Q4_K", "Q5_K", "Q6_K"]


# --- an independent GGUF serialiser for the malformed-file cases --------------

_FMT = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h",
        VT.UINT32: "I", VT.INT32: "i", VT.FLOAT32: "f", VT.BOOL: "?",
        VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d"}


def enc_str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def enc_payload(vtype, v):
    return enc_str(v) if vtype == VT.STRING else struct.pack("<" + _FMT[vtype], v)


def enc_value(vtype, v, etype=None):
    out = struct.pack("<I", vtype)
    if vtype == VT.ARRAY:
        return out + struct.pack("<IQ", etype, len(v)) + b"".join(enc_payload(etype, x) for x in v)
    return out + enc_payload(vtype, v)


class GGUFParts:
    """A GGUF file as editable parts: kvs [(key, encoded value)], tensor infos
    [name, dims, type id, offset], the data section."""

    def __init__(self, path):
        r = gguf.GGUFReader(path)
        self.kvs = []
        for key, f in r.fields.items():
            if key.startswith("GGUF."):
                continue
            etype = f.types[-1] if f.types[0] == VT.ARRAY else None
            self.kvs.append((key, enc_value(f.types[0], f.contents(), etype)))
        self.tensors = [[t.name, [int(d) for d in t.shape], int(t.tensor_type),
                         t.data_offset - r.data_offset] for t in r.tensors]
        self.data = bytes(r.data[r.data_offset:])
        self.version = 3

    def set(self, key, vtype, value, etype=None):
        raw = enc_value(vtype, value, etype)
        self.kvs = [(k, raw if k == key else v) for k, v in self.kvs]
        if key not in dict(self.kvs):
            self.kvs.append((key, raw))

    def drop(self, key):
        self.kvs = [(k, v) for k, v in self.kvs if k != key]

    def tensor(self, name):
        return next(t for t in self.tensors if t[0] == name)

    def to_bytes(self, alignment=32):
        out = b"GGUF" + struct.pack("<IQQ", self.version, len(self.tensors), len(self.kvs))
        for key, raw in self.kvs:
            out += enc_str(key) + raw
        for name, dims, type_id, offset in self.tensors:
            out += enc_str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims,
                                               type_id, offset)
        return out + b"\0" * (-len(out) % alignment) + self.data

    def write(self, path):
        path.write_bytes(self.to_bytes())
        return path


@pytest.fixture
def parts(tiny_gguf):
    return GGUFParts(tiny_gguf("llama", "F32"))


def assert_gguf_error(path, *words):
    with pytest.raises(GGUFError) as e:
        load_gguf(path)
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, msg
    return msg


# --- valid files ----------------------------------------------------------------

def test_reserialised_file_is_byte_identical(tiny_gguf, tmp_path):
    path = tiny_gguf("gemma3", "Q8_0")
    assert GGUFParts(path).to_bytes() == open(path, "rb").read()


@pytest.mark.parametrize("arch,qtype,kw", [("llama", "F32", {}), ("gemma3", "Q4_K_M", {}),
                                           ("llama", "Q4_1", {"alignment": 256}),
                                           ("gemma3", "F16", {"tied": False})])
def test_metadata_and_tensors_match_gguf_reader(tiny_gguf, arch, qtype, kw):
    path = tiny_gguf(arch, qtype, **kw)
    m = load_gguf(path)
    r = gguf.GGUFReader(path)
    want = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert m.metadata.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, float) or (isinstance(v, list) and v and isinstance(v[0], float)):
            np.testing.assert_array_equal(np.float32(m.metadata[k]), np.float32(v))
        else:
            assert m.metadata[k] == v, k
    assert m.arch == arch
    assert m.tensors.keys() == {t.name for t in r.tensors}
    for t in r.tensors:
        ours = m.tensors[t.name]
        shape = tuple(int(d) for d in reversed(t.shape))
        if len(shape) == 1:
            assert ours.dtype == np.float32
            np.testing.assert_array_equal(ours, gguf.quants.dequantize(t.data, t.tensor_type))
        else:
            assert isinstance(ours, Weight)
            assert (ours.name, ours.type, ours.shape) == (t.name, t.tensor_type.name, shape)
            assert ours.raw.dtype == np.uint8 and ours.raw.shape[0] == shape[0]
            assert ours.raw.tobytes() == t.data.tobytes()


@pytest.mark.parametrize("qtype", WEIGHT_TYPES)
def test_weight_ops_match_gguf_dequantize(tiny_gguf, qtype):
    path = tiny_gguf("gemma3", qtype)
    m = load_gguf(path)
    r = gguf.GGUFReader(path)
    rng = np.random.default_rng(1)
    for t in r.tensors:
        if len(t.shape) != 2:
            continue
        w = m.tensors[t.name]
        assert w.type == qtype
        full = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        full = full.reshape(w.shape)
        np.testing.assert_array_equal(w.dequantize(), full)
        ids = rng.integers(0, w.shape[0], size=5)
        np.testing.assert_array_equal(w.rows(ids), full[ids])
        x = rng.standard_normal((3, w.shape[1])).astype(np.float32)
        y = w.matmul(x)
        assert y.dtype == np.float32 and y.shape == (3, w.shape[0])
        ref = x.astype(np.float64) @ full.T.astype(np.float64)
        bound = activation_rounding_bound(x, full) if qtype.startswith("Q") else 0.0
        assert np.all(np.abs(y - ref) <= bound + 1e-4 * np.abs(ref).max())


def activation_rounding_bound(x, w):
    """Quantised weights multiply int8 activations: each block of 32 values is
    rounded to steps of max|x|/127, so an output moves by at most half a step
    times the block's sum of |w| (docs/benchmarks.md, "Accuracy")."""
    half_step = np.abs(x.reshape(len(x), -1, 32)).max(axis=2) / 127 / 2
    w_abs = np.abs(w.astype(np.float64)).reshape(len(w), -1, 32).sum(axis=2)
    return half_step @ w_abs.T


def test_version_2_files_load(parts, tmp_path):
    parts.version = 2
    m = load_gguf(parts.write(tmp_path / "v2.gguf"))
    assert m.hparams.n_layer == 2


def test_vocabulary_size_comes_from_the_token_list(parts, tmp_path):
    n = len(tiny_vocab("llama")[0])
    parts.set("llama.vocab_size", VT.UINT32, n + 5)      # llama.cpp ignores it here
    assert load_gguf(parts.write(tmp_path / "a.gguf")).hparams.n_vocab == n
    parts.drop("tokenizer.ggml.tokens")
    assert_gguf_error(parts.write(tmp_path / "b.gguf"), "token_embd.weight",
                      f"expected ({n + 5}, 64)")
    parts.drop("llama.vocab_size")
    assert load_gguf(parts.write(tmp_path / "c.gguf")).hparams.n_vocab == n


def test_weights_are_a_read_only_copy_of_the_file(tiny_gguf, tmp_path):
    """The tensor data is read into memory at load (on huge pages where the
    kernel gives them), so bytes rewritten on disk later do not reach it."""
    path = tmp_path / "m.gguf"
    path.write_bytes(open(tiny_gguf("llama", "Q8_0"), "rb").read())
    model = load_gguf(path)
    w = model.tensors["blk.0.attn_q.weight"]
    want = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight").data.tobytes()
    assert w.raw.tobytes() == want
    with pytest.raises(ValueError):
        w.raw[0, 0] = 1
    at = path.read_bytes().find(want)
    with open(path, "r+b") as f:   # rewritten in place, same size
        f.seek(at)
        f.write(bytes(255 - b for b in want))
    assert w.raw.tobytes() == want


def test_weight_rejects_bad_arguments(tiny_gguf):
    w = load_gguf(tiny_gguf("llama", "Q8_0")).tensors["blk.0.attn_q.weight"]
    for ids in ([w.shape[0]], [-1], [[0, 1]], [0.5]):
        with pytest.raises(ValueError):
            w.rows(ids)
    assert w.rows([]).shape == (0, w.shape[1])
    for x in (np.zeros((2, w.shape[1] + 1)), np.zeros(w.shape[1])):
        with pytest.raises(ValueError):
            w.matmul(x)


def test_llama_hparams_follow_the_file(tiny_gguf):
    hp = load_gguf(tiny_gguf("llama", "F16", n_layer=3, n_embd=64, n_head=4,
                             n_head_kv=2, n_ff=96, rope_base=5e5)).hparams
    tokens = tiny_vocab("llama")[0]
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff) == \
        (3, 64, 4, 2, 16, 96)
    assert hp.n_vocab == len(tokens)
    assert hp.n_ctx_train == 1024
    assert (hp.n_swa, hp.swa_type, hp.swa_layers) == (0, "none", [False] * 3)
    assert hp.rope_mode == "norm" and hp.rope_base == 5e5 and hp.rope_freq_scale == 1.0
    assert hp.norm_eps == pytest.approx(1e-6)
    assert hp.attn_scale == pytest.approx(1 / 4)
    for k in hp.keys():
        assert hp[k] == getattr(hp, k)
    with pytest.raises(KeyError):
        hp["nope"]


@pytest.mark.parametrize("n_layer,pattern,want", [
    (6, None, [True] * 5 + [False]),                   # llama.cpp's default period 6
    (8, None, [True] * 5 + [False] + [True] * 2),
    (5, 2, [True, False, True, False, True]),          # period written in the file
    (3, [False, True, True], [False, True, True]),     # explicit per-layer flags
    (4, [True, True], [True, True, False, False]),     # short array: the rest full
])
def test_gemma3_swa_layers(tiny_gguf, tmp_path, n_layer, pattern, want):
    hp = load_gguf(tiny_gguf("gemma3", "Q8_0", n_layer=n_layer, n_swa=8,
                             swa_pattern=pattern)).hparams
    assert (hp.n_swa, hp.swa_type, hp.swa_layers) == (8, "standard", want)
    assert hp.rope_mode == "neox"
    assert (hp.rope_base, hp.rope_base_swa) == (1e6, 1e4)
    assert hp.head_dim == 32 and hp.n_head * hp.head_dim != hp.n_embd
    assert hp.attn_scale == pytest.approx(1 / math.sqrt(32))


def test_gemma3_without_window_has_no_swa_layers(tiny_gguf):
    hp = load_gguf(tiny_gguf("gemma3", "F32", n_swa=0)).hparams
    assert (hp.n_swa, hp.swa_type, hp.swa_layers) == (0, "none", [False] * hp.n_layer)


def test_gemma3_optional_keys_are_read(tiny_gguf, tmp_path):
    p = GGUFParts(tiny_gguf("gemma3", "F32"))
    p.set("gemma3.rope.freq_base_swa", VT.FLOAT32, 20000.0)
    p.set("gemma3.rope.scaling.type", VT.STRING, "linear")
    p.set("gemma3.rope.scaling.factor", VT.FLOAT32, 8.0)
    p.set("gemma3.final_logit_softcapping", VT.FLOAT32, 30.0)
    hp = load_gguf(p.write(tmp_path / "m.gguf")).hparams
    assert (hp.rope_base_swa, hp.rope_freq_scale, hp.rope_freq_scale_swa) == (2e4, 1 / 8, 1.0)
    assert hp.logit_softcap == 30.0


# --- the real model -----------------------------------------------------------

@pytest.fixture(scope="module")
def real(real_model_path):
    t0 = time.perf_counter()
    m = load_gguf(real_model_path)
    print(f"\nload_gguf(Gemma 3 270M Q4_K_M): {time.perf_counter() - t0:.2f} s")
    return m


def test_real_model_hparams(real):
    hp = real.hparams
    assert real.arch == "gemma3"
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff,
            hp.n_vocab) == (18, 640, 4, 1, 256, 2048, 262144)
    assert hp.n_swa == 512 and hp.swa_type == "standard"
    assert hp.swa_layers == [i % 6 != 5 for i in range(18)]
    assert (hp.rope_base, hp.rope_base_swa) == (1e6, 1e4)
    assert hp.attn_scale == 1 / 16
    types = {t.type for t in real.tensors.values() if isinstance(t, Weight)}
    assert types == {"Q8_0", "Q5_0", "Q4_K", "Q6_K"}
    assert "output.weight" not in real.tensors          # tied to token_embd
    assert real.tensors["token_embd.weight"].shape == (262144, 640)
    assert len(real.metadata["tokenizer.ggml.tokens"]) == 262144


def test_real_model_matches_gguf_reader(real, real_model_path):
    """Every key and tensor equals what gguf's reader finds (slow: it parses the
    whole vocabulary), and embedding rows decode like gguf's dequantiser."""
    r = gguf.GGUFReader(real_model_path)
    want = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert real.metadata == want
    assert real.tensors.keys() == {t.name for t in r.tensors}
    for t in r.tensors:
        ours = real.tensors[t.name]
        if isinstance(ours, Weight):
            assert (ours.type, ours.shape) == (t.tensor_type.name, tuple(reversed(t.shape.tolist())))
            assert ours.raw.tobytes() == t.data.tobytes(), t.name
        else:
            np.testing.assert_array_equal(ours, t.data)
    t = next(t for t in r.tensors if t.name == "token_embd.weight")
    ids = [0, 2, 651, 100000, 262143]
    want = gguf.quants.dequantize(t.data[ids], t.tensor_type)
    np.testing.assert_array_equal(real.tensors["token_embd.weight"].rows(ids), want)


# --- malformed files ------------------------------------------------------------

def test_missing_empty_and_directory_paths(tmp_path):
    assert_gguf_error(tmp_path / "nope.gguf", "cannot open")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert_gguf_error(tmp_path / "empty.gguf", "empty")
    assert_gguf_error(tmp_path, "cannot open")


def set_u64_at(b, pos, v):
    return b[:pos] + struct.pack("<Q", v) + b[pos + 8:]


def kv_pos(p, key):
    """Offset of a key-value pair (its key's length field) in p.to_bytes()."""
    pos = 24
    for k, raw in p.kvs:
        if k == key:
            return pos
        pos += len(enc_str(k)) + len(raw)
    raise KeyError(key)


HEADER_CASES = {
    "bad magic": (lambda b, p: b"GGUX" + b[4:], ["not a GGUF file"]),
    "version 1": (lambda b, p: b[:4] + struct.pack("<I", 1) + b[8:], ["version 1"]),
    "version 4": (lambda b, p: b[:4] + struct.pack("<I", 4) + b[8:], ["version 4"]),
    "big-endian": (lambda b, p: b[:4] + struct.pack(">I", 3) + b[8:], ["big-endian"]),
    "huge tensor count": (lambda b, p: set_u64_at(b, 8, 2**40), ["tensor count"]),
    "huge kv count": (lambda b, p: set_u64_at(b, 16, 2**60), ["metadata count"]),
    "kv count one too many": (lambda b, p: set_u64_at(b, 16, len(p.kvs) + 1), []),
    "kv count one too few": (lambda b, p: set_u64_at(b, 16, len(p.kvs) - 1), []),
    "tensor count one too many": (lambda b, p: set_u64_at(b, 8, len(p.tensors) + 1), []),
    "huge key length": (lambda b, p: set_u64_at(b, 24, 2**63), ["truncated"]),
    "huge string array": (lambda b, p: set_u64_at(
        b, kv_pos(p, "tokenizer.ggml.tokens") + 8 + 21 + 8, 2**40), ["truncated"]),
    "huge float array": (lambda b, p: set_u64_at(
        b, kv_pos(p, "tokenizer.ggml.scores") + 8 + 21 + 8, 2**40), ["truncated"]),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_malformed_header_bytes(parts, tmp_path, case):
    edit, words = HEADER_CASES[case]
    path = tmp_path / "m.gguf"
    path.write_bytes(edit(parts.to_bytes(), parts))
    assert_gguf_error(path, *words)


def _retype(p, name, type_id):
    p.tensor(name)[2] = type_id


def _set_dims(p, name, dims):
    p.tensor(name)[1] = dims


def _insert_gap(p, name, n):
    """n unused bytes before a tensor's data; it and the tensors after it move down."""
    t = p.tensor(name)
    p.data = p.data[:t[3]] + b"\0" * n + p.data[t[3]:]
    for u in p.tensors[p.tensors.index(t):]:
        u[3] += n


def _remove_tensor(p, name):
    """Drop a tensor's info and data; the tensors after it move up."""
    t = p.tensor(name)
    i = p.tensors.index(t)
    end = p.tensors[i + 1][3] if i + 1 < len(p.tensors) else len(p.data)
    p.data = p.data[:t[3]] + p.data[end:]
    del p.tensors[i]
    for u in p.tensors[i:]:
        u[3] -= end - t[3]


PARTS_CASES = {
    "unknown value type": (lambda p: p.kvs.append(("x.bad", struct.pack("<I", 99))),
                           ["unknown value type 99"]),
    "array of arrays": (lambda p: p.kvs.append(("x.nested", struct.pack("<IIQ", 9, 9, 0))),
                        ["arrays of arrays"]),
    "invalid UTF-8 key": (lambda p: p.kvs.append((b"x.\xff\xfe", enc_value(VT.UINT8, 1))),
                          ["UTF-8"]),
    "duplicate key": (lambda p: p.kvs.append(p.kvs[3]), ["duplicate metadata key"]),
    "duplicate tensor": (lambda p: p.tensors.append(list(p.tensors[0])),
                         ["duplicate tensor"]),
    "no dimensions": (lambda p: _set_dims(p, "output_norm.weight", []), ["0 dimensions"]),
    "five dimensions": (lambda p: _set_dims(p, "output_norm.weight", [64, 1, 1, 1, 1]),
                        ["5 dimensions"]),
    "three dimensions": (lambda p: _set_dims(p, "blk.0.attn_q.weight", [64, 16, 4]),
                         ["3 dimensions"]),
    "zero dimension": (lambda p: _set_dims(p, "blk.0.attn_q.weight", [64, 0]),
                       ["invalid shape"]),
    "overflowing shape": (lambda p: _set_dims(p, "blk.0.attn_q.weight", [2**40, 2**40]),
                          ["invalid shape"]),
    "unknown tensor type": (lambda p: _retype(p, "blk.0.attn_q.weight", 99),
                            ["unknown type id 99"]),
    "unsupported Q2_K": (lambda p: _retype(p, "blk.0.attn_q.weight", QT.Q2_K), ["Q2_K"]),
    "unsupported IQ4_NL": (lambda p: _retype(p, "blk.0.attn_q.weight", QT.IQ4_NL),
                           ["IQ4_NL"]),
    "unsupported I32": (lambda p: _retype(p, "output_norm.weight", QT.I32), ["I32"]),
    "row not a block multiple": (lambda p: (_retype(p, "blk.0.attn_q.weight", QT.Q8_0),
                                            _set_dims(p, "blk.0.attn_q.weight", [48, 64])),
                                 ["block size"]),
    "data beyond the end": (lambda p: p.tensor("blk.1.ffn_down.weight").__setitem__(
        3, len(p.data)), ["beyond the end"]),
    "overlapping tensors": (lambda p: p.tensor("blk.1.ffn_down.weight").__setitem__(
        3, p.tensor("blk.1.ffn_up.weight")[3]), ["data offset", "expected"]),
    "gap beyond the alignment": (lambda p: _insert_gap(p, "blk.1.ffn_down.weight", 32),
                                 ["data offset", "expected"]),
    "huge data offset": (lambda p: p.tensor("output_norm.weight").__setitem__(3, 2**63),
                         ["beyond the end"]),
    "unaligned data offset": (lambda p: p.tensor("blk.1.ffn_down.weight").__setitem__(
        3, p.tensor("blk.1.ffn_down.weight")[3] - 4), ["alignment"]),
    "alignment not a power of two": (lambda p: p.set("general.alignment", VT.UINT32, 24),
                                     ["power of two"]),
    "alignment a string": (lambda p: p.set("general.alignment", VT.STRING, "32"),
                           ["general.alignment"]),
    # hyperparameters and tensors against them
    "unknown architecture": (lambda p: p.set("general.architecture", VT.STRING, "gpt2"),
                             ["unsupported architecture 'gpt2'"]),
    "no architecture": (lambda p: p.drop("general.architecture"),
                        ["general.architecture"]),
    "no block count": (lambda p: p.drop("llama.block_count"),
                       ["missing metadata key 'llama.block_count'"]),
    "block count a string": (lambda p: p.set("llama.block_count", VT.STRING, "2"),
                             ["'llama.block_count'", "int"]),
    "zero layers": (lambda p: p.set("llama.block_count", VT.UINT32, 0), ["block_count 0"]),
    "too many layers": (lambda p: p.set("llama.block_count", VT.UINT32, 10**6),
                        ["block_count"]),
    "more layers than tensors": (lambda p: p.set("llama.block_count", VT.UINT32, 3),
                                 ["missing tensor 'blk.2."]),
    "zero heads": (lambda p: p.set("llama.attention.head_count", VT.UINT32, 0),
                   ["head_count must be positive"]),
    "heads not a multiple of kv heads": (
        lambda p: p.set("llama.attention.head_count_kv", VT.UINT32, 3), ["multiple"]),
    "per-layer heads differ": (
        lambda p: p.set("llama.attention.head_count", VT.ARRAY, [4, 2], VT.UINT32),
        ["differ"]),
    "partial rotary": (lambda p: p.set("llama.rope.dimension_count", VT.UINT32, 8),
                       ["partial"]),
    "yarn rope scaling": (lambda p: p.set("llama.rope.scaling.type", VT.STRING, "yarn"),
                          ["rope scaling type 'yarn'"]),
    "NaN norm eps": (lambda p: p.set("llama.attention.layer_norm_rms_epsilon", VT.FLOAT32,
                                     float("nan")), ["norm_eps"]),
    "missing tensor": (lambda p: _remove_tensor(p, "blk.1.ffn_up.weight"),
                       ["missing tensor 'blk.1.ffn_up.weight'"]),
    "ffn length against tensors": (lambda p: p.set("llama.feed_forward_length",
                                                   VT.UINT32, 96),
                                   ["blk.0.ffn_gate.weight", "shape (128, 64)",
                                    "expected (96, 64)"]),
    "transposed tensor": (lambda p: _set_dims(p, "blk.0.ffn_up.weight", [128, 64]),
                          ["blk.0.ffn_up.weight", "expected (128, 64)"]),
    "vocabulary against embeddings": (
        lambda p: p.set("tokenizer.ggml.tokens", VT.ARRAY, tiny_vocab("llama")[0][:-1],
                        VT.STRING), ["token_embd.weight"]),
}


@pytest.mark.parametrize("case", PARTS_CASES)
def test_malformed_fields(parts, tmp_path, case):
    edit, words = PARTS_CASES[case]
    edit(parts)
    assert_gguf_error(parts.write(tmp_path / "m.gguf"), *words)


def test_gemma3_malformed_window(tiny_gguf, tmp_path):
    p = GGUFParts(tiny_gguf("gemma3", "F32"))
    p.set("gemma3.attention.sliding_window", VT.INT32, -1)
    assert_gguf_error(p.write(tmp_path / "a.gguf"), "sliding window")
    p = GGUFParts(tiny_gguf("gemma3", "F32"))
    p.drop("gemma3.attention.layer_norm_rms_epsilon")
    assert_gguf_error(p.write(tmp_path / "b.gguf"), "layer_norm_rms_epsilon")
    p = GGUFParts(tiny_gguf("gemma3", "F32"))
    _remove_tensor(p, "blk.3.attn_k_norm.weight")
    assert_gguf_error(p.write(tmp_path / "c.gguf"), "blk.3.attn_k_norm.weight")


def data_end(path):
    r = gguf.GGUFReader(path)
    return max(t.data_offset + t.n_bytes for t in r.tensors)


@pytest.mark.parametrize("arch,qtype", [("llama", "Q8_0"), ("gemma3", "Q4_K")])
def test_truncated_files(tiny_gguf, tmp_path, arch, qtype):
    src = tiny_gguf(arch, qtype)
    whole = open(src, "rb").read()
    end = data_end(src)
    cuts = sorted(set(range(64)) | set(np.linspace(64, end - 1, 200).astype(int)))
    for cut in cuts:
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(whole[:cut])
        with pytest.raises(GGUFError, match="cut"):
            load_gguf(path)
        path.unlink()


@pytest.fixture(scope="module")
def fuzz_source(tmp_path_factory):
    from make_tiny_gguf import write_tiny_gguf
    path = write_tiny_gguf(tmp_path_factory.mktemp("fuzz") / "f.gguf", "gemma3", "Q8_0",
                           n_layer=2)
    p = GGUFParts(path)
    info_start = 24 + sum(len(enc_str(k)) + len(raw) for k, raw in p.kvs)
    header_end = len(p.to_bytes()) - len(p.data)
    return open(path, "rb").read(), info_start, header_end, tmp_path_factory.mktemp("fz")


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_header_bytes_never_crash(fuzz_source, data):
    """Overwriting header bytes either still gives a loadable file or GGUFError."""
    whole, info_start, header_end, tmp = fuzz_source
    pos = data.draw(st.one_of(st.integers(0, 400), st.integers(info_start, header_end - 1),
                              st.integers(0, header_end - 1)))
    new = data.draw(st.binary(min_size=1, max_size=8))
    path = tmp / "corrupt.gguf"
    path.write_bytes(whole[:pos] + new + whole[pos + len(new):])
    try:
        m = load_gguf(path)
    except GGUFError as e:
        assert str(path) in str(e)
    else:
        assert m.arch in ("llama", "gemma3")


def test_make_tiny_gguf_command_line(tmp_path, capsys):
    import make_tiny_gguf
    out = tmp_path / "t.gguf"
    make_tiny_gguf.main(["--arch", "gemma3", "--type", "q6_k", "-o", str(out), "--layers", "3"])
    m = load_gguf(out)
    assert m.arch == "gemma3" and m.hparams.n_layer == 3 and m.hparams.n_swa == 8
    assert m.tensors["blk.2.ffn_down.weight"].type == "Q6_K"
    assert m.metadata["tokenizer.ggml.tokens"] == tiny_vocab("gemma3")[0]
    for bad in (["--type", "q3_k"], ["--type", "q4_k", "--n-embd", "64"]):
        with pytest.raises(SystemExit):
            make_tiny_gguf.main(["-o", str(tmp_path / "bad.gguf")] + bad)
