"""Prompt lookup: draft tokens for speculative decoding from the sequence's
own history (prompt included), with no draft model.

The last few tokens are looked up among the earlier n-grams of the history;
the tokens that followed their latest earlier occurrence are the draft.
Rewriting or quoting text repeats long runs of the prompt, so such drafts
are often right; the caller verifies them all in one batch (accept).

The draft length adapts: it doubles after a fully accepted draft and shrinks
to what was accepted otherwise, and after a draft with nothing accepted
drafting pauses for 1, 2, 4, ... 64 steps, so text without repetition pays
for few wrong drafts.
"""

MAX_PAUSE = 64


class PromptLookup:
    def __init__(self, history, ngram_max=3, ngram_min=2, max_draft=16):
        if not 1 <= ngram_min <= ngram_max or max_draft < 1:
            raise ValueError("need 1 <= ngram_min <= ngram_max and max_draft >= 1")
        self.history = history   # the caller's list; read, never changed
        self.ngram_max, self.ngram_min, self.max_draft = ngram_max, ngram_min, max_draft
        self.ends = {}       # n-gram (tuple) -> end index of its latest occurrence with a successor
        self.n_indexed = 0   # n-grams ending before this index are in self.ends
        self.limit = 4       # current longest draft
        self.pause = 0       # steps left without drafting
        self.next_pause = 1

    def draft(self, room):
        """Up to min(room, the current limit) tokens that may follow the history."""
        if self.pause > 0:
            self.pause -= 1
            return []
        k = min(room, self.limit)
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

    def update(self, n_drafted, n_accepted):
        """Adapt to how much of the last draft the model agreed with."""
        if n_drafted == 0:
            return
        if n_accepted == n_drafted:
            self.limit = min(self.max_draft, 2 * self.limit)
        else:
            self.limit = max(1, n_accepted)
        if n_accepted == 0:
            self.pause = self.next_pause
            self.next_pause = min(MAX_PAUSE, 2 * self.next_pause)
        else:
            self.next_pause = 1


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
