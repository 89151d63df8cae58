"""Prompt-lookup drafts (kvcells.lookup) against a brute-force search of the
history, and the draft-length adaptation."""
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcells.lookup import MAX_PAUSE, PromptLookup


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
    lookup.limit = 16
    for piece in pieces:
        history += piece
        assert lookup.draft(k) == brute_force_draft(history, k)


def test_a_repeated_run_is_drafted_up_to_the_limit():
    history = [5, 1, 2, 3, 4, 6, 7, 9, 5, 1, 2]
    lookup = PromptLookup(history)
    assert lookup.draft(100) == [3, 4, 6, 7]        # limit 4 at first
    assert lookup.draft(2) == [3, 4]                 # and never past the room given


def test_the_draft_length_follows_acceptance_and_rejections_pause_drafting():
    history = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 1, 2]
    lookup = PromptLookup(history, max_draft=8)
    assert len(lookup.draft(100)) == 4
    lookup.update(4, 4)
    assert len(lookup.draft(100)) == 8               # doubled, capped at max_draft
    lookup.update(8, 3)
    assert len(lookup.draft(100)) == 3               # shrunk to what was accepted
    pauses = []
    for _ in range(8):
        lookup.update(1, 0)
        n = 0
        while lookup.draft(100) == []:
            n += 1
        pauses.append(n)
    assert pauses == [1, 2, 4, 8, 16, 32, 64, MAX_PAUSE]
    lookup.update(1, 1)                              # an accepted token resets the pause
    lookup.update(2, 0)
    assert lookup.draft(100) == [] and lookup.draft(100) != []
