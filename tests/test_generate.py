"""Generation loops: greedy tokens with the cache equal recomputing the whole
sequence at every step (the dense reference); context shift; branches that
share a prefilled prompt; continuous batching of a queue."""
import numpy as np
import pytest
from reference_forward import ReferenceModel

from kvcells import Batch, Context, Model, Sampler, generate, generate_parallel, serve
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
