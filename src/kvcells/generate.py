"""Generation loops over a Context: one sequence, branches of one prompt,
and continuous batching of a queue of prompts."""
import time

import numpy as np

from .batch import Batch
from .engine import Engine
from .errors import CacheFullError
from .lookup import PromptLookup, StepTimes, accept, plan_drafts
from .sampling import Sampler


def generate(ctx, prompt_ids, max_tokens, sampler=None, seq_id=0, *,
             context_shift=False, n_keep=0, progress=None, lookup=True):
    """Stream the tokens that follow prompt_ids in sequence seq_id.

    The prompt continues whatever the sequence already holds; it is decoded
    n_ubatch tokens at a time, with progress(done, total) called after each.
    Stops before an end-of-generation token or after max_tokens. With
    context_shift, a full cache drops half of the tokens after the first
    n_keep, as llama.cpp does.

    With lookup (prompt-lookup speculative decoding), each step also feeds
    the tokens that followed the latest earlier occurrence of the last few
    tokens (kvcells.lookup), verifies them in the same batch, keeps the
    longest run the sampler agrees with and removes the rest from the cache
    (seq_rm). Greedy output is the same as without; sampled output has the
    same distribution (Sampler.sample with a draft). How much of a draft
    goes in a step weighs its chance of acceptance against the time steps
    of that many rows take (kvcells.lookup.plan_drafts).
    """
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    sampler = sampler or Sampler()
    mem, tok = ctx.memory, ctx.model.tokenizer
    history = list(prompt_ids)
    drafter = PromptLookup(history) if lookup else None
    step_time = StepTimes()
    pending = list(prompt_ids)
    n_made = 0
    while n_made < max_tokens:
        pos = mem.seq_pos_max(seq_id) + 1
        if context_shift and pos + len(pending) > ctx.n_ctx:
            if n_keep + len(pending) > ctx.n_ctx:
                kept = f" after the {n_keep} kept" if n_keep else ""
                raise CacheFullError(f"{len(pending)} tokens do not fit in {ctx.n_ctx} cells{kept}")
            pos = shift_context(mem, seq_id, pos, n_keep)
        # a draft goes in the pending token's ubatch (one decode: a full
        # cache then changes nothing)
        room = min(ctx.n_ctx - pos - len(pending), max_tokens - n_made - 1, ctx.n_ubatch - 1)
        candidate = draft = []
        if drafter and len(pending) == 1:
            candidate = drafter.draft(room)
            k, = plan_drafts(1, [drafter.p], [len(candidate)], step_time, room)
            draft = candidate[:k]
        t0 = time.perf_counter()
        try:
            logits = decode_tail(ctx, pending + draft, pos, seq_id, len(draft) + 1, progress)
        except CacheFullError:
            if not draft:
                raise
            draft = []
            logits = decode_tail(ctx, pending, pos, seq_id, 1, progress)
        progress = None
        made, n_accepted = accept(logits, draft,
                                  lambda row, d: sampler.sample(row, history, draft=d),
                                  tok.is_eog, history)
        if drafter:
            if len(pending) == 1:   # a prompt's rows cost less: no logits
                step_time.record(1 + len(draft), time.perf_counter() - t0)
            drafter.update(candidate, made)
        if n_accepted < len(draft):
            mem.seq_rm(seq_id, pos + len(pending) + n_accepted, -1)
        yield from made
        n_made += len(made)
        if len(made) == n_accepted:   # stopped before an end-of-generation token
            return
        pending = [made[-1]]


def decode_tail(ctx, tokens, pos, seq_id, n_rows, progress):
    """Decode tokens at pos, pos+1, ... of seq_id, n_ubatch at a time; the
    logits of the last n_rows."""
    rows = []
    for start in range(0, len(tokens), ctx.n_ubatch):
        chunk = tokens[start:start + ctx.n_ubatch]
        batch = Batch()
        for i, t in enumerate(chunk):
            batch.add(t, pos + start + i, seq_id, logits=start + i >= len(tokens) - n_rows)
        rows.append(ctx.decode(batch))
        if progress:
            progress(start + len(chunk), len(tokens))
    return np.concatenate(rows)


def shift_context(mem, seq_id, n_past, n_keep):
    """Drop half of the tokens after n_keep and slide the rest down; returns
    the new next position."""
    n_discard = (n_past - n_keep) // 2
    if n_discard <= 0:
        raise CacheFullError(f"context full: {n_past} tokens held and the first "
                             f"n_keep={n_keep} kept, nothing left to discard")
    mem.seq_rm(seq_id, n_keep, n_keep + n_discard)
    mem.seq_add(seq_id, n_keep + n_discard, n_past, -n_discard)
    return n_past - n_discard


def generate_parallel(ctx, prompt_ids, n_parallel, max_tokens, sampler=None):
    """n_parallel continuations of one prompt, decoded together.

    The prompt continues whatever sequence 0 holds; it is prefilled once
    there and shared with sequences 1..n_parallel-1, which must be empty,
    through seq_cp (the cells are shared, no K/V copied). Yields (seq_id,
    token) as they are sampled.
    """
    if not 1 <= n_parallel <= ctx.n_seq_max:
        raise ValueError(f"n_parallel must be in [1, {ctx.n_seq_max}]")
    if not prompt_ids:
        raise ValueError("generate_parallel needs at least one prompt token")
    busy = [s for s in range(1, n_parallel) if ctx.memory.seq_pos_max(s) >= 0]
    if busy:
        raise ValueError(f"sequences {busy} hold tokens; the branches of sequence 0 need "
                         f"sequences 1..{n_parallel - 1} empty")
    sampler = sampler or Sampler()
    start = ctx.memory.seq_pos_max(0) + 1
    batch = Batch()
    for i, t in enumerate(prompt_ids):
        batch.add(t, start + i, 0, logits=i == len(prompt_ids) - 1)
    last = ctx.decode(batch)[-1]
    for s in range(1, n_parallel):
        ctx.memory.seq_cp(0, s)
    history = {s: list(prompt_ids) for s in range(n_parallel)}
    rows = {s: last for s in range(n_parallel)}
    pos = start + len(prompt_ids)
    for _ in range(max_tokens):
        batch = Batch()
        for s, row in rows.items():
            token = sampler.sample(row, history[s])
            if ctx.model.tokenizer.is_eog(token):
                continue
            yield s, token
            history[s].append(token)
            batch.add(token, pos, s, logits=True)
        if len(batch) == 0:
            return
        logits = ctx.decode(batch)
        rows = {seqs[0]: logits[i] for i, seqs in enumerate(batch.seq_ids)}
        pos += 1


def serve(ctx, prompts, max_tokens, sampler=None, n_slots=None, *, prefix_cache=True,
          lookup=True):
    """Continuous batching of a queue of prompts through an Engine (n_slots
    running at once; with prefix_cache, shared prefixes are computed once;
    with lookup, each sequence drafts by prompt lookup as in generate).
    Yields (prompt_index, token) as they are sampled; a prompt's tokens end
    at end-of-generation or after max_tokens. A request that fails raises
    its error once the others are done. The engine owns ctx's memory and
    leaves it empty.
    """
    engine = Engine(ctx, n_slots, prefix_cache=prefix_cache, lookup=lookup)
    out = []
    try:
        requests = [engine.submit(p, max_tokens, sampler,
                                  on_token=lambda r, t, i=i: out.append((i, t)))
                    for i, p in enumerate(prompts)]
        while engine.step():
            yield from out
            out.clear()
    finally:
        ctx.memory.clear()
    for r in requests:
        if r.error is not None:
            raise r.error
