"""Prompt lookup: draft tokens for speculative decoding from the sequence's
own history (prompt included), with no draft model.

The last few tokens are looked up among the earlier n-grams of the history;
the tokens that followed their latest earlier occurrence are the draft.
Rewriting or quoting text repeats long runs of the prompt, so such drafts
are often right; the caller verifies them all in one batch (accept).

A drafted token costs a row of the step whether it is accepted or not, so
how much of each draft goes in a step is a cost decision (plan_drafts):
each sequence estimates how often its drafted tokens are accepted from its
recent drafts (PromptLookup.p), the step's time for n rows is what recent
steps of n rows took (StepTimes), and the step takes the drafted tokens
that maximise the tokens it is expected to keep per second. Text without
repetition then sends few drafts, and none where a row costs more than
its chance of being kept is worth.
"""
import bisect
import collections
import math
import statistics

DECAY = 0.9      # weight of an acceptance observation after each newer one
N_TIMED = 5      # step times kept per row count


class PromptLookup:
    def __init__(self, history, ngram_max=3, ngram_min=2, max_draft=16):
        if not 1 <= ngram_min <= ngram_max or max_draft < 1:
            raise ValueError("need 1 <= ngram_min <= ngram_max and max_draft >= 1")
        self.history = history   # the caller's list; read, never changed
        self.ngram_max, self.ngram_min, self.max_draft = ngram_max, ngram_min, max_draft
        self.ends = {}       # n-gram (tuple) -> end index of its latest occurrence with a successor
        self.n_indexed = 0   # n-grams ending before this index are in self.ends
        self.accepted = self.checked = 0.0   # decayed counts of drafted tokens checked

    @property
    def p(self):
        """The chance that a drafted token is accepted when the ones before it
        were: the recent share accepted, with a prior of one of two."""
        return (self.accepted + 1) / (self.checked + 2)

    def draft(self, room):
        """Up to min(room, max_draft) tokens that may follow the history."""
        k = min(room, self.max_draft)
        if k <= 0:
            return []
        h = self.history
        for end in range(self.n_indexed, len(h) - 1):
            for n in range(self.ngram_min, min(self.ngram_max, end + 1) + 1):
                self.ends[tuple(h[end - n + 1:end + 1])] = end
        self.n_indexed = max(self.n_indexed, len(h) - 1)
        for n in range(min(self.ngram_max, len(h)), self.ngram_min - 1, -1):
            end = self.ends.get(tuple(h[-n:]))
            if end is not None:
                return h[end + 1:end + 1 + k]
        return []

    def update(self, draft, made):
        """Check a draft against the tokens the step made after the same
        history, up to the first difference: the tokens sent for
        verification and the ones left out alike (a sampled token equals an
        unsent drafted one with the chance the verification keeps it), so
        the estimate follows the text while nothing is sent."""
        for d, t in zip(draft, made):
            self.accepted = DECAY * self.accepted + (d == t)
            self.checked = DECAY * self.checked + 1
            if d != t:
                break


class StepTimes:
    """Seconds a step of n rows takes: the median of the last N_TIMED steps
    of n rows. A row count not timed yet costs what the next larger one
    timed costs (more rows never take less time), or up to twice the
    largest count timed, what the largest costs, so a larger batch is
    tried once; beyond that, infinitely much: the batches tried grow by
    doubling, so a try costs at most about one more step of a timed size
    (2m rows take about what two steps of m rows take, or less). Before
    any step every count costs the same."""

    def __init__(self):
        self.times = {}   # n -> deque of seconds
        self.known = []   # the n timed, sorted

    def record(self, n, seconds):
        if n not in self.times:
            self.times[n] = collections.deque(maxlen=N_TIMED)
            bisect.insort(self.known, n)
        self.times[n].append(seconds)

    def __call__(self, n):
        if not self.known:
            return 1.0
        if n > 2 * self.known[-1]:
            return math.inf
        i = min(bisect.bisect_left(self.known, n), len(self.known) - 1)
        return statistics.median(self.times[self.known[i]])


def plan_drafts(n_rows, chances, lengths, step_time, room):
    """How many tokens of each draft a step of n_rows rows adds (at most
    room in all): the counts that maximise the tokens it is expected to
    keep per second, (n_rows + expected accepted drafted tokens) /
    step_time(n_rows + drafted tokens). A draft's i-th token, each accepted
    with chance p when the ones before were, is kept with chance p**i; the
    best k tokens are the k most likely kept, so only k is searched."""
    gains = sorted(((p ** i, s) for s, (p, n) in enumerate(zip(chances, lengths))
                    for i in range(1, n + 1)), key=lambda g: -g[0])[:max(room, 0)]
    best_k, best, kept = 0, n_rows / step_time(n_rows), n_rows
    for k, (g, _) in enumerate(gains, 1):
        kept += g
        rate = kept / step_time(n_rows + k)
        if rate > best:
            best_k, best = k, rate
    counts = [0] * len(lengths)
    for _, s in gains[:best_k]:
        counts[s] += 1
    return counts


def accept(rows, draft, sample, is_end, history):
    """Speculative acceptance of a draft verified in one batch: rows[i] are
    the logits after the pending token and draft[:i]. Samples each row in
    turn with sample(row, draft token or None) (Sampler.sample keeps a draft
    token with its probability) and appends the tokens to history, until one
    differs from its draft or is an end token (not appended). Returns the
    tokens made and how many drafted tokens were accepted; the cells of the
    drafts after those are to be removed. len(made) == n_accepted means an
    end token stopped it."""
    made, n_accepted = [], 0
    for i, row in enumerate(rows):
        d = draft[i] if i < len(draft) else None
        token = sample(row, d)
        if is_end(token):
            break
        made.append(token)
        history.append(token)
        if token != d:
            break
        n_accepted += 1
    return made, n_accepted
