"""kvcells.Context: decode through ubatches, the batch rules, rollback on a
full cache, and state files; logits checked against the dense reference."""
import subprocess
import sys

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


def test_cache_full_message_counts_the_cells_in_use(llama):
    model, _ = llama
    ctx = Context(model, n_ctx=64, n_ubatch=16)
    ctx.decode(one_sequence(tokens_for(model, 12, 1)))
    with pytest.raises(CacheFullError, match=r"60 tokens: 12 of 64 cells in use"):
        ctx.decode(one_sequence(tokens_for(model, 60, 2), start=12))


def test_a_cache_that_cannot_be_allocated_says_how_much_it_needs(llama, tiny_gguf):
    """Under a 1 GiB address-space limit a 2**24-cell cache (4 GiB) cannot be had."""
    model, _ = llama
    need = 2**24 * model.kv_bytes(1, type_k="f32", type_v="f32")
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
            f"from kvcells import Context, Model\n"
            f"Context(Model.load({str(tiny_gguf('llama', 'F32'))!r}), n_ctx=2**24, "
            f"type_k='f32', type_v='f32')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        f"MemoryError: a KV cache of {2**24} cells needs {need / 2**30:.1f} GiB "
        f"(f32 K, f32 V) and could not be allocated")


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


def test_a_negative_token_is_refused_before_anything_changes(llama):
    model, ref = llama
    toks = tokens_for(model, 5, 30)
    ctx = Context(model, n_ctx=16, type_k="f32", type_v="f32")
    ctx.decode(one_sequence(toks[:3]))
    before = ctx.memory.state_bytes()
    batch = one_sequence(toks[3:5], start=3)
    batch.tokens[1] = -1                  # past Batch.add's check, as a caller may build it
    with pytest.raises(ValueError, match="token"):
        ctx.decode(batch)
    assert ctx.memory.state_bytes() == before
    np.testing.assert_allclose(ctx.decode(one_sequence(toks[3:5], start=3)),
                               ref.logits(toks)[3:5], atol=ATOL)


def test_positions_stay_inside_int32_with_a_clear_error(llama):
    model, _ = llama
    ctx = Context(model, n_ctx=16)
    ctx.decode(one_sequence([1]))
    ctx.memory.seq_add(0, 0, -1, 2**31 - 1)
    assert ctx.memory.seq_pos_max(0) == 2**31 - 1
    before = ctx.memory.state_bytes()
    with pytest.raises(ValueError, match="largest"):
        ctx.decode(one_sequence([2], start=2**31))
    assert ctx.memory.state_bytes() == before


def test_a_model_file_cut_short_after_loading_changes_nothing(tiny_gguf, tmp_path):
    """The loaded model is a copy: a decode after the file was truncated
    gives the logits one made before it (reading a mapped page the
    truncation cut off would have ended the process with SIGBUS)."""
    path = tmp_path / "m.gguf"
    path.write_bytes(open(tiny_gguf("llama", "F32"), "rb").read())
    model = Model.load(path)
    before, after = Context(model, n_ctx=16), Context(model, n_ctx=16)
    before.decode(one_sequence([1, 2]))
    want = before.decode(one_sequence([3], start=2))
    after.decode(one_sequence([1, 2]))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    np.testing.assert_array_equal(after.decode(one_sequence([3], start=2)), want)


@pytest.mark.parametrize("kw", [dict(n_ctx=0), dict(n_seq_max=0), dict(n_seq_max=257),
                                dict(n_ubatch=0), dict(type_k="q3_k"), dict(type_v="int8"),
                                dict(n_ubatch=1.5), dict(n_ctx="16"), dict(n_seq_max=True),
                                dict(n_threads=0), dict(n_threads=1000)])
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
    """Context(n_threads=k) runs that context's layers (matmuls and
    attention) and head on k threads and leaves the process default alone."""
    import kvcells
    from kvcells import native
    seen = []
    real = native.stack_run
    monkeypatch.setattr(native, "stack_run", lambda *a: seen.append(a[-1]) or real(*a))
    before = kvcells.get_num_threads()
    ctx = Context(llama[0], n_ctx=16, n_threads=1)
    ctx.decode(one_sequence([1, 2]))
    assert ctx.memory.n_threads == 1 and kvcells.get_num_threads() == before
    assert seen == [1]


# ---- several threads on one context (docs/architecture.md, "Threads") ----

def run_threads(targets):
    """Start one thread per callable, join them, re-raise the first error."""
    import threading
    errors = []

    def guarded(f):
        try:
            f()
        except BaseException as e:   # noqa: BLE001 - handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(f,)) for f in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_four_threads_on_one_context_lose_no_decode(which, request):
    model, ref = request.getfixturevalue(which)
    n_seq, n_batches, size = 4, 20, 8
    toks = {s: tokens_for(model, n_batches * size, 20 + s) for s in range(n_seq)}
    ctx = Context(model, n_ctx=1024, n_seq_max=n_seq + 1, n_ubatch=8,
                  type_k="f32", type_v="f32")
    got = {s: [] for s in range(n_seq)}
    stop = []

    def decoder(s):
        def run():
            for k in range(n_batches):
                start = k * size
                got[s].append(ctx.decode(one_sequence(toks[s][start:start + size], s, start)))
        return run

    def meddler():   # sequence operations on the spare sequence, and reads, meanwhile
        spare = n_seq
        while not stop:
            for s in range(n_seq):
                assert (ctx.memory.seq_pos_max(s) + 1) % size == 0
            ctx.memory.seq_cp(0, spare)          # cells shared with sequence 0
            ctx.memory.seq_rm(spare)
            ctx.memory.load_state_bytes(ctx.memory.state_bytes(1), seq_id=spare)  # own cells
            ctx.memory.seq_add(spare, -1, -1, 3)
            ctx.memory.seq_rm(spare)
            ctx.memory.defrag()
            assert ctx.kv_bytes > 0

    def decoders_then_stop():
        try:
            run_threads([decoder(s) for s in range(n_seq)])
        finally:
            stop.append(True)

    run_threads([decoders_then_stop, meddler])
    serial = Context(model, n_ctx=1024, n_seq_max=n_seq, n_ubatch=8,
                     type_k="f32", type_v="f32")
    for s in range(n_seq):
        assert ctx.memory.seq_pos_max(s) == n_batches * size - 1
        want = serial.decode(one_sequence(toks[s], s))
        np.testing.assert_array_equal(np.concatenate(got[s]), want)
        np.testing.assert_allclose(want, ref.logits(toks[s]), atol=ATOL)
    assert ctx.memory.seq_pos_max(n_seq) == -1
    for half in getattr(ctx.memory, "halves", [ctx.memory]):
        half.table.check()


def test_two_contexts_on_one_model_decode_concurrently_as_alone(real_model_path):
    model = Model.load(real_model_path)
    prompts = [model.tokenizer.encode(p) for p in
               ("The capital city of France is called", "Water boils at a temperature of")]

    def run(ctx, ids, out):
        ctx.decode(one_sequence(ids, logits=False))
        for i in range(8):
            out.append(ctx.decode(one_sequence([5 + 7 * i], start=len(ids) + i))[0])

    alone = []
    for ids in prompts:
        alone.append([])
        run(Context(model, n_ctx=64), ids, alone[-1])
    together = [[], []]
    ctxs = [Context(model, n_ctx=64) for _ in prompts]
    run_threads([lambda k=k: run(ctxs[k], prompts[k], together[k]) for k in range(2)])
    for k in range(2):
        np.testing.assert_array_equal(np.array(together[k]), np.array(alone[k]))
