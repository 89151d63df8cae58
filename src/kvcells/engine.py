"""Continuous batching over one Context, with automatic prefix reuse.

Requests are submitted from any thread and decoded by step(): each step is one
batch holding one token for every generating sequence and up to a ubatch of
prompt tokens (docs/engine.md has the whole design).

The prefix index is a flat one: every sequence id the engine holds (running,
or idle after its request finished) is one cached prefix, the tokens whose
K/V its cells hold. A new prompt is compared against each (a numpy compare
per sequence, at most n_seq_max <= 256 of them, microseconds next to a decode
step of milliseconds), and the longest match is shared with seq_cp, no K/V
copied. A radix tree or block hashes would index many prefixes per sequence,
but a sequence can only be shared whole from position 0, so one entry per
sequence id is exactly what the cell table can reuse.

Sliding-window caches (Gemma 3) keep only each sequence's last n_swa
positions, so a prefix is usable at length m only if its holder still has the
window cells below m. A holder's window cells are always there; for a branch
point deeper inside, the first request that branches there leaves a
checkpoint: an idle sequence holding the prefix up to the branch, whose own
window pins exactly the cells a later request needs.

With prompt lookup, a generating request also feeds a draft of the tokens
that may follow (kvcells.lookup, from its own prompt and output) with logits
on all of them; after the decode it keeps the run its sampler agrees with and
removes the rest from its cells (seq_rm). Drafts use only the ubatch and the
cells this step leaves free, so they never cause an eviction or preemption,
and of those only the tokens worth their row: kvcells.lookup.plan_drafts
weighs each sequence's acceptance rate against the time the engine's
recent generation steps (no prompt tokens) of that many rows took.
"""
import collections
import logging
import numbers
import threading
import time

import numpy as np

from .batch import Batch
from .errors import CacheFullError
from .lookup import PromptLookup, StepTimes, accept, plan_drafts
from .sampling import Sampler

log = logging.getLogger(__name__)


class Request:
    """One completion request; the engine sets its fields."""

    def __init__(self, prompt, max_tokens, sampler, ignore_eos, on_token, on_done, lookup):
        self.prompt = prompt
        self.max_tokens = max_tokens      # -1: until end of generation or the context is full
        self.sampler = sampler
        self.ignore_eos = ignore_eos
        self.all_tokens = list(prompt)    # prompt, then the tokens generated so far
        self.drafter = PromptLookup(self.all_tokens) if lookup else None
        self.candidate = []               # the drafter's last draft, sent or not
        self.cached_tokens = 0            # prompt tokens that came from the prefix cache
        self.finish_reason = None         # "stop", "length", "cancelled", "error"
        self.error = None
        self.on_token, self.on_done = on_token, on_done
        # engine state
        self.seq = None                   # sequence id while running
        self.n_past = 0                   # tokens of prompt + tokens the sequence holds
        self.leader = None                # request whose prompt tokens carry this one's id
        self.share_end = 0                # ... up to this position
        self.checkpoints = set()          # prefix lengths to keep in idle sequences (SWA)
        self.admitted = False

    @property
    def tokens(self):
        """The tokens generated so far."""
        return self.all_tokens[len(self.prompt):]

    def __repr__(self):
        return (f"Request(prompt={len(self.prompt)} tokens, generated={len(self.tokens)}, "
                f"finish_reason={self.finish_reason!r})")


class Engine:
    """Continuous batching of requests on ctx (the engine owns its memory).

    n_slots requests run at once (default ctx.n_seq_max); the other sequence
    ids hold idle cached prefixes. prefix_cache=False frees a finished
    sequence and prefills every prompt in full. lookup=False decodes one
    token per step for each request, without prompt-lookup drafts.
    """

    def __init__(self, ctx, n_slots=None, *, prefix_cache=True, lookup=True):
        n_slots = ctx.n_seq_max if n_slots is None else n_slots
        if not 1 <= n_slots <= ctx.n_seq_max:
            raise ValueError(f"n_slots must be in [1, {ctx.n_seq_max}]")
        swa = ctx.memory.swa
        if swa is not None and swa.swa_type != "standard":
            raise ValueError(f"the engine supports standard sliding windows, not {swa.swa_type!r}")
        self.ctx, self.n_slots, self.prefix_cache, self.lookup = ctx, n_slots, prefix_cache, lookup
        self.mem = ctx.memory
        self.mem.clear()
        self.swa = swa
        self.n_swa = swa.n_swa if swa is not None else 0
        self.waiting = collections.deque()
        self.running = {}                          # seq id -> Request, in admission order
        self.idle = collections.OrderedDict()      # seq id -> tokens held; least recent first
        self._inbox, self._cancels = [], []
        self._lock = threading.Lock()
        self._work = threading.Event()
        self.step_time = StepTimes()               # for the draft budget
        self.counts = dict(prompt_tokens=0, cached_tokens=0, computed_prompt_tokens=0,
                           generated_tokens=0, draft_tokens=0, accepted_draft_tokens=0,
                           evictions=0, preemptions=0)
        self._snapshot = self._count()

    @property
    def table(self):
        """The cell table of the full-attention layers."""
        return self.mem.table

    # ---- thread-safe entry points ----

    def submit(self, prompt_ids, max_tokens, sampler=None, *, ignore_eos=False,
               on_token=None, on_done=None):
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("a request needs at least one prompt token")
        if not all(isinstance(t, numbers.Integral) and 0 <= t < self.ctx.n_vocab for t in prompt):
            raise ValueError(f"prompt token ids must be ints in [0, {self.ctx.n_vocab})")
        if len(prompt) > self.ctx.n_ctx:
            raise ValueError(f"prompt of {len(prompt)} tokens is longer than the context "
                             f"({self.ctx.n_ctx})")
        if not isinstance(max_tokens, numbers.Integral) or max_tokens < -1:
            raise ValueError(f"max_tokens must be an int >= -1, got {max_tokens!r}")
        r = Request([int(t) for t in prompt], int(max_tokens), sampler or Sampler(),
                    bool(ignore_eos), on_token, on_done, self.lookup)
        with self._lock:
            self._inbox.append(r)
        self._work.set()
        return r

    def cancel(self, request):
        with self._lock:
            self._cancels.append(request)
        self._work.set()

    def wait_for_work(self, timeout):
        self._work.wait(timeout)
        self._work.clear()

    # ---- one step ----

    def step(self):
        """One decode step; False when there was nothing to do."""
        try:
            return self._step()
        finally:
            self._snapshot = self._count()

    def _step(self):
        with self._lock:
            self.waiting.extend(self._inbox)
            cancels = self._cancels
            self._inbox, self._cancels = [], []
        for r in cancels:
            self._cancel(r)
        self._admit()
        while True:
            batch, plan = self._batch()
            if not plan:
                return bool(cancels)
            t0 = time.perf_counter()
            try:
                logits = self.ctx.decode(batch)
                break
            except CacheFullError as e:
                self._make_room(e)
            except Exception as e:   # one bad step fails its batch, not the engine
                log.exception("decode failed")
                for r, *_ in plan:
                    self._finish(r, "error", e)
                return True
        self._advance(plan, logits)
        if batch.n_outputs == len(batch) <= self.ctx.n_ubatch:   # generation only
            self.step_time.record(len(batch), time.perf_counter() - t0)
        return True

    def _batch(self):
        """The batch of this step and its plan: (request, tokens fed, its
        first logits row or None, its draft). A follower rides on its
        leader's tokens (and on whatever its leader rides on) up to its
        share_end."""
        batch, plan, n_rows = Batch(), [], 0
        followers = collections.defaultdict(list)
        for r in self.running.values():
            if r.leader is not None:
                followers[r.leader].append(r)

        def riders(r, p):
            out = [f for f in followers[r] if p < f.share_end]
            return out + [g for f in out for g in riders(f, p)]

        leading = [r for r in self.running.values() if r.leader is None]
        decoding = [r for r in leading if len(r.all_tokens) - r.n_past == 1]
        prefilling = [r for r in leading if len(r.all_tokens) - r.n_past > 1]
        budget = max(self.ctx.n_ubatch - len(decoding), 1)
        feeds = []
        for r in prefilling:
            n = min(len(r.all_tokens) - r.n_past, budget)
            if n == 0:
                break
            budget -= n
            feeds.append((r, n, []))
        # drafts take what is left of one ubatch and of the free cells (a
        # batch of one ubatch overwrites no window cell a sequence still
        # sees), and of that only what plan_drafts finds worth its rows
        n_fed = len(decoding) + sum(n for _, n, _ in feeds)
        tables = [self.table] + ([self.swa.table] if self.swa is not None else [])
        spare = min([self.ctx.n_ubatch] + [t.n_cells - t.used for t in tables]) - n_fed
        counts = [0] * len(decoding)
        if self.lookup:
            for r in decoding:
                r.candidate = self._draft(r, spare)
            counts = plan_drafts(n_fed, [r.drafter.p for r in decoding],
                                 [len(r.candidate) for r in decoding], self.step_time, spare)
        drafting = [(r, 1, r.candidate[:k]) for r, k in zip(decoding, counts)]
        for r, n, draft in drafting + feeds:
            pending = r.all_tokens[r.n_past:]
            tokens = pending[:n] + draft
            fed = collections.Counter()
            for i, t in enumerate(tokens):
                along = riders(r, r.n_past + i)
                fed.update(along)
                batch.add(t, r.n_past + i, [r.seq] + [f.seq for f in along],
                          logits=i >= len(pending) - 1)
            last = n == len(pending)
            plan.append((r, len(tokens), n_rows if last else None, draft))
            n_rows += last + len(draft)
            plan += [(f, k, None, []) for f, k in fed.items()]
        return batch, plan

    def _draft(self, r, spare):
        """r's draft for this step: at most `spare` tokens, none past where r
        stops (max_tokens, a full context), so they lie in its reservation."""
        if spare <= 0:
            return []
        room = min(spare, self.ctx.n_ctx - len(r.all_tokens))
        if r.max_tokens >= 0:
            room = min(room, r.max_tokens - (len(r.all_tokens) - len(r.prompt)) - 1)
        return r.drafter.draft(room)

    def _advance(self, plan, logits):
        """After a decode: positions, checkpoints, window trimming, sampling."""
        for r, n, _, draft in plan:
            n -= len(draft)        # drafted tokens count once accepted
            if r.leader is None:   # a follower's tokens were its leader's
                self.counts["computed_prompt_tokens"] += max(0, min(len(r.prompt), r.n_past + n)
                                                             - r.n_past)
            r.n_past += n
            if r.leader is not None and r.n_past >= r.share_end:
                r.leader = None
        for r, _, _, _ in plan:
            for cp in sorted(c for c in r.checkpoints if c <= r.n_past):
                r.checkpoints.discard(cp)
                self._keep_checkpoint(r, cp)
            self._trim(r.seq, r.n_past)
        for r, _, row, draft in plan:
            if row is not None and r.finish_reason is None:
                self._sample(r, logits[row:row + 1 + len(draft)], draft)

    def _sample(self, r, rows, draft):
        """r's next token, or with a draft the drafted tokens its sampler
        agrees with and the one after; the cells of the rest are removed."""
        n_before = len(r.all_tokens)
        eog = self.ctx.model.tokenizer.is_eog
        try:
            made, n_accepted = accept(rows, draft,
                                      lambda row, d: r.sampler.sample(row, r.all_tokens, draft=d),
                                      lambda t: eog(t) and not r.ignore_eos, r.all_tokens)
        except Exception as e:
            del r.all_tokens[n_before:]
            self._finish(r, "error", e)
            return
        if r.drafter is not None:
            r.drafter.update(r.candidate, made)
            r.candidate = []
        if draft:
            r.n_past += n_accepted
            if n_accepted < len(draft):
                self.mem.seq_rm(r.seq, r.n_past, -1)
            self._trim(r.seq, r.n_past)
            self.counts["draft_tokens"] += len(draft)
            self.counts["accepted_draft_tokens"] += n_accepted
        for i, token in enumerate(made):
            self.counts["generated_tokens"] += 1
            if r.on_token is not None:
                try:
                    r.on_token(r, token)
                except Exception as e:
                    del r.all_tokens[n_before + i + 1:]
                    self._finish(r, "error", e)
                    return
        # the draft stops short of max_tokens and the context: they can only
        # be reached by the last token
        if len(made) == n_accepted:
            self._finish(r, "stop")
        elif len(r.tokens) == r.max_tokens or len(r.all_tokens) > self.ctx.n_ctx:
            self._finish(r, "length")

    # ---- admission ----

    def _admit(self):
        """First come, first served: the oldest waiting request enters when a
        slot is free and its prompt and max_tokens fit beside what the
        running requests reserve; nobody overtakes it."""
        while self.waiting and len(self.running) < self.n_slots:
            q = self.waiting[0]
            if q.max_tokens == 0:
                self.waiting.popleft()
                self._finish(q, "length")
                continue
            m, src, leader, share_end, raw = self._match(q)
            shared = share_end if leader else (m if src in self.running else 0)
            if self._reserved() + self._final_len(q) - shared > self.ctx.n_ctx:
                return
            self.waiting.popleft()
            seq = self._take_id(keep=src)
            if seq == src:                      # the idle holder itself, cut back to m
                del self.idle[seq]
                self.mem.seq_rm(seq, m, -1)
            elif m:
                self.mem.seq_cp(src, seq, 0, m)
                self._touch(q.all_tokens[:m])
                if src in self.idle:
                    self.idle.move_to_end(src)
            self._trim(seq, m)
            q.seq, q.n_past, q.leader, q.share_end = seq, m, leader, share_end
            if raw > max(m, share_end):
                q.checkpoints.add(raw)
            if leader is not None and self.swa is not None:
                leader.checkpoints.add(share_end)   # the branch point of the two
            if not q.admitted:
                q.admitted = True
                q.cached_tokens = m
                self.counts["prompt_tokens"] += len(q.prompt)
                self.counts["cached_tokens"] += m
            self.running[seq] = q

    def _match(self, q):
        """The best start for q: (m tokens from sequence src, leader to share
        prompt tokens with up to share_end, the raw match length before the
        window limit)."""
        if not self.prefix_cache:
            return 0, None, None, 0, 0
        prompt = np.array(q.all_tokens)
        limit = len(prompt) - 1                 # the last prompt token is always decoded
        m, src, raw = 0, None, 0
        holders = [(s, r.all_tokens[:r.n_past]) for s, r in self.running.items()]
        for s, held in holders + list(self.idle.items()):
            n = self._common(prompt, held, limit)
            raw = max(raw, n)
            n = self._usable(s, n)
            if n > m:
                m, src = n, s
        leader, share_end = None, 0
        for s, r in self.running.items():
            if r.n_past < len(r.prompt) and r.n_past >= m:
                n = self._common(prompt, r.prompt, min(limit, len(r.prompt) - 1))
                if n > max(r.n_past, share_end):
                    leader, share_end = r, n
        if leader is not None:
            m, src = leader.n_past, leader.seq
        return m, src, leader, share_end, raw

    @staticmethod
    def _common(prompt, held, limit):
        n = min(limit, len(held))
        diff = np.flatnonzero(prompt[:n] != np.array(held[:n], dtype=prompt.dtype))
        return int(diff[0]) if len(diff) else n

    def _usable(self, s, m):
        """m if sequence s still holds the window cells a token at position m
        attends, else 0."""
        if self.swa is None or m == 0:
            return m
        lo = self.swa.seq_pos_min(s)
        return m if lo == 0 or lo <= m - self.n_swa + 1 else 0

    def _final_len(self, r):
        """The cells r will hold at most: prompt and max_tokens - 1 fed tokens
        (max_tokens -1 reserves one token: preemption covers the rest)."""
        n = len(r.all_tokens) if r.max_tokens < 0 else len(r.prompt) + r.max_tokens - 1
        return min(n, self.ctx.n_ctx)

    def _reserved(self):
        """Cells the running requests hold (shared ones once) and will still need."""
        if not self.running:
            return 0
        held = int(self.table.seq_matrix()[:, list(self.running)].any(axis=1).sum())
        more = sum(self._final_len(r) - max(r.n_past, r.share_end if r.leader else 0)
                   for r in self.running.values())
        return held + more

    def _take_id(self, keep=None):
        """A sequence id for a new sequence: a free one, else the least
        recently used idle one (evicted), sparing `keep` unless it is the only one."""
        used = set(self.running) | set(self.idle)
        for s in range(self.ctx.n_seq_max):
            if s not in used:
                return s
        victim = self._victim(keep)
        if victim is not None and victim != keep:
            self._evict(victim)
        return victim

    def _victim(self, keep=None):
        """The idle sequence to evict: one whose prefix another sequence can
        serve as well, else the least recently used, `keep` last."""
        order = [s for s in self.idle if s != keep] + [s for s in self.idle if s == keep]
        for s in order:
            toks = self.idle[s]
            others = [(o, r.all_tokens[:r.n_past]) for o, r in self.running.items()]
            others += [(o, t) for o, t in self.idle.items() if o != s]
            if any(len(t) >= len(toks) and t[:len(toks)] == toks
                   and self._usable(o, len(toks)) == len(toks) for o, t in others):
                return s
        return order[0] if order else None

    def _touch(self, tokens):
        """Mark the idle sequences holding a prefix of tokens as just used."""
        for s, held in list(self.idle.items()):
            if len(held) <= len(tokens) and tokens[:len(held)] == held:
                self.idle.move_to_end(s)

    def _evict(self, s):
        del self.idle[s]
        self.mem.seq_rm(s)
        self.counts["evictions"] += 1

    def _keep_checkpoint(self, r, cp):
        """Copy r's prefix up to cp into an idle sequence, so that its window
        cells stay for the next request branching there."""
        if self._usable(r.seq, cp) != cp:
            return
        s = self._take_id()
        if s is None:
            return
        self.mem.seq_cp(r.seq, s, 0, cp)
        self._trim(s, cp)
        self.idle[s] = r.all_tokens[:cp]

    def _trim(self, s, n_past):
        """Drop the window cells that sequence s no longer sees: the table
        never reuses a cell two sequences share, even when both have left it."""
        below = min(n_past - self.n_swa + 1, n_past - 1)   # a sequence keeps its last cell
        if self.swa is not None and below > 0:
            self.swa.seq_rm(s, 0, below)

    # ---- when the cache is full ----

    def _make_room(self, error):
        """Evict the least recently used idle sequence; without one, preempt
        the youngest running request (freed and requeued to recompute); a
        request alone that does not fit fails."""
        if self.idle:
            self._evict(self._victim())
            return
        youngest = list(self.running.values())[-1]
        if len(self.running) == 1:
            self._finish(youngest, "error", CacheFullError(
                f"a request of {len(youngest.all_tokens)} tokens does not fit the cache "
                f"({self.ctx.n_ctx} cells): {error}"))
            return
        self._release(youngest)
        youngest.n_past = 0
        self.waiting.appendleft(youngest)
        self.counts["preemptions"] += 1

    # ---- ending ----

    def _cancel(self, r):
        if r.finish_reason is not None:
            return
        if r in self.waiting:
            self.waiting.remove(r)
        self._finish(r, "cancelled")

    def _release(self, r):
        """Free r's sequence; requests that shared its prompt tokens go on alone."""
        del self.running[r.seq]
        self.mem.seq_rm(r.seq)
        for f in self.running.values():
            if f.leader is r:
                f.leader = None
        r.seq, r.leader = None, None
        r.checkpoints.clear()

    def _finish(self, r, reason, error=None):
        if r.seq is not None:
            if self.prefix_cache and reason in ("stop", "length"):
                del self.running[r.seq]
                self._touch(r.all_tokens[:r.n_past])
                self.idle[r.seq] = r.all_tokens[:r.n_past]
                r.seq = None
            else:
                self._release(r)
        r.finish_reason, r.error = reason, error
        if r.on_done is not None:
            try:
                r.on_done(r)
            except Exception:
                log.exception("on_done callback failed")

    # ---- accounting ----

    def stats(self):
        """The figures as of the end of the last step (safe from any thread)."""
        return dict(self._snapshot)

    def _count(self):
        idle_cells = 0
        if self.idle:
            m = self.table.seq_matrix()
            idle_cells = int((m[:, list(self.idle)].any(axis=1)
                              & ~m[:, list(self.running)].any(axis=1)).sum())
        return dict(self.counts, running=len(self.running), waiting=len(self.waiting),
                    idle_sequences=len(self.idle), idle_cells=idle_cells,
                    cells_used=self.table.used, cells_total=self.table.n_cells)
