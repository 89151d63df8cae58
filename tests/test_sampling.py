import numpy as np
import pytest

from kvcells.sampling import Sampler, penalize_presence, penalize_repeats


def probs(logits):
    e = np.exp(logits - logits.max())
    return e / e.sum()


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).standard_normal(50000).astype(np.float32)
    assert Sampler().sample(logits) == int(np.argmax(logits))
    assert Sampler(temperature=5.0, top_k=1, seed=1).sample(logits) == int(np.argmax(logits))


def draw_counts(sampler, logits, n):
    counts = np.zeros(len(logits))
    for _ in range(n):
        counts[sampler.sample(logits)] += 1
    return counts / n


def test_temperature_draws_follow_the_softmax():
    logits = np.array([2.0, 1.0, 0.5, -1.0], np.float32)
    freq = draw_counts(Sampler(temperature=0.7, seed=3), logits, 20000)
    np.testing.assert_allclose(freq, probs(logits / 0.7), atol=0.015)


def test_top_k_keeps_the_k_best():
    logits = np.array([0.1, 3.0, 2.0, -5.0, 2.5], np.float32)
    freq = draw_counts(Sampler(temperature=1.0, top_k=2, seed=4), logits, 20000)
    expect = np.zeros(5)
    expect[[1, 4]] = probs(logits[[1, 4]])
    np.testing.assert_allclose(freq, expect, atol=0.015)


def test_top_p_keeps_the_smallest_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 needs the first two
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(p).astype(np.float32)
    freq = draw_counts(Sampler(temperature=1.0, top_p=0.75, seed=5), logits, 20000)
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)


def test_top_p_on_a_large_vocab_agrees_with_a_full_sort():
    rng = np.random.default_rng(6)
    for scale in (0.5, 8.0):  # a flat and a peaked distribution
        logits = (rng.standard_normal(20000) * scale).astype(np.float32)
        order = np.argsort(-logits)
        cum = np.cumsum(probs(logits.astype(np.float64))[order])
        nucleus = set(order[: int(np.searchsorted(cum, 0.9)) + 1].tolist())
        s = Sampler(temperature=1.0, top_p=0.9, seed=7)
        drawn = {s.sample(logits) for _ in range(300)}
        assert drawn <= nucleus


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    p = np.array([0.6, 0.25, 0.1, 0.05])
    logits = np.log(p).astype(np.float32)
    freq = draw_counts(Sampler(temperature=1.0, min_p=0.2, seed=8), logits, 20000)
    np.testing.assert_allclose(freq, [0.6 / 0.85, 0.25 / 0.85, 0, 0], atol=0.015)


def test_seeded_sampling_is_reproducible():
    logits = np.random.default_rng(9).standard_normal(1000).astype(np.float32)
    s1, s2 = Sampler(temperature=1.0, seed=42), Sampler(temperature=1.0, seed=42)
    assert [s1.sample(logits) for _ in range(50)] == [s2.sample(logits) for _ in range(50)]


def test_repetition_penalty_formula():
    logits = np.array([2.0, -2.0, 1.0, 0.5], np.float32)
    out = penalize_repeats(logits, [0, 1, 1], 2.0)
    np.testing.assert_array_equal(out, [1.0, -4.0, 1.0, 0.5])
    # the penalty turns a greedy choice
    assert Sampler(repeat_penalty=3.0).sample(logits, recent=[0]) == 2


def test_presence_and_frequency_penalty_formula():
    # OpenAI: mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence
    logits = np.array([2.0, -2.0, 1.0, 0.5, 3.0], np.float32)
    recent = [0, 1, 1, 4, 4, 4]
    out = penalize_presence(logits, recent, 0.5, 0.25)
    expect = logits.copy()
    for j in set(recent):
        expect[j] -= recent.count(j) * 0.25 + 0.5
    np.testing.assert_allclose(out, expect)


def test_frequency_penalty_turns_a_greedy_choice_within_the_window():
    logits = np.array([3.0, 2.5, 0.0], np.float32)
    s = Sampler(frequency_penalty=0.2, repeat_last_n=4)
    assert s.sample(logits, recent=[0, 0]) == 0          # 3.0 - 0.4 > 2.5
    assert s.sample(logits, recent=[0, 0, 0]) == 1       # 3.0 - 0.6 < 2.5
    assert s.sample(logits, recent=[0, 0, 0, 2, 2, 2, 2]) == 0   # the zeros left the window
    assert Sampler(presence_penalty=0.6).sample(logits, recent=[0]) == 1
    assert Sampler(presence_penalty=-1.0).sample(logits, recent=[1]) == 1   # a negative one favours


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5),
                                dict(min_p=2.0), dict(top_k=-1), dict(repeat_penalty=0),
                                dict(temperature=float("nan")), dict(temperature=float("inf")),
                                dict(repeat_penalty=float("nan"))])
def test_bad_settings(kw):
    with pytest.raises(ValueError):
        Sampler(**kw)


def test_bad_logits():
    with pytest.raises(ValueError):
        Sampler().sample(np.zeros((2, 3)))


@pytest.mark.parametrize("draft", [0, 3, 5, 7])
def test_a_drafted_token_leaves_the_distribution_unchanged(draft):
    # speculative acceptance with a one-token draft: the frequencies over
    # many draws must match the softmax of the candidates, for a likely, an
    # unlikely and a filtered-out (top_k) draft
    logits = np.array([2.0, 1.0, 0.5, 1.5, -1.0, 0.0, -3.0, -0.5], np.float32)
    s = Sampler(temperature=0.8, top_k=6, seed=draft)
    keep = np.argsort(-logits, kind="stable")[:6]
    p = np.zeros(logits.size)
    p[keep] = np.exp((logits[keep] - logits.max()) / 0.8)
    p /= p.sum()
    n = 8000
    counts = np.bincount([s.sample(logits, draft=draft) for _ in range(n)], minlength=logits.size)
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 5 * sigma + 1e-9)
    assert counts[p == 0].sum() == 0


def test_greedy_keeps_a_draft_only_when_it_is_the_argmax():
    logits = np.array([0.1, 3.0, 2.0], np.float32)
    assert Sampler().sample(logits, draft=1) == 1
    assert Sampler().sample(logits, draft=2) == 1


@pytest.mark.parametrize("fill", [np.nan, -np.inf])
@pytest.mark.parametrize("settings", [dict(), dict(temperature=1.0, top_k=0, seed=1)])
def test_logits_that_allow_no_choice_are_refused(fill, settings):
    with pytest.raises(ValueError, match="NaN" if np.isnan(fill) else "-inf"):
        Sampler(**settings).sample(np.full(8, fill, np.float32))


def test_one_nan_logit_is_refused_and_an_inf_one_is_certain():
    logits = np.zeros(8, np.float32)
    logits[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Sampler().sample(logits)
    logits[5] = np.inf
    assert Sampler(temperature=1.0, top_k=0, seed=1).sample(logits) == 5
    logits[:5] = -np.inf
    assert Sampler(temperature=1.0, top_k=0, seed=1).sample(logits) == 5
