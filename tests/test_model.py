"""kvcells.Model: loading, memory, and the forward pass through the KV cache,
checked against the dense no-cache reference (tests/reference_forward.py) on
tiny random models, and against llama.cpp on the real Gemma 3 270M."""
import numpy as np
import pytest
from reference_forward import ReferenceModel, decode_ubatch

import kvcells
from kvcells import GGUFError, Model

ARCHS = ("llama", "gemma3")


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    """tiny(arch, qtype="F32", **kw) -> (Model, ReferenceModel), cached."""
    made = {}

    def get(arch, qtype="F32", **kw):
        key = (arch, qtype, tuple(sorted(kw.items())))
        if key not in made:
            path = tiny_gguf(arch, qtype, **kw)
            made[key] = Model.load(path), ReferenceModel(path)
        return made[key]

    return get


def random_tokens(model, n, seed):
    return np.random.default_rng(seed).integers(0, model.hparams.n_vocab, n)


def decode_in_chunks(model, mem, tokens, chunks, seq_id=0, start=0):
    """Decode `tokens` of one sequence in ubatches of the given sizes; all logits."""
    out, p = [], 0
    for c in chunks:
        pos = np.arange(start + p, start + p + c)
        out.append(decode_ubatch(model, mem, tokens[p:p + c], pos, [seq_id] * c))
        p += c
    assert p == len(tokens)
    return np.concatenate(out)


# ---- loading ----

def test_load_gives_arch_hparams_metadata_tokenizer(tiny):
    for arch in ARCHS:
        model, _ = tiny(arch)
        assert model.arch == arch
        hp = model.hparams
        assert (hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv) == (
            model.metadata[f"{arch}.block_count"], model.metadata[f"{arch}.embedding_length"],
            model.metadata[f"{arch}.attention.head_count"],
            model.metadata[f"{arch}.attention.head_count_kv"])
        assert hp.n_vocab == len(model.metadata["tokenizer.ggml.tokens"])
        ids = model.tokenizer.encode("Hello world")
        assert ids[0] == model.tokenizer.bos_id
        assert model.tokenizer.decode(ids[1:]) == "Hello world"


def test_load_missing_file_raises_gguf_error(tmp_path):
    with pytest.raises(GGUFError, match="nothing.gguf"):
        Model.load(tmp_path / "nothing.gguf")


def test_model_is_exported():
    assert kvcells.Model is Model


# ---- forward pass through the cache vs the dense reference ----

@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_equals_dense_recompute(tiny, arch):
    """A prompt in ubatches of mixed sizes, then one token at a time, with an
    f32 cache: every logit row equals the no-cache dense forward's."""
    model, ref = tiny(arch)
    tokens = random_tokens(model, 30, seed=1)
    mem = model.make_memory(64, 1, 16, "f32", "f32")
    got = decode_in_chunks(model, mem, tokens, [9, 3] + [1] * 18)
    want = ref.logits(tokens)
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_ubatch_gives_each_sequence_its_own_logits(tiny, arch):
    """Three sequences whose tokens are interleaved in shared ubatches get
    the logits each gets when decoded alone in its own cache."""
    model, _ = tiny(arch)
    seqs = [random_tokens(model, n, seed=10 + s) for s, n in enumerate((12, 7, 15))]
    alone = []
    for toks in seqs:
        mem = model.make_memory(64, 1, 32, "f32", "f32")
        alone.append(decode_in_chunks(model, mem, toks, [5] + [1] * (len(toks) - 5)))

    mem = model.make_memory(128, 3, 32, "f32", "f32")
    got = [[] for _ in seqs]
    rng = np.random.default_rng(0)
    # the first 5 tokens of every sequence in one ubatch, then one token of
    # each sequence that still has one; sequences in random order
    for step in [range(5)] + [[p] for p in range(5, 15)]:
        entries = [(s, p) for p in step for s in rng.permutation(3) if p < len(seqs[s])]
        logits = decode_ubatch(model, mem, [seqs[s][p] for s, p in entries],
                               [p for _, p in entries], [s for s, _ in entries])
        for row, (s, p) in enumerate(entries):
            got[s].append(logits[row])
    for s in range(3):
        assert np.abs(np.array(got[s]) - alone[s]).max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_shifted_sequence_continues_like_one_decoded_at_the_new_positions(tiny, arch):
    """make_memory gives the cache each layer's RoPE base: after seq_add moves
    cached tokens by +5, the next token's logits equal those of a fresh cache
    that decoded the same tokens at the shifted positions."""
    model, _ = tiny(arch)
    tokens = random_tokens(model, 11, seed=3)
    mem = model.make_memory(64, 1, 16, "f32", "f32")
    decode_in_chunks(model, mem, tokens[:10], [10])
    mem.seq_add(0, 0, 10, 5)
    shifted = decode_ubatch(model, mem, tokens[10:], [15], [0])

    fresh = model.make_memory(64, 1, 16, "f32", "f32")
    want = decode_in_chunks(model, fresh, tokens, [10, 1], start=5)[-1:]
    assert np.abs(shifted - want).max() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_only_requested_rows_are_returned(tiny, arch):
    model, _ = tiny(arch)
    tokens = random_tokens(model, 8, seed=4)
    full = decode_ubatch(model, model.make_memory(32, 1, 8, "f32", "f32"), tokens,
                         np.arange(8), [0] * 8)
    mem = model.make_memory(32, 1, 8, "f32", "f32")
    some = decode_ubatch(model, mem, tokens, np.arange(8), [0] * 8, output_rows=[6, 2, 7])
    assert some.shape == (3, model.hparams.n_vocab)
    assert np.abs(some - full[[6, 2, 7]]).max() <= 1e-5
    # no rows requested: nothing returned, but K/V are still cached
    mem = model.make_memory(32, 1, 8, "f32", "f32")
    none = decode_ubatch(model, mem, tokens[:7], np.arange(7), [0] * 7, output_rows=[])
    assert none.shape == (0, model.hparams.n_vocab)
    last = decode_ubatch(model, mem, tokens[7:], [7], [0])
    assert np.abs(last - full[7:]).max() <= 1e-4


def test_forward_rejects_bad_input(tiny):
    model, _ = tiny("llama")
    mem = model.make_memory(32, 1, 8, "f32", "f32")
    with pytest.raises(ValueError):
        decode_ubatch(model, mem, [model.hparams.n_vocab], [0], [0])
    with pytest.raises(ValueError):
        decode_ubatch(model, mem, [-1], [0], [0])
    with pytest.raises(ValueError):
        decode_ubatch(model, mem, [1, 2], [0, 1], [0, 0], output_rows=[2])
    with pytest.raises(ValueError, match="distinct"):
        decode_ubatch(model, mem, [1, 2], [0, 1], [0, 0], output_rows=[1, 1])
    (slot,) = mem.prepare([(np.array([0], np.int32), [[0]])])
    mem.apply(slot, np.array([0], np.int32), [[0]])
    scratch = model.make_scratch(1)
    with pytest.raises(ValueError):
        model.forward([1, 2], [0], [[0]], [0], mem, scratch)
    with pytest.raises(ValueError):
        model.forward([], [], [], [], mem, scratch)
    with pytest.raises(ValueError, match="scratch holds 1"):
        model.forward([1, 2], [0, 1], [[0], [0]], [0], mem, scratch)


def test_kv_bytes_follow_the_formula(tiny):
    """docs/architecture.md: 2 x layers x n_head_kv x head_dim x element size per cell."""
    model, _ = tiny("llama")
    hp = model.hparams
    mem = model.make_memory(96, 2, 16, "f16", "f16")
    assert mem.kv_bytes == 2 * hp.n_layer * hp.n_head_kv * hp.head_dim * 2 * 96


# ---- the real model: Gemma 3 270M ----

@pytest.fixture(scope="module")
def gemma(real_model_path):
    return Model.load(real_model_path)


def test_real_model_loads(gemma):
    hp = gemma.hparams
    assert gemma.arch == "gemma3"
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff,
            hp.n_vocab, hp.n_swa) == (18, 640, 4, 1, 256, 2048, 262144, 512)
    assert sum(hp.swa_layers) == 15 and not hp.swa_layers[5] and not hp.swa_layers[17]
    mem = gemma.make_memory(4096, 1, 512, "f16", "f16")
    # 3 full layers of 4096 cells, 15 sliding ones of 512 + 512 (llama.cpp's size)
    assert mem.kv_bytes == 2 * 256 * 2 * (3 * 4096 + 15 * 1024)


def test_real_model_greedy_continuation_names_paris(gemma):
    tok = gemma.tokenizer
    ids = tok.encode("The capital city of France is called")
    mem = gemma.make_memory(64, 1, 32)
    logits = decode_ubatch(gemma, mem, ids, np.arange(len(ids)), [0] * len(ids),
                           output_rows=[len(ids) - 1])
    out = []
    for _ in range(6):
        out.append(int(logits[-1].argmax()))
        p = len(ids) + len(out) - 1
        logits = decode_ubatch(gemma, mem, out[-1:], [p], [0])
    assert "Paris" in tok.decode(out)


@pytest.fixture(scope="module")
def llamacpp_fixture():
    """llama.cpp's top-16 logits per position for a 63-token paragraph; see
    the commit that added tests/data/gemma3_llamacpp_logits.npz."""
    import os
    path = os.path.join(os.path.dirname(__file__), "data", "gemma3_llamacpp_logits.npz")
    with np.load(path) as f:
        return f["tokens"], f["top_ids"], f["top_logits"]


def test_real_model_matches_llamacpp(gemma, llamacpp_fixture):
    """Same tokens through our cache (f16 like llama.cpp's default) in two
    ubatches: llama.cpp's top-16 logits agree within 1.5 (mean <= 0.3), and
    our best token is among llama.cpp's top 3 at every position. llama.cpp
    quantises activations to 8 bits in its matmuls; with an f32 instead of an
    f16 cache it differs from itself by up to 1.34 on this prompt."""
    tokens, top_ids, top_logits = llamacpp_fixture
    mem = gemma.make_memory(128, 1, 48)
    logits = decode_in_chunks(gemma, mem, tokens, [40, 23])
    diff = np.abs(np.take_along_axis(logits, top_ids, axis=1) - top_logits)
    assert diff.max() <= 1.5 and diff.mean() <= 0.3
    best = logits.argmax(axis=1)
    assert all(best[i] in top_ids[i, :3] for i in range(len(tokens)))


def test_real_model_cached_equals_recomputed(gemma, llamacpp_fixture):
    """Decoding the last 8 tokens one by one through the cache gives the
    logits of recomputing the whole sequence in one ubatch (f32 cache)."""
    tokens = llamacpp_fixture[0][:40]
    mem = gemma.make_memory(64, 1, 64, "f32", "f32")
    cached = decode_in_chunks(gemma, mem, tokens, [32] + [1] * 8)[32:]
    fresh = gemma.make_memory(64, 1, 64, "f32", "f32")
    recomputed = decode_ubatch(gemma, fresh, tokens, np.arange(40), [0] * 40,
                               output_rows=np.arange(32, 40))
    assert np.abs(cached - recomputed).max() <= 1e-3


def test_real_model_past_the_sliding_window(gemma):
    """800 tokens, past the 512-token window: decoded in ubatches of <= 64
    (sliding cells: 512 + 64 padded to 768, so cells get reused) the last 16
    tokens' logits equal those of one 800-token ubatch in a fresh cache."""
    tokens = np.random.default_rng(6).integers(1000, 200000, 800)
    mem = gemma.make_memory(1024, 1, 64, "f32", "f32")
    cached = decode_in_chunks(gemma, mem, tokens, [64] * 12 + [16] + [1] * 16)[-16:]
    fresh = gemma.make_memory(1024, 1, 800, "f32", "f32")
    recomputed = decode_ubatch(gemma, fresh, tokens, np.arange(800), [0] * 800,
                               output_rows=np.arange(784, 800))
    assert np.abs(cached - recomputed).max() <= 1e-3


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("kw", [dict(n_ctx=64), dict(n_ctx=1000, n_seq_max=3, n_ubatch=32,
                                                     type_k="f16", type_v="f32")])
def test_kv_bytes_foretells_the_allocation(tiny_gguf, arch, kw):
    model = Model.load(tiny_gguf(arch, "F32", n_swa=4) if arch == "gemma3" else tiny_gguf(arch))
    assert model.kv_bytes(**kw) == kvcells.Context(model, **kw).kv_bytes
