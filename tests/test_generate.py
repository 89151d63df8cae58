"""Generation loops: greedy tokens with the cache equal recomputing the whole
sequence at every step (the dense reference); context shift; branches that
share a prefilled prompt; continuous batching of a queue."""
import functools
import sys

import numpy as np
import pytest
from drafters import FixedSteps, LateDrafter, ScriptedDrafter, ScriptedSteps, TruthDrafter
from reference_forward import ReferenceModel

from kvcells import Batch, CacheFullError, Context, Model, Sampler, generate, generate_parallel, serve
from kvcells.generate import shift_context

ATOL = 1e-4


@pytest.fixture(scope="module")
def llama(tiny_gguf):
    path = tiny_gguf("llama", "F32")
    return Model.load(path), ReferenceModel(path)


def prompt(model, n, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(3, model.hparams.n_vocab, n)]


def prefill(ctx, toks):
    b = Batch()
    for i, t in enumerate(toks):
        b.add(t, i, 0)
    ctx.decode(b)


def greedy_by_recompute(model, ref, toks, max_tokens):
    """Recompute the whole sequence each step; argmax; stop at end-of-generation."""
    toks, out = list(toks), []
    for _ in range(max_tokens):
        t = int(np.argmax(ref.logits(toks)[-1]))
        if model.tokenizer.is_eog(t):
            break
        out.append(t)
        toks.append(t)
    return out


def test_greedy_generation_equals_recomputing_every_step(llama):
    model, ref = llama
    p = prompt(model, 5, 1)
    ctx = Context(model, n_ctx=64, type_k="f32", type_v="f32")
    assert list(generate(ctx, p, 12)) == greedy_by_recompute(model, ref, p, 12)


def test_generation_continues_what_the_sequence_holds(llama):
    model, ref = llama
    p = prompt(model, 8, 2)
    ctx = Context(model, n_ctx=64, type_k="f32", type_v="f32")
    prefill(ctx, p[:5])
    assert list(generate(ctx, p[5:], 6)) == greedy_by_recompute(model, ref, p, 6)


def test_context_shift_keeps_the_first_tokens_and_slides_the_rest(tiny_gguf):
    # With one layer a cached K/V row depends only on its token and position,
    # so after the shift the cache must equal a recompute of the kept tokens.
    path = tiny_gguf("llama", "F32", n_layer=1)
    model, ref = Model.load(path), ReferenceModel(path)
    toks = prompt(model, 17, 3)
    ctx = Context(model, n_ctx=16, type_k="f32", type_v="f32")
    prefill(ctx, toks[:16])
    pos = shift_context(ctx.memory, 0, 16, n_keep=2)   # drops tokens 2..8
    assert pos == 9 and ctx.memory.seq_pos_max(0) == 8
    b = Batch()
    b.add(toks[16], pos, 0, logits=True)
    kept = toks[:2] + toks[9:16] + toks[16:]
    np.testing.assert_allclose(ctx.decode(b)[0], ref.logits(kept)[-1], atol=ATOL)


def test_generation_goes_on_past_n_ctx_with_context_shift(llama):
    model, _ = llama
    ctx = Context(model, n_ctx=16)
    sampler = Sampler(temperature=1.0, seed=0)
    out = list(generate(ctx, prompt(model, 4, 4), 40, sampler, context_shift=True, n_keep=1))
    assert len(out) == 40
    assert ctx.memory.seq_pos_max(0) < 16


def test_branches_share_the_prompt_cells_and_each_equals_its_own_run(llama):
    model, ref = llama
    p = prompt(model, 6, 5)
    ctx = Context(model, n_ctx=64, n_seq_max=3, type_k="f32", type_v="f32")
    outs = {0: [], 1: [], 2: []}
    for s, t in generate_parallel(ctx, p, 3, 1):
        outs[s].append(t)
    table = ctx.memory.table
    idxs, pos = table.seq_cells(0)
    prompt_cells = idxs[pos < len(p)]
    assert len(prompt_cells) == len(p)
    assert all(table.seqs(int(i)) == {0, 1, 2} for i in prompt_cells)
    alone = greedy_by_recompute(model, ref, p, 1)
    assert all(o == alone for o in outs.values())


def test_continuous_batching_gives_each_prompt_its_solo_tokens(llama):
    model, ref = llama
    prompts = [prompt(model, n, 10 + n) for n in (3, 7, 2, 5, 4)]
    ctx = Context(model, n_ctx=48, n_seq_max=2, type_k="f32", type_v="f32")
    outs = [[] for _ in prompts]
    for i, t in serve(ctx, prompts, 6):
        outs[i].append(t)
    for p, o in zip(prompts, outs):
        assert o == greedy_by_recompute(model, ref, p, 6)
    assert all(ctx.memory.seq_pos_max(s) == -1 for s in range(2))


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_a_queue_larger_than_the_cache_is_admitted_as_it_fits(llama, prefix_cache):
    """Issue 18: 12 prompts of 276 tokens, 1024 cells, 8 slots; three fit at
    once. Every prompt gets the tokens it gets alone."""
    model, _ = llama
    prompts = [prompt(model, 276, 100 + i) for i in range(12)]
    ctx = Context(model, n_ctx=1024, n_seq_max=8, type_k="f32", type_v="f32")
    outs = [[] for _ in prompts]
    for i, t in serve(ctx, prompts, 8, n_slots=8, prefix_cache=prefix_cache):
        outs[i].append(t)
    for p, o in zip(prompts, outs):
        alone = Context(model, n_ctx=1024, type_k="f32", type_v="f32")
        assert o == list(generate(alone, p, 8))


def test_serve_gives_the_same_tokens_with_and_without_the_prefix_cache(llama):
    model, ref = llama
    system = prompt(model, 12, 40)
    prompts = [system + prompt(model, n, 50 + n) for n in (1, 3, 2, 4)] + [system]
    outs = {}
    for prefix_cache in (True, False):
        ctx = Context(model, n_ctx=64, n_seq_max=3, type_k="f32", type_v="f32")
        outs[prefix_cache] = [[] for _ in prompts]
        for i, t in serve(ctx, prompts, 5, n_slots=2, prefix_cache=prefix_cache):
            outs[prefix_cache][i].append(t)
        assert all(ctx.memory.seq_pos_max(s) == -1 for s in range(3))
    assert outs[True] == outs[False]
    for p, o in zip(prompts, outs[True]):
        assert o == greedy_by_recompute(model, ref, p, 5)


def test_bad_generation_arguments(llama):
    model, _ = llama
    ctx = Context(model, n_ctx=16, n_seq_max=2)
    with pytest.raises(ValueError):
        list(generate(ctx, [], 3))
    with pytest.raises(ValueError):
        list(generate_parallel(ctx, [1], 3, 2))
    with pytest.raises(ValueError):
        list(serve(ctx, [[1], []], 2))


def test_a_long_prompt_reports_progress_per_ubatch(llama):
    model, ref = llama
    p = prompt(model, 11, 6)
    ctx = Context(model, n_ctx=64, n_ubatch=4, type_k="f32", type_v="f32")
    seen = []
    out = list(generate(ctx, p, 3, progress=lambda done, total: seen.append((done, total))))
    assert seen == [(4, 11), (8, 11), (11, 11)]
    assert out == greedy_by_recompute(model, ref, p, 3)


@pytest.fixture(scope="module")
def gemma(tiny_gguf):
    return Model.load(tiny_gguf("gemma3", n_swa=8))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lookup_output_equals_plain_greedy_over_many_prompts(arch, llama, gemma):
    model = llama[0] if arch == "llama" else gemma
    for seed in range(12):
        rng = np.random.default_rng(seed)
        piece = prompt(model, int(rng.integers(2, 7)), seed)
        p = piece * int(rng.integers(2, 5)) + prompt(model, 2, 100 + seed)
        outs = []
        for lookup in (False, True):
            ctx = Context(model, n_ctx=96)
            outs.append((list(generate(ctx, p, 30, lookup=lookup)), ctx.memory.seq_pos_max(0)))
        assert outs[1] == outs[0]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("wrong", [0, 1, 3, 6, 12])
def test_drafts_rejected_at_every_offset_leave_the_output_unchanged(arch, wrong, llama, gemma,
                                                                    monkeypatch):
    # gemma3's window is 8 positions: drafts of 12 cross it, and after 256
    # positions the window's cells are reused
    model = llama[0] if arch == "llama" else gemma
    n_ctx, n_gen = (96, 40) if arch == "llama" else (400, 300)
    p = prompt(model, 6, 20 + wrong)
    ctx = Context(model, n_ctx=n_ctx, n_ubatch=16)
    plain = list(generate(ctx, p, n_gen, lookup=False))
    assert len(plain) == n_gen
    plain_cells = ctx.memory.seq_pos_max(0)
    module = sys.modules["kvcells.generate"]
    monkeypatch.setattr(module, "PromptLookup",
                        functools.partial(TruthDrafter, {tuple(p): plain}, wrong, 12))
    monkeypatch.setattr(module, "StepTimes", lambda: FixedSteps(lambda n: 1.0))
    ctx = Context(model, n_ctx=n_ctx, n_ubatch=16)
    assert list(generate(ctx, p, n_gen)) == plain
    assert ctx.memory.seq_pos_max(0) == plain_cells
    if arch == "gemma3":
        assert ctx.memory.swa.n_cells < n_ctx and ctx.memory.seq_pos_min(0) > 0


def fed_steps(ctx):
    """Record the first position and the number of tokens each decode of ctx feeds."""
    steps = []
    real = ctx.decode
    ctx.decode = lambda batch: steps.append((batch.pos[0], len(batch))) or real(batch)
    return steps


@pytest.mark.parametrize("right_from", [0, 20, 99])
def test_the_budget_sends_drafts_only_while_they_are_accepted(right_from, llama, monkeypatch):
    """Drafts wrong in their first token until right_from tokens are made,
    then right, under the drafter's own acceptance estimate (prior 1/2), a
    row costing a quarter of a one-row step: three wrong drafts of one
    token go (p = 1/2, 1/2.9, 1/3.9 > 1/4), then none (p = 1/4.71 < 1/4);
    once the drafts turn right the estimate sees it from the drafts not
    sent, and they go again. The tokens stay plain decoding's."""
    model, _ = llama
    p = prompt(model, 6, 3)
    n_gen = 60
    plain = list(generate(Context(model, n_ctx=128), p, n_gen, lookup=False))
    module = sys.modules["kvcells.generate"]
    monkeypatch.setattr(module, "PromptLookup", functools.partial(
        ScriptedDrafter, {tuple(p): plain}, lambda _, done: done >= right_from))
    monkeypatch.setattr(module, "StepTimes", lambda: FixedSteps(lambda n: 1 + 0.25 * (n - 1)))
    ctx = Context(model, n_ctx=128)
    fed = fed_steps(ctx)
    assert list(generate(ctx, p, n_gen)) == plain
    steps = [(pos - len(p) + 1, n - 1) for pos, n in fed[1:]]   # (tokens made before, drafted)
    wrong = [d for done, d in steps if done < right_from]
    right = [d for done, d in steps if done >= right_from]
    assert wrong[:3] == [1, 1, 1][:len(wrong)] and not any(wrong[3:])
    if right_from < n_gen:
        assert sum(right) >= (n_gen - right_from) // 2
        assert len(right) < (n_gen - right_from) // 2


def test_the_drafts_sent_grow_by_doubling_the_largest_step_timed(llama, monkeypatch):
    """Right drafts that turn up only once one-row steps were timed, a row
    costing a tenth of a one-row step (scripted step times): a step of more
    rows than any timed is tried at no more than twice the largest, so the
    first draft is one token, not the 16 a step of unknown cost would take
    at the prior's chance of 1/2; as each size is timed the next doubles,
    up to full drafts (17 rows). The tokens stay plain decoding's."""
    model, _ = llama
    p = prompt(model, 6, 5)
    n_gen = 60
    plain = list(generate(Context(model, n_ctx=128), p, n_gen, lookup=False))
    module = sys.modules["kvcells.generate"]
    monkeypatch.setattr(module, "PromptLookup",
                        functools.partial(LateDrafter, {tuple(p): plain}, 5))
    monkeypatch.setattr(module, "StepTimes", lambda: ScriptedSteps(lambda n: 1 + 0.1 * (n - 1)))
    ctx = Context(model, n_ctx=128)
    fed = fed_steps(ctx)
    assert list(generate(ctx, p, n_gen)) == plain
    rows = [n for _, n in fed[1:]]
    # the prompt made one token, so drafts come from the 5th step on
    assert rows[:9] == [1, 1, 1, 1, 2, 4, 8, 16, 17]
    assert all(n <= 2 * max(rows[:i]) for i, n in enumerate(rows) if i)


def test_zero_tokens_asked_gives_none_in_every_loop(llama):
    model, _ = llama
    p = prompt(model, 4, 7)
    ctx = Context(model, n_ctx=32, n_seq_max=2)
    assert list(generate(ctx, p, 0)) == []
    assert list(generate_parallel(ctx, p, 2, 0)) == []
    ctx.memory.clear()
    assert list(serve(ctx, [p, p[:2], p[1:]], 0)) == []
    assert all(ctx.memory.seq_pos_max(s) == -1 for s in range(2))


def test_serve_refuses_zero_slots(llama):
    ctx = Context(llama[0], n_ctx=32, n_seq_max=2)
    with pytest.raises(ValueError, match="n_slots"):
        list(serve(ctx, [[1, 2]], 2, n_slots=0))


def test_branches_continue_what_sequence_0_holds(llama):
    model, ref = llama
    p = prompt(model, 9, 8)
    ctx = Context(model, n_ctx=64, n_seq_max=2, type_k="f32", type_v="f32")
    prefill(ctx, p[:5])
    outs = {0: [], 1: []}
    for s, t in generate_parallel(ctx, p[5:], 2, 4):
        outs[s].append(t)
    alone = greedy_by_recompute(model, ref, p, 4)
    assert outs == {0: alone, 1: alone}


def test_branches_need_the_other_sequences_empty(llama):
    model, _ = llama
    ctx = Context(model, n_ctx=64, n_seq_max=3)
    b = Batch()
    b.add(5, 0, 2)
    ctx.decode(b)
    with pytest.raises(ValueError, match=r"sequences \[2\] hold tokens"):
        list(generate_parallel(ctx, [1, 2], 3, 2))
    assert ctx.memory.seq_pos_max(0) == -1


def test_a_prompt_longer_than_the_context_says_so_not_n_keep(llama):
    model, _ = llama
    ctx = Context(model, n_ctx=16)
    with pytest.raises(CacheFullError, match="20 tokens do not fit in 16 cells") as e:
        list(generate(ctx, prompt(model, 20, 9), 4, context_shift=True))
    assert "n_keep" not in str(e.value)
    prefill(ctx, prompt(model, 12, 9))
    with pytest.raises(CacheFullError, match="10 tokens do not fit in 16 cells after the 8 kept"):
        list(generate(ctx, prompt(model, 10, 9), 4, context_shift=True, n_keep=8))
    assert ctx.memory.seq_pos_max(0) == 11
