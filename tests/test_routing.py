import os
import subprocess
import sys

import pytest

from kvcells.routing import KEY_TOKENS, PrefixAffinity, prefix_key


def test_key_depends_on_the_first_tokens_only():
    a = list(range(100, 100 + KEY_TOKENS))
    assert prefix_key(a + [1, 2]) == prefix_key(a + [3])
    assert prefix_key(a[:-1] + [7]) != prefix_key(a)
    assert prefix_key([1, 2]) != prefix_key([1, 2, 3])


def test_key_is_the_same_in_another_process():
    # Python's hash() differs between processes; routers in different
    # processes must agree on keys.
    code = "from kvcells.routing import prefix_key; print(prefix_key([5, 6, 7]).hex())"
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == prefix_key([5, 6, 7]).hex()


def test_new_keys_spread_over_replicas_then_stick():
    pa = PrefixAffinity()
    queues = {"a": 0, "b": 0, "c": 0}
    first = [pa.choose(k, queues)[0] for k in range(6)]
    assert sorted(first) == ["a", "a", "b", "b", "c", "c"]
    for _ in range(3):
        assert [pa.choose(k, queues)[0] for k in range(6)] == first


def test_preference_order_lists_every_replica_once():
    pa = PrefixAffinity()
    order = pa.choose("k", {"a": 3, "b": None, "c": 1, "d": 0})
    assert sorted(order) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("owner_queue, expect_owner", [(4, True), (5, False)])
def test_guard_sends_to_the_least_loaded_past_the_threshold(owner_queue, expect_owner):
    pa = PrefixAffinity(threshold=4)
    owner = pa.choose("k", {"a": 0, "b": 0})[0]
    other = "b" if owner == "a" else "a"
    order = pa.choose("k", {owner: owner_queue, other: 0})
    assert order[0] == (owner if expect_owner else other)
    # the key keeps its owner once the queues even out
    assert pa.choose("k", {owner: 0, other: 0})[0] == owner


def test_unknown_queue_lengths_do_not_trigger_the_guard():
    pa = PrefixAffinity(threshold=0)
    owner = pa.choose("k", {"a": None, "b": None})[0]
    assert pa.choose("k", {"a": None, "b": None})[0] == owner


def test_keys_of_a_dead_replica_move_to_live_ones():
    pa = PrefixAffinity()
    owners = {k: pa.choose(k, {"a": 0, "b": 0})[0] for k in range(4)}
    pa.forget("a")
    for k in range(4):
        assert pa.choose(k, {"b": 0, "c": 0})[0] == (owners[k] if owners[k] == "b" else "c")


def test_the_table_is_bounded():
    pa = PrefixAffinity(max_keys=3)
    for k in range(10):
        pa.choose(k, {"a": 0, "b": 0})
    assert len(pa.owner) == 3 and sum(pa.n_keys.values()) == 3


def test_no_replica_is_an_error():
    with pytest.raises(ValueError):
        PrefixAffinity().choose("k", {})
