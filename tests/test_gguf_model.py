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


@pytest.mark.parametrize("arch,qtype", [("llama", "F32"), ("gemma3", "Q4_K_M"),
                                        ("llama", "Q4_1")])
def test_metadata_and_tensors_match_gguf_reader(tiny_gguf, arch, qtype):
    path = tiny_gguf(arch, qtype)
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
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


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
