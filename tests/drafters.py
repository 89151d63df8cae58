"""Stand-ins for kvcells.lookup.PromptLookup that draft known tokens, so
that tests choose where drafts are accepted and rejected, and for
kvcells.lookup.StepTimes with step costs the test chooses."""
from kvcells.lookup import PromptLookup, StepTimes


class TruthDrafter:
    """Drafts the tokens a prompt is known to get (truths: prompt -> tokens),
    with the token at offset `wrong` of each draft changed, so that the
    verification rejects there; its drafts are always worth sending (p = 1).
    functools.partial(TruthDrafter, truths, wrong, length) takes
    PromptLookup's place."""
    p = 1.0

    def __init__(self, truths, wrong, length, history):
        self.history, self.n_prompt = history, len(history)
        self.truth, self.wrong, self.length = truths[tuple(history)], wrong, length

    def draft(self, room):
        done = len(self.history) - self.n_prompt
        d = list(self.truth[done:done + min(room, self.length)])
        if self.wrong < len(d):
            d[self.wrong] = (d[self.wrong] + 1) % 7 + 3
        return d

    def update(self, draft, made):
        done = len(self.history) - self.n_prompt - len(made)   # made is in the history
        assert list(made) == self.truth[done:done + len(made)]


class ScriptedDrafter(PromptLookup):
    """PromptLookup's acceptance estimate (p, update) over scripted drafts:
    the tokens a prompt is known to get (truths: prompt -> tokens), or at
    the steps where right(prompt, tokens generated so far) is false, the
    same with its first token changed. functools.partial(ScriptedDrafter,
    truths, right) takes PromptLookup's place."""

    def __init__(self, truths, right, history):
        super().__init__(history)
        self.n_prompt, self.truth, self.right = len(history), truths[tuple(history)], right

    def draft(self, room):
        done = len(self.history) - self.n_prompt
        d = list(self.truth[done:done + min(room, self.max_draft)])
        if d and not self.right(tuple(self.history[:self.n_prompt]), done):
            d[0] = (d[0] + 1) % 7 + 3
        return d


class LateDrafter(ScriptedDrafter):
    """ScriptedDrafter's right drafts, none until `start` tokens are made."""

    def __init__(self, truths, start, history):
        super().__init__(truths, lambda prompt, done: True, history)
        self.start = start

    def draft(self, room):
        return super().draft(room) if len(self.history) - self.n_prompt >= self.start else []


class ScriptedSteps(StepTimes):
    """StepTimes whose steps of n rows take cost(n) seconds, whatever the
    steps take: its estimate of sizes not timed yet is StepTimes's own."""

    def __init__(self, cost):
        super().__init__()
        self.cost = cost

    def record(self, n, seconds):
        super().record(n, self.cost(n))


class FixedSteps:
    """Step times from a formula, cost(n rows), whatever the steps take."""

    def __init__(self, cost):
        self.cost = cost

    def record(self, n, seconds):
        pass

    def __call__(self, n):
        return self.cost(n)
