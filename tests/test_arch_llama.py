"""llama forward pass (kvcells.arch.llama) against the dense reference:
quantised weights, untied output, grouped-query shapes."""
import numpy as np
import pytest
from reference_forward import QUANT_TOL, ReferenceModel, compare_decoding, decode_one_by_one

from kvcells import Model


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

