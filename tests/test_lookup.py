"""Prompt-lookup drafts (kvcells.lookup) against a brute-force search of the
history, the acceptance estimate against its formula, step times against
hand-computed medians, and the draft plan against a search of every plan."""
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcells.lookup import DECAY, PromptLookup, StepTimes, plan_drafts


def brute_force_draft(h, k, ngram_max=3, ngram_min=2):
    """The tokens after the latest earlier occurrence of the longest suffix n-gram."""
    for n in range(min(ngram_max, len(h)), ngram_min - 1, -1):
        for end in range(len(h) - 2, n - 2, -1):
            if h[end - n + 1:end + 1] == h[-n:]:
                return h[end + 1:end + 1 + k]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=6),
       st.integers(1, 8))
def test_drafts_equal_a_brute_force_search_as_the_history_grows(pieces, k):
    history = []
    lookup = PromptLookup(history, max_draft=16)
    for piece in pieces:
        history += piece
        assert lookup.draft(k) == brute_force_draft(history, k)


def test_a_repeated_run_is_drafted_up_to_the_room_and_max_draft():
    history = [5, 1, 2, 3, 4, 6, 7, 9, 5, 1, 2]
    assert PromptLookup(history).draft(100) == [3, 4, 6, 7, 9, 5, 1, 2]
    assert PromptLookup(history).draft(2) == [3, 4]
    assert PromptLookup(history, max_draft=3).draft(100) == [3, 4, 6]


def test_the_acceptance_estimate_is_the_decayed_share_of_checked_tokens_accepted():
    """Each drafted token checked against the tokens made, up to the first
    difference, is one observation; p = (sum of w * accepted + 1) / (sum of
    w + 2) with w = DECAY ** (newer observations)."""
    lookup = PromptLookup([])
    assert lookup.p == 0.5
    steps = [([4, 5, 6], [4, 5, 9]),     # two accepted, the third rejected
             ([7, 8], [7, 8, 1]),        # both accepted, and the bonus token not drafted
             ([3, 3, 3], [2]),           # not sent: its first token checked against the one made
             ([6], [6]),
             ([], [5])]                  # nothing drafted, nothing checked
    seen = [1, 1, 0, 1, 1, 0, 1]
    for draft, made in steps:
        lookup.update(draft, made)
    w = [DECAY ** (len(seen) - 1 - i) for i in range(len(seen))]
    assert lookup.p == pytest.approx((sum(wi * x for wi, x in zip(w, seen)) + 1) / (sum(w) + 2))


def test_step_times_are_recent_medians_and_the_next_larger_size_timed():
    times = StepTimes()
    assert times(1) == times(7) == 1.0           # nothing timed: every size alike
    for t in (0.10, 0.50, 0.12, 0.11, 0.13, 0.14):
        times.record(1, t)                       # the last 5: 0.50 0.12 0.11 0.13 0.14
    assert times(1) == 0.13
    assert times(2) == 0.13                      # above every size timed: the largest,
    assert times(3) == times(16) == math.inf     # up to twice it, so sizes grow by doubling
    times.record(5, 0.33)
    assert times(3) == times(5) == times(9) == times(10) == 0.33 and times(11) == math.inf
    times.record(9, 0.5)
    times.record(9, 0.6)
    assert times(9) == times(6) == pytest.approx(0.55) and times(5) == 0.33
    assert times(18) == pytest.approx(0.55) and times(19) == math.inf


def expected_rate(n_rows, chances, counts, step_time):
    kept = n_rows + sum(p ** i for p, c in zip(chances, counts) for i in range(1, c + 1))
    return kept / step_time(n_rows + sum(counts))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 4)), max_size=3),
       st.lists(st.floats(0.1, 10), min_size=19, max_size=19), st.integers(0, 13))
def test_the_plan_keeps_the_most_tokens_per_second_of_every_plan(n_rows, drafts, costs, room):
    """Against every count vector: none within the lengths and the room
    keeps more tokens per second than the plan (step times arbitrary, not
    even increasing)."""
    chances, lengths = [p for p, _ in drafts], [n for _, n in drafts]
    step_time = costs.__getitem__
    counts = plan_drafts(n_rows, chances, lengths, step_time, room)
    assert all(0 <= c <= n for c, n in zip(counts, lengths)) and sum(counts) <= room
    best = max(expected_rate(n_rows, chances, c, step_time)
               for c in itertools.product(*(range(n + 1) for n in lengths)) if sum(c) <= room)
    assert expected_rate(n_rows, chances, counts, step_time) == pytest.approx(best, rel=1e-12)


def test_drafts_go_where_they_are_likely_and_stop_where_they_are_not():
    # a row costs a quarter of a one-row step, so a step's i-th drafted token
    # (kept with chance p**i) pays while p**i > 0.25 * the tokens per second
    # the step keeps: 1 / 1 at first, more with every token added
    def step_time(n):
        return 1 + 0.25 * (n - 1)
    assert plan_drafts(1, [0.1], [16], step_time, 16) == [0]     # 0.1 < 0.25
    # 0.6 > 0.25 and 0.36 > 0.25 * 1.6 / 1.25, but 0.216 < 0.25 * 1.96 / 1.5
    assert plan_drafts(1, [0.6], [16], step_time, 16) == [2]
    # 0.9**6 = 0.53 > 0.25 * 4.69 / 2.25, 0.9**7 = 0.48 < 0.25 * 5.22 / 2.5
    assert plan_drafts(1, [0.9], [16], step_time, 16) == [6]
    assert plan_drafts(1, [0.9], [16], step_time, 3) == [3]
    # beside 4 rows: 0.9**4 = 0.66 > 0.25 * 6.44 / 2.5, 0.9**5 = 0.59 < 0.25 *
    # 7.10 / 2.75, and with those the 0.6 token (< 0.25 * 7.10 / 2.75) no longer pays
    assert plan_drafts(4, [0.9, 0.1, 0.6], [8, 8, 8], step_time, 32) == [4, 0, 0]
    assert plan_drafts(1, [1.0], [16], lambda n: 1.0, 16) == [16]   # free rows: all of it
