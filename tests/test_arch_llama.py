"""llama forward pass (kvcells.arch.llama) against the dense reference:
quantised weights, untied output, grouped-query shapes."""
import numpy as np
import pytest
from reference_forward import ReferenceModel, decode_ubatch

from kvcells import Model


def decode_one_by_one(model, tokens, type_kv="f32"):
    mem = model.make_memory(64, 1, 16, type_kv, type_kv)
    rows = [decode_ubatch(model, mem, tokens[:6], np.arange(6), [0] * 6)]
    for p in range(6, len(tokens)):
        rows.append(decode_ubatch(model, mem, tokens[p:p + 1], [p], [0]))
    return np.concatenate(rows)


@pytest.mark.parametrize("qtype,kw", [
    ("Q8_0", {}), ("Q4_K_M", {}), ("F16", {"tied": False}),
    ("F32", {"n_head_kv": 1}), ("F32", {"n_head_kv": 4}),
    ("F32", {"rope_base": 500000.0}),
])
def test_cached_decoding_equals_dense_reference(tiny_gguf, qtype, kw):
    path = tiny_gguf("llama", qtype, **kw)
    model = Model.load(path)
    tokens = np.random.default_rng(7).integers(0, model.hparams.n_vocab, 20)
    want = ReferenceModel(path).logits(tokens)
    assert np.abs(decode_one_by_one(model, tokens) - want).max() <= 1e-4


def test_f16_cache_stays_close_to_reference(tiny_gguf):
    path = tiny_gguf("llama")
    model = Model.load(path)
    tokens = np.random.default_rng(8).integers(0, model.hparams.n_vocab, 20)
    want = ReferenceModel(path).logits(tokens)
    assert np.abs(decode_one_by_one(model, tokens, "f16") - want).max() <= 1e-2

