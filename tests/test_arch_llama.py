"""llama forward pass (kvcells.arch.llama) against the dense reference:
quantised weights, untied output, grouped-query shapes."""
import os

import numpy as np
import pytest
from reference_forward import QUANT_TOL, ReferenceModel, compare_decoding, decode_one_by_one

from kvcells import GGUFError, Model, load_gguf
from kvcells.arch import build


@pytest.mark.parametrize("qtype,kw", [
    ("F32", {}), ("F16", {"tied": False}), ("BF16", {}), ("F32", {"n_head_kv": 1}),
    ("F32", {"n_head_kv": 4}), ("F32", {"rope_base": 500000.0}),
])
def test_cached_decoding_equals_dense_reference(tiny_gguf, qtype, kw):
    path = tiny_gguf("llama", qtype, **kw)
    tokens = np.random.default_rng(7).integers(0, 300, 20)
    to_recomputed, to_reference = compare_decoding(Model.load(path), path, tokens)
    assert to_recomputed <= 1e-4 and to_reference <= 1e-4


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "Q4_K_M", "Q5_K"])
def test_quantised_weights(tiny_gguf, qtype):
    path = tiny_gguf("llama", qtype)
    tokens = np.random.default_rng(7).integers(0, 300, 20)
    to_recomputed, to_reference = compare_decoding(Model.load(path), path, tokens)
    assert to_recomputed <= 1e-4 and to_reference <= QUANT_TOL


def test_f16_cache_stays_close_to_reference(tiny_gguf):
    path = tiny_gguf("llama")
    model = Model.load(path)
    tokens = np.random.default_rng(8).integers(0, model.hparams.n_vocab, 20)
    want = ReferenceModel(path).logits(tokens)
    assert np.abs(decode_one_by_one(model, tokens, type_kv="f16") - want).max() <= 1e-2



def test_llama3_rope_frequency_factors_are_refused(tiny_gguf):
    """rope_freqs.weight (llama 3's per-frequency RoPE factors) would change
    every rotation; the forward pass refuses it rather than ignoring it."""
    file = load_gguf(tiny_gguf("llama"))
    file.tensors["rope_freqs.weight"] = np.ones(file.hparams.head_dim // 2, np.float32)
    with pytest.raises(GGUFError, match="rope_freqs"):
        build(file)


def test_agrees_with_llamacpp(tiny_gguf):
    """llama.cpp's logits for the same tiny file (tools/make_tiny_gguf.py,
    llama, F32, seed 0: 4 query heads on 2 KV heads, NORM RoPE) and 40
    tokens, recorded with llama-cpp-python 0.3.36 (f32 KV cache, no flash
    attention): our cached decoding matches them (measured 2.6e-6)."""
    path = tiny_gguf("llama")
    data = os.path.join(os.path.dirname(__file__), "data", "tiny_llama_llamacpp_logits.npz")
    with np.load(data) as f:
        tokens, want = f["tokens"], f["logits"]
    assert np.abs(decode_one_by_one(Model.load(path), tokens) - want).max() <= 1e-4
