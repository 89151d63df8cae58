"""Generation loops over a Context: one sequence, branches of one prompt,
and continuous batching of a queue of prompts."""
from .batch import Batch
from .errors import CacheFullError
from .sampling import Sampler


def generate(ctx, prompt_ids, max_tokens, sampler=None, seq_id=0, *,
             context_shift=False, n_keep=0, progress=None):
    """Stream the tokens that follow prompt_ids in sequence seq_id.

    The prompt continues whatever the sequence already holds; it is decoded
    n_ubatch tokens at a time, with progress(done, total) called after each.
    Stops before an end-of-generation token or after max_tokens. With
    context_shift, a full cache drops half of the tokens after the first
    n_keep, as llama.cpp does.
    """
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    sampler = sampler or Sampler()
    mem, tok = ctx.memory, ctx.model.tokenizer
    history = list(prompt_ids)
    pending = list(prompt_ids)
    for _ in range(max_tokens):
        pos = mem.seq_pos_max(seq_id) + 1
        if context_shift and pos + len(pending) > ctx.n_ctx:
            if n_keep + len(pending) > ctx.n_ctx:
                kept = f" after the {n_keep} kept" if n_keep else ""
                raise CacheFullError(f"{len(pending)} tokens do not fit in {ctx.n_ctx} cells{kept}")
            pos = shift_context(mem, seq_id, pos, n_keep)
        for start in range(0, len(pending), ctx.n_ubatch):
            chunk = pending[start:start + ctx.n_ubatch]
            batch = Batch()
            for i, t in enumerate(chunk):
                batch.add(t, pos + start + i, seq_id, logits=start + i == len(pending) - 1)
            logits = ctx.decode(batch)
            if progress:
                progress(start + len(chunk), len(pending))
        progress = None
        token = sampler.sample(logits[-1], history)
        if tok.is_eog(token):
            return
        yield token
        history.append(token)
        pending = [token]


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


def serve(ctx, prompts, max_tokens, sampler=None, n_slots=None):
    """Continuous batching: prompts go through n_slots sequences; each step
    decodes one token for every running sequence and the prompts of newly
    admitted ones in one batch. A finished sequence's cells are freed and
    its slot takes the next prompt. Yields (prompt_index, token); a prompt's
    tokens end when it stops (end-of-generation or max_tokens).
    """
    n_slots = ctx.n_seq_max if n_slots is None else n_slots
    if not 1 <= n_slots <= ctx.n_seq_max:
        raise ValueError(f"n_slots must be in [1, {ctx.n_seq_max}]")
    sampler = sampler or Sampler()
    queue = [(i, list(p)) for i, p in enumerate(prompts)]
    if any(not p for _, p in queue):
        raise ValueError("every prompt needs at least one token")
    if max_tokens <= 0:
        return
    queue.reverse()
    running = {}   # slot -> [prompt index, tokens to feed, history, n generated]
    free = list(range(n_slots))
    while queue or running:
        while queue and free:
            i, p = queue.pop()
            running[free.pop(0)] = [i, p, list(p), 0]
        logits, fed, deferred = decode_step(ctx, running)
        for slot in reversed(deferred):
            queue.append(tuple(running.pop(slot)[:2]))
            free.insert(0, slot)
        for slot, row in zip(fed, logits):
            job = running[slot]
            token = sampler.sample(row, job[2])
            job[3] += 1
            done = ctx.model.tokenizer.is_eog(token)
            if not done:
                yield job[0], token
                job[1], job[2] = [token], job[2] + [token]
            if done or job[3] >= max_tokens:
                ctx.memory.seq_rm(slot)
                del running[slot]
                free.append(slot)


def decode_step(ctx, running):
    """Decode what every running slot has to feed. When the cache cannot take
    the newly admitted prompts, the step runs without them. Returns the
    logits, the slots they belong to, and the slots deferred."""
    def batch_of(slots):
        batch = Batch()
        for slot in slots:
            pending = running[slot][1]
            pos = ctx.memory.seq_pos_max(slot) + 1
            for k, t in enumerate(pending):
                batch.add(t, pos + k, slot, logits=k == len(pending) - 1)
        return batch

    slots = sorted(running)
    try:
        return ctx.decode(batch_of(slots)), slots, []
    except CacheFullError:
        new = [s for s in slots if running[s][3] == 0]
        old = [s for s in slots if running[s][3] > 0]
        if not new or not old:
            raise
        return ctx.decode(batch_of(old)), old, new
