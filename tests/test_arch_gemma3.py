"""Gemma 3 forward pass (kvcells.arch.gemma3) against the dense reference:
sliding-window layers on the ISWA cache, window reuse, SWA patterns."""
import dataclasses
import os

import numpy as np
import pytest
from reference_forward import (QUANT_TOL, ReferenceModel, causal_mask, compare_decoding,
                               decode_one_by_one, decode_ubatch)

import reference_forward
from kvcells import Model, load_gguf


def test_window_8_decoding_40_tokens_equals_dense_windowed_recompute(tiny_gguf):
    path = tiny_gguf("gemma3", n_swa=8)
    model = Model.load(path)
    assert model.hparams.n_swa == 8 and any(model.hparams.swa_layers)
    tokens = np.random.default_rng(1).integers(0, model.hparams.n_vocab, 40)
    ref = ReferenceModel(path)
    want = ref.logits(tokens)
    assert np.abs(decode_one_by_one(model, tokens) - want).max() <= 1e-4

    # the window matters here: without it the dense logits are different
    mask = reference_forward.causal_mask
    try:
        reference_forward.causal_mask = lambda n, window=0: mask(n)
        unwindowed = ref.logits(tokens)
    finally:
        reference_forward.causal_mask = mask
    assert np.abs(unwindowed[8:] - want[8:]).max() > 1e-2


def test_window_8_agrees_with_llamacpp(tiny_gguf):
    """llama.cpp's logits for the same tiny file (tools/make_tiny_gguf.py,
    gemma3, F32, window 8, seed 0) and 40 tokens: both our cached decoding
    and the dense reference match them. Recorded with llama-cpp-python
    0.3.36, f32 KV cache, no flash attention; a window one token wider
    (positions p-8..p) would differ from them by more than 2."""
    path = tiny_gguf("gemma3", n_swa=8)
    data = os.path.join(os.path.dirname(__file__), "data", "tiny_gemma3_swa8_llamacpp_logits.npz")
    with np.load(data) as f:
        tokens, want = f["tokens"], f["logits"]
    got = decode_one_by_one(Model.load(path), tokens)
    assert np.abs(got - want).max() <= 1e-2
    assert np.abs(ReferenceModel(path).logits(tokens) - want).max() <= 1e-2


def test_sliding_cells_are_reused_past_the_sliding_cache_size(tiny_gguf):
    """300 tokens through a sliding-window cache of 256 cells (window 8 +
    ubatch 16, padded): cells of tokens out of the window are overwritten
    while the full-attention layer still sees everything."""
    path = tiny_gguf("gemma3", n_swa=8)
    model = Model.load(path)
    tokens = np.random.default_rng(2).integers(0, model.hparams.n_vocab, 300)
    got = decode_one_by_one(model, tokens, n_ctx=512, n_ubatch=16, first=16)
    want = ReferenceModel(path).logits(tokens)
    assert np.abs(got - want).max() <= 1e-4


def test_window_64_with_ubatches_of_mixed_sizes_past_the_sliding_cache(tiny_gguf):
    """Window 64, n_ubatch 16 (sliding cache 256 cells), 420 tokens in
    ubatches of 16, 7, 1, 13, 3 tokens in turn: every logit row equals the
    dense windowed reference."""
    path = tiny_gguf("gemma3", n_swa=64)
    model = Model.load(path)
    tokens = np.random.default_rng(5).integers(0, 300, 420)
    mem = model.make_memory(512, 1, 16, "f32", "f32")
    rows, p, sizes = [], 0, [16, 7, 1, 13, 3]
    while p < len(tokens):
        n = min(sizes[len(rows) % len(sizes)], len(tokens) - p)
        rows.append(decode_ubatch(model, mem, tokens[p:p + n], np.arange(p, p + n), [0] * n))
        p += n
    want = ReferenceModel(path).logits(tokens)
    assert np.abs(np.concatenate(rows) - want).max() <= 1e-4


@pytest.mark.parametrize("qtype,kw", [
    ("F32", {"swa_pattern": [True, False, True, True, False, True]}),
    ("F32", {"n_swa": 0}),
    ("F32", {"n_swa": 5, "swa_pattern": 3}),
    ("F16", {"tied": False, "n_head_kv": 1}),
    ("Q4_K_M", {}),
    ("Q5_1", {}),
])
def test_cached_decoding_equals_dense_reference(tiny_gguf, qtype, kw):
    path = tiny_gguf("gemma3", qtype, **kw)
    tokens = np.random.default_rng(3).integers(0, 300, 24)
    to_recomputed, to_reference = compare_decoding(Model.load(path), path, tokens)
    assert to_recomputed <= 1e-4
    assert to_reference <= (1e-4 if qtype.startswith(("F", "BF")) else QUANT_TOL)


def test_causal_mask_of_the_reference():
    """The reference's window: query i sees keys i-window+1 .. i."""
    m = causal_mask(5, window=2)
    assert (np.isfinite(m) == np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0],
                                        [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], bool)).all()


def test_final_logit_softcapping(tiny_gguf):
    """gemma3.final_logit_softcapping c (absent in Gemma 3 270M) maps the
    logits to c * tanh(logits / c)."""
    path = tiny_gguf("gemma3")
    tokens = np.random.default_rng(4).integers(0, 300, 10)
    plain = decode_one_by_one(Model.load(path), tokens)
    file = load_gguf(path)
    file.hparams = dataclasses.replace(file.hparams, logit_softcap=2.0)
    capped = decode_one_by_one(Model(file), tokens)
    assert np.abs(capped - 2.0 * np.tanh(plain / 2.0)).max() <= 1e-5
    assert np.abs(plain).max() > 2.5
