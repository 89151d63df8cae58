"""Token sampling: greedy, or a chain of filters and a seeded draw.

The chain follows llama.cpp's default order: penalties, top-k, top-p, min-p,
temperature, then a draw from the softmax.

The penalties look at the last repeat_last_n tokens, as llama.cpp's do: the
repetition penalty scales a repeated token's logit, the presence and
frequency penalties subtract from it with OpenAI's formula.
"""
import math

import numpy as np

# top-p first tries the nucleus inside this many best tokens before sorting all
_NUCLEUS_PROBE = 1024


class Sampler:
    def __init__(self, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None,
                 repeat_penalty=1.0, repeat_last_n=64, presence_penalty=0.0,
                 frequency_penalty=0.0):
        if not (temperature >= 0 and math.isfinite(temperature)) or top_k < 0 or repeat_last_n < 0:
            raise ValueError("temperature must be finite and >= 0, top_k and repeat_last_n >= 0")
        if not 0.0 < top_p <= 1.0 or not 0.0 <= min_p <= 1.0:
            raise ValueError("top_p must be in (0, 1] and min_p in [0, 1]")
        if not (repeat_penalty > 0 and math.isfinite(repeat_penalty)):
            raise ValueError("repeat_penalty must be finite and > 0")
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.min_p = min_p
        self.repeat_penalty = repeat_penalty
        self.repeat_last_n = repeat_last_n
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.rng = np.random.default_rng(seed)

    def sample(self, logits, recent=(), draft=None):
        """One token id from a row of logits; `recent` are the tokens so far.

        With a drafted token (speculative decoding, a draft that proposes
        exactly one token), the draft is kept with its probability p(draft)
        and otherwise a token is drawn from p without the draft,
        renormalised: the result is distributed as p whatever the draft.
        Greedy sampling keeps the draft only when it is the argmax."""
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 1 or logits.size == 0:
            raise ValueError("sample needs one non-empty row of logits")
        if self.repeat_last_n and len(recent):
            window = recent[-self.repeat_last_n:]
            if self.repeat_penalty != 1.0:
                logits = penalize_repeats(logits, window, self.repeat_penalty)
            if self.presence_penalty or self.frequency_penalty:
                logits = penalize_presence(logits, window, self.presence_penalty,
                                           self.frequency_penalty)
        best = logits.max()
        if np.isnan(best):
            raise ValueError("logits contain NaN")
        if best == -np.inf:
            raise ValueError("every logit is -inf: no token can be sampled")
        if self.temperature == 0.0 or self.top_k == 1 or best == np.inf:   # +inf is certain
            return int(np.argmax(logits))
        ids, kept = candidates(logits, self.top_k, self.top_p, self.min_p)
        z = (kept - kept.max()) / self.temperature
        p = np.exp(z.astype(np.float64))
        p /= p.sum()
        if draft is not None:
            at = np.flatnonzero(ids == draft)
            p_draft = p[at[0]] if len(at) else 0.0
            if self.rng.random() < p_draft:
                return int(draft)
            if len(at):
                p[at[0]] = 0.0
                p /= p.sum()
        return int(ids[self.rng.choice(len(ids), p=p)])


def penalize_repeats(logits, recent, penalty):
    """llama.cpp's rule: a repeated token's positive logit is divided by the
    penalty, a negative one multiplied, once per distinct token."""
    out = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < out.size)]
    v = out[ids]
    out[ids] = np.where(v > 0, v / penalty, v * penalty)
    return out


def penalize_presence(logits, recent, presence, frequency):
    """OpenAI's rule: logit[j] -= count[j] * frequency + (count[j] > 0) * presence,
    count[j] the times token j occurs in `recent`."""
    ids = np.asarray(recent, dtype=np.int64)
    counts = np.bincount(ids[(ids >= 0) & (ids < logits.size)], minlength=logits.size)
    return logits - (counts * frequency + (counts > 0) * presence).astype(np.float32)


def softmax(x):
    e = np.exp((x - x.max()).astype(np.float64))
    return e / e.sum()


def candidates(logits, top_k, top_p, min_p):
    """The ids that survive top-k, top-p and min-p, best first, with their logits."""
    n = logits.size
    limited = 0 < top_k < n
    if limited:
        ids = np.argpartition(-logits, top_k - 1)[:top_k]
    elif top_p < 1.0 and n > _NUCLEUS_PROBE:
        ids = np.argpartition(-logits, _NUCLEUS_PROBE - 1)[:_NUCLEUS_PROBE]
        if softmax_mass(logits, ids) < top_p:
            ids = np.arange(n)
    else:
        ids = np.arange(n)
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    if top_p < 1.0:
        pool = logits[ids] if limited else logits
        p = np.exp((logits[ids] - logits[ids[0]]).astype(np.float64))
        p /= np.exp((pool - logits[ids[0]]).astype(np.float64)).sum()
        cut = int(np.searchsorted(np.cumsum(p), top_p)) + 1
        ids = ids[:max(1, cut)]
    if min_p > 0.0:
        floor = logits[ids[0]] + np.log(min_p)
        ids = ids[logits[ids] >= floor]
    return ids, logits[ids]


def softmax_mass(logits, ids):
    """Probability mass of `ids` under the softmax over all logits."""
    m = logits.max()
    return np.exp(logits[ids] - m).sum() / np.exp(logits - m).sum()
