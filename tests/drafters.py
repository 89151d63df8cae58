"""Stand-ins for kvcells.lookup.PromptLookup that draft known tokens, so
that tests choose where drafts are accepted and rejected."""


class TruthDrafter:
    """Drafts the tokens a prompt is known to get (truths: prompt -> tokens),
    with the token at offset `wrong` of each draft changed, so that the
    verification rejects there. functools.partial(TruthDrafter, truths,
    wrong, length) takes PromptLookup's place."""

    def __init__(self, truths, wrong, length, history):
        self.history, self.n_prompt = history, len(history)
        self.truth, self.wrong, self.length = truths[tuple(history)], wrong, length

    def draft(self, room):
        done = len(self.history) - self.n_prompt
        d = list(self.truth[done:done + min(room, self.length)])
        if self.wrong < len(d):
            d[self.wrong] = (d[self.wrong] + 1) % 7 + 3
        return d

    def update(self, n_drafted, n_accepted):
        assert n_accepted == min(self.wrong, n_drafted)
