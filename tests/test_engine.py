"""Engine: continuous batching with prefix reuse, admission by fit and
preemption. The truth for every request is the same prompt decoded alone
in a fresh cache with plain ctx.decode calls (solo below): same greedy
tokens, and the same logits bit for bit."""
import collections
import functools
import tempfile
import threading

import numpy as np
import pytest
from drafters import FixedSteps, LateDrafter, ScriptedDrafter, ScriptedSteps, TruthDrafter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from make_tiny_gguf import write_tiny_gguf

from kvcells import Batch, CacheFullError, Context, Model, Sampler, generate
from kvcells import engine as engine_module
from kvcells.engine import Engine

F32 = dict(type_k="f32", type_v="f32")


@functools.cache
def tiny(arch):
    """Tiny llama, or tiny Gemma 3 with a window of 8 (every prompt here passes it)."""
    kw = {"n_swa": 8} if arch == "gemma3" else {}
    return Model.load(write_tiny_gguf(f"{tempfile.mkdtemp()}/{arch}.gguf", arch, "F32", **kw))


@functools.cache
def solo(model, prompt, n, n_ctx, ignore_eos=False, kv="f32"):
    """Greedy tokens and their logits rows for one prompt alone in a fresh
    cache; n = -1 runs until end of generation or the context is full."""
    ctx = Context(model, n_ctx=n_ctx, type_k=kv, type_v=kv)
    b = Batch()
    for i, t in enumerate(prompt):
        b.add(t, i, 0, logits=i == len(prompt) - 1)
    rows = [ctx.decode(b)[-1]]
    toks = []
    while n < 0 or len(toks) < n:
        t = int(np.argmax(rows[-1]))
        if model.tokenizer.is_eog(t) and not ignore_eos:
            break
        toks.append(t)
        if len(toks) == n or len(prompt) + len(toks) > n_ctx:
            break
        b = Batch()
        b.add(t, len(prompt) + len(toks) - 1, 0, logits=True)
        rows.append(ctx.decode(b)[-1])
    return toks, rows


class Recorder:
    """A greedy sampler that keeps the logits rows it was given."""

    def __init__(self):
        self.rows = []

    def sample(self, row, recent, draft=None):
        self.rows.append(np.array(row))
        return int(np.argmax(row))


def random_tokens(model, n, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(3, model.hparams.n_vocab, n)]


def run(engine, limit=100000):
    for _ in range(limit):
        if not engine.step():
            return
    raise AssertionError("the engine did not finish its queue")


def tables(ctx):
    return [h.table for h in getattr(ctx.memory, "halves", [ctx.memory])]


def check_cells(engine):
    """check() holds, and each running or idle sequence holds exactly its
    positions: all of them in the full cache, its window in a window cache."""
    for t in tables(engine.ctx):
        t.check()
    held = {r.seq: r.n_past for r in engine.running.values()}
    held.update({s: len(toks) for s, toks in engine.idle.items()})
    for s in range(engine.ctx.n_seq_max):
        n = held.get(s, 0)
        for t in tables(engine.ctx):
            lo = max(0, min(n - t.n_swa + 1, n - 1)) if t.n_swa else 0
            assert list(t.seq_cells(s)[1]) == list(range(lo, n)), (s, t)


def assert_solo(engine, requests, n_ctx):
    model = engine.ctx.model
    for r in requests:
        toks, _ = solo(model, tuple(r.prompt), r.max_tokens, n_ctx, r.ignore_eos)
        if r.finish_reason == "cancelled":
            assert r.tokens == toks[:len(r.tokens)]
        else:
            assert r.finish_reason in ("stop", "length") and r.tokens == toks


# ---- bit-identical logits from a cached prefix ----

def rows_match(model, r, rec, n_ctx, kv="f32"):
    toks, rows = solo(model, tuple(r.prompt), r.max_tokens, n_ctx, kv=kv)
    assert r.tokens == toks
    assert len(rec.rows) >= len(toks) and all(
        np.array_equal(a, b) for a, b in zip(rec.rows, rows))


def submit(engine, prompt, n, **kw):
    rec = Recorder()
    return engine.submit(prompt, n, rec, **kw), rec


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_cached_prefix_gives_the_cold_logits_bit_for_bit(arch):
    model = tiny(arch)
    n_ctx = 96
    engine = Engine(Context(model, n_ctx=n_ctx, n_seq_max=4, n_ubatch=16, **F32), 2)
    system = random_tokens(model, 20, 1)
    # two at once share the system prompt inside the batch
    first = [submit(engine, system + random_tokens(model, 3, 2 + i), 4) for i in range(2)]
    run(engine)
    # later ones take it from the cache: a branch inside a finished prompt,
    # then the whole of a finished request (a chat's next turn)
    later, rec = submit(engine, system + random_tokens(model, 5, 9), 4)
    run(engine)
    turn, rec2 = submit(engine, later.prompt + later.tokens + random_tokens(model, 4, 10), 4)
    run(engine)
    assert [r.cached_tokens for r, _ in first] == [0, 0]
    assert later.cached_tokens == 20
    # all but the last generated token, which was never decoded
    assert later.finish_reason == "length"
    assert turn.cached_tokens == len(later.prompt) + len(later.tokens) - 1
    for r, rc in first + [(later, rec), (turn, rec2)]:
        rows_match(model, r, rc, n_ctx)
    check_cells(engine)


def test_gemma3_reuses_prefixes_inside_and_past_its_window(real_model_path):
    """The real model (window 512) with window-sized caches: a prompt
    branching at 520 tokens reuses the prefix through the checkpoint left by
    the first two (which computed it once), and one of 60 from a finished
    request directly."""
    model = Model.load(real_model_path)
    n_ctx = 2048
    ctx = Context(model, n_ctx=n_ctx, n_seq_max=3, n_ubatch=128)
    assert ctx.memory.swa.n_cells < n_ctx
    engine = Engine(ctx, 2)
    long, short = random_tokens(model, 520, 1), random_tokens(model, 60, 2)
    for i in range(2):
        submit(engine, long + random_tokens(model, 3, 3 + i), 2)
    run(engine)
    submit(engine, short + [7, 8], 2)
    run(engine)
    past, rec = submit(engine, long + random_tokens(model, 4, 8), 3)
    inside, rec2 = submit(engine, short + [9], 3)
    run(engine)
    assert (past.cached_tokens, inside.cached_tokens) == (520, 60)
    rows_match(model, past, rec, n_ctx, "f16")
    rows_match(model, inside, rec2, n_ctx, "f16")
    check_cells(engine)


# ---- the state machine ----

class EngineMachine(RuleBasedStateMachine):
    """Random requests from a few shared prefixes and random tails, cancelled
    or finishing in random order, in a cache small enough to evict."""

    @initialize(arch=st.sampled_from(["llama", "gemma3"]), n_ctx=st.sampled_from([32, 48, 64]),
                n_seq_max=st.integers(1, 5), slots=st.integers(1, 5),
                n_ubatch=st.sampled_from([4, 8, 16]), prefix_cache=st.booleans(),
                lookup=st.booleans(), seed=st.integers(0, 3))
    def create(self, arch, n_ctx, n_seq_max, slots, n_ubatch, prefix_cache, lookup, seed):
        self.model = tiny(arch)
        self.n_ctx = n_ctx
        ctx = Context(self.model, n_ctx=n_ctx, n_seq_max=n_seq_max, n_ubatch=n_ubatch, **F32)
        self.engine = Engine(ctx, min(slots, n_seq_max), prefix_cache=prefix_cache, lookup=lookup)
        self.prefixes = [random_tokens(self.model, n, seed * 10 + n) for n in (3, 9, 17)]
        self.requests = []

    @rule(k=st.integers(0, 2), tails=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 5)),
                                              min_size=1, max_size=3),
          max_tokens=st.sampled_from([-1, 0, 1, 3, 6, 10]))
    def submit(self, k, tails, max_tokens):
        for n, seed in tails:
            prompt = self.prefixes[k] + random_tokens(self.model, n, 100 + seed)
            self.requests.append(self.engine.submit(prompt, max_tokens))

    @rule(i=st.integers(0, 30))
    def cancel(self, i):
        if self.requests:
            self.engine.cancel(self.requests[i % len(self.requests)])

    @rule(n=st.integers(1, 4))
    def step(self, n):
        for _ in range(n):
            self.engine.step()

    @invariant()
    def cells_and_outputs(self):
        if hasattr(self, "engine"):
            check_cells(self.engine)
            assert_solo(self.engine, [r for r in self.requests if r.finish_reason], self.n_ctx)

    def teardown(self):
        if hasattr(self, "engine"):
            run(self.engine, 2000)
            check_cells(self.engine)
            assert all(r.finish_reason for r in self.requests)
            assert_solo(self.engine, self.requests, self.n_ctx)


EngineMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestEngine = EngineMachine.TestCase


# ---- admission by fit (issue 18) ----

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_ctx=st.integers(8, 48), slots=st.integers(1, 16), extra=st.integers(0, 2),
       n_ubatch=st.sampled_from([3, 8, 32]), data=st.data())
def test_a_random_queue_serves_everyone_their_solo_tokens(n_ctx, slots, extra, n_ubatch, data):
    model = tiny("llama")
    lengths = data.draw(st.lists(st.integers(1, n_ctx), min_size=1, max_size=12))
    max_tokens = data.draw(st.sampled_from([-1, 1, 4, 8]))
    ctx = Context(model, n_ctx=n_ctx, n_seq_max=slots + extra, n_ubatch=n_ubatch, **F32)
    engine = Engine(ctx, slots, prefix_cache=data.draw(st.booleans()))
    requests = [engine.submit(random_tokens(model, n, n % 5), max_tokens) for n in lengths]
    for _ in range(5000):
        if not engine.step():
            break
        check_cells(engine)
    assert all(r.finish_reason for r in requests)
    assert_solo(engine, requests, n_ctx)


def test_generation_that_fills_the_cache_preempts_the_youngest():
    model = tiny("llama")
    n_ctx = 40
    engine = Engine(Context(model, n_ctx=n_ctx, n_seq_max=3, n_ubatch=8, **F32))
    requests = [engine.submit(random_tokens(model, 8, i), -1, ignore_eos=True) for i in range(3)]
    run(engine)
    assert engine.stats()["preemptions"] > 0
    assert all(len(r.prompt) + len(r.tokens) == n_ctx + 1 for r in requests)
    assert_solo(engine, requests, n_ctx)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode():
    model = tiny("llama")
    engine = Engine(Context(model, n_ctx=128, n_seq_max=2, n_ubatch=8, **F32), lookup=False)
    short = engine.submit(random_tokens(model, 3, 1), 12, ignore_eos=True)
    engine.step()
    long = engine.submit(random_tokens(model, 60, 2), 2)
    generated = []
    while long.n_past < 60:
        engine.step()
        generated.append(len(short.tokens))
    # each step is one ubatch of 8: a token for `short` and 7 prompt tokens
    assert generated == list(range(2, 2 + len(generated))) and len(generated) == -(-60 // 7)
    run(engine)
    assert_solo(engine, [short, long], 128)


def test_requests_admitted_together_compute_each_shared_token_once():
    """Three system prompts with a common start, two questions each, all
    admitted in one step: every distinct prompt token is computed once."""
    model = tiny("gemma3")
    engine = Engine(Context(model, n_ctx=256, n_seq_max=8, n_ubatch=32, **F32), 6)
    common = random_tokens(model, 5, 1)
    systems = [common + random_tokens(model, 15, 2 + k) for k in range(3)]
    requests = [engine.submit(systems[i % 3] + random_tokens(model, 4, 10 + i), 3)
                for i in range(6)]
    run(engine)
    assert engine.stats()["computed_prompt_tokens"] == 5 + 3 * 15 + 6 * 4
    check_cells(engine)
    assert_solo(engine, requests, 256)


# ---- eviction and accounting ----

def test_idle_prefixes_are_evicted_least_recently_used_first():
    model = tiny("llama")
    engine = Engine(Context(model, n_ctx=64, n_seq_max=2, **F32), 1)
    a, b, c = (random_tokens(model, 10, s) for s in (1, 2, 3))
    for p in (a, b):
        engine.submit(p + [5], 2)
        run(engine)
    engine.submit(a + [6], 2)    # uses a: b is now the least recently used
    run(engine)
    r = engine.submit(b + [7], 2)
    run(engine)
    assert r.cached_tokens == 0   # b's holder was evicted for an id, a's kept
    r = engine.submit(a + [8], 2)
    run(engine)
    assert r.cached_tokens == 10
    s = engine.stats()
    assert s["evictions"] >= 1 and s["prompt_tokens"] == 11 * 5
    assert s["cached_tokens"] == 10 + 10


def test_stats_count_the_prompt_tokens_the_cache_served():
    model = tiny("llama")
    engine = Engine(Context(model, n_ctx=64, n_seq_max=4, **F32), 2)
    system = random_tokens(model, 12, 1)
    engine.submit(system + [5], 3, ignore_eos=True)
    run(engine)
    engine.submit(system + [6, 7], 3, ignore_eos=True)
    run(engine)
    s = engine.stats()
    assert (s["prompt_tokens"], s["cached_tokens"], s["computed_prompt_tokens"]) == (27, 12, 15)
    assert s["generated_tokens"] == 6
    assert (s["running"], s["waiting"], s["idle_sequences"]) == (0, 0, 2)
    # two finished sequences of 12 + 1 + 2 and 12 + 2 + 2 cells sharing 12
    assert s["idle_cells"] == s["cells_used"] == 12 + 3 + 4
    assert s["cells_total"] == 64


def test_without_the_prefix_cache_finished_sequences_are_freed():
    model = tiny("llama")
    engine = Engine(Context(model, n_ctx=64, n_seq_max=2, **F32), prefix_cache=False)
    p = random_tokens(model, 12, 1)
    reqs = [engine.submit(p, 3) for _ in range(3)]
    run(engine)
    assert [r.cached_tokens for r in reqs] == [0, 0, 0]
    s = engine.stats()
    assert s["computed_prompt_tokens"] == 36 and s["cells_used"] == 0
    assert_solo(engine, reqs, 64)


# ---- bad input, cancellation, errors ----

def test_bad_requests_are_refused_at_submit():
    model = tiny("llama")
    engine = Engine(Context(model, n_ctx=16, n_seq_max=2))
    for prompt, n in (([], 2), ([1] * 17, 2), ([model.hparams.n_vocab], 2), ([-1], 2),
                      ([1], -2), ([1.5], 2)):
        with pytest.raises(ValueError):
            engine.submit(prompt, n)
    assert not engine.step()
    with pytest.raises(ValueError):
        Engine(Context(model, n_ctx=16, n_seq_max=2), 3)


def test_cancel_while_waiting_or_running_frees_only_that_request():
    model = tiny("llama")
    engine = Engine(Context(model, n_ctx=64, n_seq_max=2, **F32), 2)
    done = []
    keep = engine.submit(random_tokens(model, 6, 1), 6, ignore_eos=True)
    gone = engine.submit(random_tokens(model, 6, 2), 6, ignore_eos=True, on_done=done.append)
    waiting = engine.submit(random_tokens(model, 6, 3), 6, on_done=done.append)
    engine.step()
    engine.step()
    assert waiting.finish_reason is None and gone.seq is not None
    before = tables(engine.ctx)[0].seq_cells(keep.seq)
    engine.cancel(gone)
    engine.cancel(waiting)
    engine.step()
    assert [r.finish_reason for r in done] == ["cancelled", "cancelled"]
    assert waiting.tokens == [] and len(gone.tokens) == 2
    assert engine.ctx.memory.seq_pos_max(1) == -1
    after = tables(engine.ctx)[0].seq_cells(keep.seq)
    assert np.array_equal(before[0], after[0][:len(before[0])])
    run(engine)
    check_cells(engine)
    assert_solo(engine, [keep, gone], 64)


class Broken:
    def sample(self, row, recent, draft=None):
        raise RuntimeError("broken sampler")


def test_an_error_fails_its_requests_and_the_engine_goes_on(monkeypatch):
    model = tiny("llama")
    ctx = Context(model, n_ctx=64, n_seq_max=3, **F32)
    engine = Engine(ctx, 2)
    bad = engine.submit(random_tokens(model, 5, 1), 3, Broken())
    good = engine.submit(random_tokens(model, 5, 2), 3)
    run(engine)
    assert bad.finish_reason == "error" and "broken sampler" in str(bad.error)
    assert good.finish_reason in ("stop", "length")

    real = ctx.decode
    monkeypatch.setattr(ctx, "decode", lambda batch: 1 / 0)
    failed = engine.submit(random_tokens(model, 5, 3), 3)
    assert engine.step()
    assert failed.finish_reason == "error" and isinstance(failed.error, ZeroDivisionError)
    monkeypatch.setattr(ctx, "decode", real)
    after = engine.submit(random_tokens(model, 5, 4), 3)
    run(engine)
    check_cells(engine)
    assert_solo(engine, [good, after], 64)


def test_a_request_alone_that_never_fits_fails_with_the_sizes(monkeypatch):
    model = tiny("llama")
    ctx = Context(model, n_ctx=64, **F32)
    engine = Engine(ctx)

    def full(batch):
        raise CacheFullError("no slot")
    monkeypatch.setattr(ctx, "decode", full)
    r = engine.submit(random_tokens(model, 5, 1), 3)
    engine.step()
    assert r.finish_reason == "error" and isinstance(r.error, CacheFullError)
    assert "5 tokens" in str(r.error) and "64 cells" in str(r.error)


def test_an_engine_thread_serves_requests_submitted_from_another_thread():
    model = tiny("llama")
    engine = Engine(Context(model, n_ctx=64, n_seq_max=2, **F32))
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            if not engine.step():
                engine.wait_for_work(0.05)
    worker = threading.Thread(target=loop)
    worker.start()
    done = threading.Semaphore(0)
    try:
        reqs = [engine.submit(random_tokens(model, 4, i), 4, on_done=lambda r: done.release())
                for i in range(3)]
        assert all(done.acquire(timeout=30) for _ in reqs)
    finally:
        stop.set()
        worker.join(30)
    assert_solo(engine, reqs, 64)


# ---- prompt lookup ----

def repetitive(model, seed):
    """A few random tokens repeated 2 to 4 times, then 2 more: text to look up."""
    rng = np.random.default_rng(seed)
    piece = random_tokens(model, int(rng.integers(2, 7)), seed)
    return piece * int(rng.integers(2, 5)) + random_tokens(model, 2, 100 + seed)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lookup_gives_the_tokens_of_plain_decoding_over_many_prompts(arch, monkeypatch):
    """Twelve repetitive prompts, four at a time: the engine with lookup, the
    engine without it, plain generate and plain decoding alone agree (rows
    cost nothing, so every draft found is sent)."""
    monkeypatch.setattr(engine_module, "StepTimes", lambda: FixedSteps(lambda n: 1.0))
    model = tiny(arch)
    prompts = [repetitive(model, seed) for seed in range(12)]
    outs, stats = {}, {}
    for lookup in (True, False):
        engine = Engine(Context(model, n_ctx=96, n_seq_max=6, n_ubatch=32, **F32), 4,
                        lookup=lookup)
        requests = [engine.submit(p, 30) for p in prompts]
        while engine.step():
            check_cells(engine)
        assert_solo(engine, requests, 96)
        outs[lookup], stats[lookup] = [r.tokens for r in requests], engine.stats()
    assert outs[True] == outs[False] == [
        list(generate(Context(model, n_ctx=96, **F32), p, 30, lookup=False)) for p in prompts]
    assert 0 < stats[True]["accepted_draft_tokens"] < stats[True]["draft_tokens"]
    assert stats[False]["draft_tokens"] == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("wrong", [0, 1, 3, 6, 12])
def test_drafts_rejected_at_every_offset_leave_tokens_and_cells_as_plain_decoding(
        arch, wrong, monkeypatch):
    # three requests at once in ubatches of 16: drafts of up to 12 share what
    # is left. gemma3's window is 8 positions, so drafts cross it, and its
    # window cache has 128 cells, reused as the 3 x 106 positions pass.
    model = tiny(arch)
    n_ctx, n_gen = (96, 40) if arch == "llama" else (128, 100)
    prompts = [random_tokens(model, 6, 20 + wrong + i) for i in range(3)]
    truths = {tuple(p): solo(model, tuple(p), n_gen, n_ctx, True)[0] for p in prompts}
    monkeypatch.setattr(engine_module, "PromptLookup",
                        functools.partial(TruthDrafter, truths, wrong, 12))
    monkeypatch.setattr(engine_module, "StepTimes", lambda: FixedSteps(lambda n: 1.0))
    ctx = Context(model, n_ctx=n_ctx, n_seq_max=4, n_ubatch=16, **F32)
    engine = Engine(ctx, 3)
    requests = [engine.submit(p, n_gen, ignore_eos=True) for p in prompts]
    while engine.step():
        check_cells(engine)
    assert [r.tokens for r in requests] == [truths[tuple(p)] for p in prompts]
    s = engine.stats()
    assert s["draft_tokens"] > 0
    assert (s["accepted_draft_tokens"] > 0) == (wrong > 0)
    assert (s["accepted_draft_tokens"] < s["draft_tokens"]) == (wrong < 12)
    if arch == "gemma3":
        assert ctx.memory.swa.n_cells < 3 * n_gen


def test_the_budget_gives_rows_to_the_drafts_that_are_accepted(monkeypatch):
    """Three requests at once, a row costing a quarter of a one-row step,
    each request with its own acceptance estimate over scripted drafts:
    always right, always wrong in the first token, and wrong until 20
    tokens are made, then right. The wrong drafts go a few times at most
    and then never; the right ones go, and the third request's come back
    once its drafts turn right (seen from the drafts not sent)."""
    model = tiny("llama")
    n_gen, right_from = 60, [0, 99, 20]
    prompts = [tuple(random_tokens(model, 6, 60 + i)) for i in range(3)]
    truths = {p: solo(model, p, n_gen, 128, True)[0] for p in prompts}
    firsts = dict(zip(prompts, right_from))
    monkeypatch.setattr(engine_module, "PromptLookup", functools.partial(
        ScriptedDrafter, truths, lambda prompt, done: done >= firsts[prompt]))
    monkeypatch.setattr(engine_module, "StepTimes", lambda: FixedSteps(lambda n: 1 + 0.25 * (n - 1)))
    engine = Engine(Context(model, n_ctx=256, n_seq_max=3, n_ubatch=64, **F32), 3)
    fed = []                                   # per decode: sequence -> its positions
    real = engine.ctx.decode

    def decode(batch):
        step = collections.defaultdict(list)
        for pos, seqs in zip(batch.pos, batch.seq_ids):
            step[seqs[0]].append(pos)
        fed.append(step)
        return real(batch)
    engine.ctx.decode = decode
    requests = [engine.submit(p, n_gen, ignore_eos=True) for p in prompts]
    run(engine)
    assert [r.tokens for r in requests] == [truths[p] for p in prompts]
    for s, first in enumerate(right_from):     # the requests had sequences 0, 1, 2
        steps = [(step[s][0] - 5, len(step[s]) - 1) for step in fed if step[s] and step[s][0] >= 6]
        wrong = [d for done, d in steps if done < first]
        right = [d for done, d in steps if done >= first]
        assert sum(map(bool, wrong)) <= 3 and not any(wrong[3:]), (s, steps)
        if first < n_gen:
            assert sum(right) >= (n_gen - first) // 2, (s, steps)


def test_the_batches_tried_grow_by_doubling_the_largest_step_timed(monkeypatch):
    """Two requests whose right drafts turn up only once steps of their two
    rows were timed, a row costing a tenth of a one-row step (scripted step
    times): no generating step has more than twice the rows of the largest
    one timed before it (the first with drafts two tokens, not 2 x 16 at
    the prior's chance of 1/2), and as each size is timed the next doubles."""
    model = tiny("llama")
    n_gen = 60
    prompts = [tuple(random_tokens(model, 6, 70 + i)) for i in range(2)]
    truths = {p: solo(model, p, n_gen, 256, True)[0] for p in prompts}
    monkeypatch.setattr(engine_module, "PromptLookup", functools.partial(LateDrafter, truths, 5))
    monkeypatch.setattr(engine_module, "StepTimes",
                        lambda: ScriptedSteps(lambda n: 1 + 0.1 * (n - 1)))
    engine = Engine(Context(model, n_ctx=256, n_seq_max=2, n_ubatch=64, **F32), 2)
    rows = []                                  # the rows of each generating step
    real = engine.ctx.decode

    def decode(batch):
        if batch.n_outputs == len(batch):
            rows.append(len(batch))
        return real(batch)
    engine.ctx.decode = decode
    requests = [engine.submit(p, n_gen, ignore_eos=True) for p in prompts]
    run(engine)
    assert [r.tokens for r in requests] == [truths[p] for p in prompts]
    assert rows[:8] == [2, 2, 2, 2, 4, 8, 16, 32]
    assert all(n <= 2 * max(rows[:i]) for i, n in enumerate(rows) if i)


class FixedDrafter:
    """In place of PromptLookup: always drafts the same continuation, always
    worth sending (p = 1)."""
    p = 1.0

    def __init__(self, tokens, history):
        self.tokens, self.history, self.n_prompt = tokens, history, len(history)

    def draft(self, room):
        done = len(self.history) - self.n_prompt
        return self.tokens[done:done + room]

    def update(self, draft, made):
        pass


@pytest.mark.parametrize("which", ["likely", "unlikely"])
def test_sampled_tokens_keep_the_samplers_distribution_under_drafts(which, monkeypatch):
    """The first two tokens of 1000 seeded requests (top-k 3, temperature 1),
    each verifying a draft of two: their frequencies match the exact joint
    distribution p(t1) p(t2 | t1) computed from the logits decoded alone.
    The drafts: the most likely pair, or the least likely first token and a
    second that top-k filters out."""
    model = tiny("llama")
    prompt = random_tokens(model, 6, 5)

    def p_of(row):
        keep = np.argsort(-row, kind="stable")[:3]
        p = np.zeros(row.size)
        p[keep] = np.exp(row[keep] - row[keep].max())
        return p / p.sum()
    p1 = p_of(solo(model, tuple(prompt), 1, 64)[1][0])
    support = np.flatnonzero(p1)
    p2 = {int(t): p_of(solo(model, tuple(prompt + [int(t)]), 1, 64)[1][0]) for t in support}
    joint = {(int(a), int(b)): p1[a] * p2[int(a)][b] for a in support for b in np.flatnonzero(p2[int(a)])}
    if which == "likely":
        a = int(np.argmax(p1))
        draft = [a, int(np.argmax(p2[a]))]
    else:
        a = int(support[np.argmin(p1[support])])
        draft = [a, int(np.argmin(p2[a]))]
    monkeypatch.setattr(engine_module, "PromptLookup", functools.partial(FixedDrafter, draft))
    monkeypatch.setattr(engine_module, "StepTimes", lambda: FixedSteps(lambda n: 1.0))
    engine = Engine(Context(model, n_ctx=64, n_seq_max=10, **F32), 8)
    n = 1000
    requests = [engine.submit(prompt, 3, Sampler(temperature=1.0, top_k=3, seed=i),
                              ignore_eos=True) for i in range(n)]
    run(engine)
    counts = collections.Counter(tuple(r.tokens[:2]) for r in requests)
    assert set(counts) <= set(joint)
    for pair, p in joint.items():
        assert abs(counts[pair] - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1e-9, (pair, counts, joint)
    s = engine.stats()
    assert s["draft_tokens"] >= 2 * n and 0 < s["accepted_draft_tokens"] < s["draft_tokens"]


def watch_decodes(engine):
    """Make the engine's context fail the test if a batch holding drafts
    (positions past a request's tokens) does not fit the cache."""
    real = engine.ctx.decode

    def decode(batch):
        try:
            return real(batch)
        except CacheFullError:
            assert not any(p >= len(engine.running[s[0]].all_tokens)
                           for p, s in zip(batch.pos, batch.seq_ids)), "drafts made a batch fail"
            raise
    engine.ctx.decode = decode


def test_drafts_never_cause_an_eviction_or_a_preemption(monkeypatch):
    """Idle prefixes, then three requests that fill the cache, each drafting
    its whole solo continuation: idle prefixes are evicted and the youngest
    preempted only when the batch without drafts does not fit, and everyone
    gets their solo tokens."""
    model = tiny("llama")
    n_ctx = 40
    short = [random_tokens(model, 6, 30 + i) for i in range(2)]
    long = [repetitive(model, 40 + i) for i in range(3)]
    truths = {tuple(p): solo(model, tuple(p), -1, n_ctx, True)[0] for p in short + long}
    monkeypatch.setattr(engine_module, "PromptLookup",
                        functools.partial(TruthDrafter, truths, 99, 16))
    monkeypatch.setattr(engine_module, "StepTimes", lambda: FixedSteps(lambda n: 1.0))
    engine = Engine(Context(model, n_ctx=n_ctx, n_seq_max=5, n_ubatch=16, **F32), 3)
    watch_decodes(engine)
    requests = [engine.submit(p, 2, ignore_eos=True) for p in short]
    run(engine)
    requests += [engine.submit(p, -1, ignore_eos=True) for p in long]
    while engine.step():
        check_cells(engine)
    s = engine.stats()
    assert s["evictions"] > 0 and s["preemptions"] > 0 and s["accepted_draft_tokens"] > 0
    assert [r.tokens for r in requests] == [truths[tuple(r.prompt)][:len(r.tokens)] for r in requests]
    assert all(len(r.tokens) == 2 for r in requests[:2])
    assert all(len(r.all_tokens) == n_ctx + 1 for r in requests[2:])


def test_lookup_on_the_real_model_rewriting_and_quoting_gives_plain_tokens(real_model_path,
                                                                          monkeypatch):
    """Gemma 3 270M asked to rewrite a code block and to quote a document,
    two at once: drafts are accepted and rejected, and the tokens are those
    of plain generate (rows cost nothing, so the measured step times do not
    decide which drafts go)."""
    monkeypatch.setattr(engine_module, "StepTimes", lambda: FixedSteps(lambda n: 1.0))
    model = Model.load(real_model_path)
    code = ("def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n"
            "    return 2 * (w + h)\n")
    doc = ("The river rises in the northern hills and flows south through three towns "
           "before it meets the sea at the old harbour.")
    prompts = [model.tokenizer.encode(t) for t in (
        f"Here is some Python:\n\n{code}\nThe same code with docstrings:\n\n",
        f"Document: {doc}\n\nQuote the document word for word.\nQuote: ")]
    engine = Engine(Context(model, n_ctx=512, n_seq_max=3), 2)
    requests = [engine.submit(p, 40) for p in prompts]
    run(engine)
    plain = [list(generate(Context(model, n_ctx=512), p, 40, lookup=False)) for p in prompts]
    assert [r.tokens for r in requests] == plain
    s = engine.stats()
    assert 0 < s["accepted_draft_tokens"] < s["draft_tokens"]
