"""kvcells.Context: decode through ubatches, the batch rules, rollback on a
full cache, and state files; logits checked against the dense reference."""
import numpy as np
import pytest
from reference_forward import ReferenceModel

from kvcells import Batch, CacheFullError, Context, Model, StateError

ATOL = 1e-4


@pytest.fixture(scope="module")
def llama(tiny_gguf):
    path = tiny_gguf("llama", "F32")
    return Model.load(path), ReferenceModel(path)


@pytest.fixture(scope="module")
def gemma(tiny_gguf):
    path = tiny_gguf("gemma3", "F32", n_swa=4)
    return Model.load(path), ReferenceModel(path)


def tokens_for(model, n, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(0, model.hparams.n_vocab, n)]


def one_sequence(tokens, seq_id=0, start=0, logits=True):
    b = Batch()
    for i, t in enumerate(tokens):
        b.add(t, start + i, seq_id, logits=logits)
    return b


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_a_batch_split_into_ubatches_gives_the_reference_logits(which, request):
    model, ref = request.getfixturevalue(which)
    toks = tokens_for(model, 13, 1)
    ctx = Context(model, n_ctx=32, n_ubatch=5, type_k="f32", type_v="f32")
    np.testing.assert_allclose(ctx.decode(one_sequence(toks)), ref.logits(toks), atol=ATOL)


def test_interleaved_sequences_get_their_own_rows_in_batch_order(llama):
    model, ref = llama
    a, b = tokens_for(model, 6, 2), tokens_for(model, 4, 3)
    ctx = Context(model, n_ctx=32, n_seq_max=2, n_ubatch=4, type_k="f32", type_v="f32")
    batch, order = Batch(), []
    for i in range(6):
        batch.add(a[i], i, 0, logits=True)
        order.append((0, i))
        if i < 4:
            batch.add(b[i], i, 1, logits=i % 2 == 1)
            if i % 2:
                order.append((1, i))
    out = ctx.decode(batch)
    ra, rb = ref.logits(a), ref.logits(b)
    want = np.stack([ra[i] if s == 0 else rb[i] for s, i in order])
    np.testing.assert_allclose(out, want, atol=ATOL)


def test_no_flagged_token_gives_no_rows(llama):
    model, _ = llama
    ctx = Context(model, n_ctx=16)
    assert ctx.decode(one_sequence([1, 2, 3], logits=False)).shape == (0, model.hparams.n_vocab)


def test_cache_full_leaves_the_cache_as_it_was(llama):
    model, ref = llama
    toks = tokens_for(model, 20, 4)
    ctx = Context(model, n_ctx=16, n_ubatch=4, type_k="f32", type_v="f32")
    ctx.decode(one_sequence(toks[:10]))
    before = ctx.memory.state_bytes()
    with pytest.raises(CacheFullError):
        ctx.decode(one_sequence(toks[10:20], start=10))  # 3 ubatches, the last does not fit
    assert ctx.memory.state_bytes() == before
    # and the cache still works: the next 6 fit
    out = ctx.decode(one_sequence(toks[10:16], start=10))
    np.testing.assert_allclose(out, ref.logits(toks[:16])[10:], atol=ATOL)


@pytest.mark.parametrize("bad", ["seq", "token", "gap", "repeat", "empty"])
def test_bad_batches_raise_value_error_and_change_nothing(llama, bad):
    model, _ = llama
    ctx = Context(model, n_ctx=16, n_seq_max=2)
    ctx.decode(one_sequence([5, 6, 7]))
    before = ctx.memory.state_bytes()
    batch = Batch()
    if bad == "seq":
        batch.add(1, 0, 2)
    elif bad == "token":
        batch.add(model.hparams.n_vocab, 3, 0)
    elif bad == "gap":
        batch.add(1, 4, 0)
    elif bad == "repeat":
        batch.add(1, 3, 0)
        batch.add(1, 3, 0)
    with pytest.raises(ValueError):
        ctx.decode(batch)
    assert ctx.memory.state_bytes() == before


@pytest.mark.parametrize("kw", [dict(n_ctx=0), dict(n_seq_max=0), dict(n_seq_max=257),
                                dict(n_ubatch=0), dict(type_k="q3_k"), dict(type_v="int8")])
def test_bad_context_arguments(llama, kw):
    with pytest.raises(ValueError):
        Context(llama[0], **kw)


def test_removing_a_suffix_reuses_the_prefix(llama):
    model, ref = llama
    prefix, old, new = tokens_for(model, 5, 5), tokens_for(model, 4, 6), tokens_for(model, 3, 7)
    ctx = Context(model, n_ctx=32, type_k="f32", type_v="f32")
    ctx.decode(one_sequence(prefix + old))
    ctx.memory.seq_rm(0, len(prefix), -1)
    out = ctx.decode(one_sequence(new, start=len(prefix)))
    np.testing.assert_allclose(out, ref.logits(prefix + new)[len(prefix):], atol=ATOL)


@pytest.mark.parametrize("which", ["llama", "gemma"])
@pytest.mark.parametrize("seq_id", [None, 1])
def test_a_saved_state_continues_in_a_fresh_context(which, seq_id, request, tmp_path):
    model, ref = request.getfixturevalue(which)
    toks = tokens_for(model, 12, 8)
    ctx = Context(model, n_ctx=32, n_seq_max=2, type_k="f16", type_v="f32")
    ctx.decode(one_sequence(toks[:11], seq_id=seq_id or 0, logits=False))
    ctx.state_save(tmp_path / "s.bin", seq_id=seq_id)
    want = ctx.decode(one_sequence(toks[11:], seq_id=seq_id or 0, start=11))
    fresh = Context(model, n_ctx=32, n_seq_max=2, type_k="f16", type_v="f32")
    fresh.state_load(tmp_path / "s.bin", seq_id=seq_id)
    got = fresh.decode(one_sequence(toks[11:], seq_id=seq_id or 0, start=11))
    np.testing.assert_array_equal(got, want)


def test_corrupt_or_foreign_state_raises_and_changes_nothing(llama, gemma, tmp_path):
    model, _ = llama
    ctx = Context(model, n_ctx=16)
    ctx.decode(one_sequence([1, 2, 3, 4]))
    ctx.state_save(tmp_path / "s.bin")
    target = Context(model, n_ctx=16)
    target.decode(one_sequence([9, 8]))
    before = target.memory.state_bytes()
    data = (tmp_path / "s.bin").read_bytes()
    for name, blob in [("truncated", data[:-7]), ("flipped", data[:-20] + bytes([data[-20] ^ 1]) + data[-19:]),
                       ("garbage", b"hello")]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(StateError):
            target.state_load(tmp_path / name)
        assert target.memory.state_bytes() == before
    other = Context(gemma[0], n_ctx=16)
    other.decode(one_sequence([1, 2]))
    other.state_save(tmp_path / "g.bin")
    with pytest.raises(StateError):
        target.state_load(tmp_path / "g.bin")
    assert target.memory.state_bytes() == before


def test_n_threads_reaches_the_matmul_and_attention_kernels(llama, monkeypatch):
    """Context(n_threads=k) runs that context's matmuls and attention on k
    threads and leaves the process default alone."""
    import kvcells
    from kvcells import native
    seen = []
    for name in ("matmul", "kv_attend"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name,
                            lambda *a, real=real, name=name: seen.append((name, a[-1])) or real(*a))
    before = kvcells.get_num_threads()
    ctx = Context(llama[0], n_ctx=16, n_threads=1)
    ctx.decode(one_sequence([1, 2]))
    assert ctx.memory.n_threads == 1 and kvcells.get_num_threads() == before
    assert {name for name, _ in seen} == {"matmul", "kv_attend"}
    assert all(n == 1 for _, n in seen)
