"""CellTable: worked examples from llama.cpp's rules, and every error row of docs/api.md.

The random comparison against the plain reference model is in
test_cells_state_machine.py.
"""
import copy
import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcells
from kvcells import CacheFullError, CellTable, KVCellsError, StateError

INF = float("-inf")


def fill(t, seq, positions, cont=False):
    idxs = t.find_slot(len(positions), cont=cont)
    t.apply_ubatch(idxs, positions, [seq] * len(positions))
    return idxs


# ---------------------------------------------------------------- placement


def test_empty_table_fills_from_zero_and_head_follows():
    t = CellTable(8)
    assert (t.used, t.head, t.used_max_p1) == (0, 0, 0)
    assert list(fill(t, 0, [0, 1, 2])) == [0, 1, 2]
    assert (t.used, t.head, t.used_max_p1) == (3, 3, 3)
    assert [t.pos(i) for i in range(4)] == [0, 1, 2, -1]
    assert t.seqs(1) == frozenset({0}) and t.seqs(3) == frozenset()
    assert (t.seq_pos_min(0), t.seq_pos_max(0)) == (0, 2)
    t.check()


def test_find_slot_is_a_pure_query():
    t = CellTable(8)
    fill(t, 0, [0, 1])
    before = t.to_bytes()
    assert list(t.find_slot(3)) == [2, 3, 4]
    assert t.to_bytes() == before


def test_search_wraps_around_like_a_ring():
    t = CellTable(6)
    fill(t, 0, [0, 1, 2, 3, 4, 5])
    t.seq_rm(0, 0, 2)  # frees cells 0 and 1, head -> 0
    assert t.head == 0
    t.apply_ubatch([0], [6], [0])  # head -> 1
    assert list(t.find_slot(1)) == [1]
    t.apply_ubatch([1], [7], [0])
    t.seq_rm(0, 2, 3)  # frees cell 2 but head 2 stays
    t.apply_ubatch([2], [8], [0])
    t.seq_rm(0, 6, 7)  # frees cell 0: head goes back to 0
    assert t.head == 0
    assert list(t.find_slot(1)) == [0]


def test_search_restarts_at_zero_when_head_is_far_beyond_used():
    # head > used + 2 * n_tokens: start from cell 0
    t = CellTable(16)
    t.apply_ubatch([10], [0], [0])
    assert t.head == 11 and t.used == 1
    assert list(t.find_slot(4)) == [0, 1, 2, 3]            # 11 > 1 + 8
    assert list(t.find_slot(5)) == [11, 12, 13, 14, 15]    # 11 == 1 + 10
    assert list(t.find_slot(6)) == [11, 12, 13, 14, 15, 0]


def test_cont_needs_consecutive_cells():
    t = CellTable(8)
    t.apply_ubatch([1, 4], [0, 1], [0, 0])
    t.seq_rm(0, 1, 2)  # cell 4 freed, head -> ... stays 5? no: 4 < 5
    assert t.head == 4
    t.apply_ubatch([4], [1], [0])
    assert list(t.find_slot(3)) == [5, 6, 7]
    t.apply_ubatch([6], [2], [0])
    # from head 7: 7, then wrap: 0 (usable), 1 (used -> break) ...
    assert list(t.find_slot(2)) == [7, 0]
    assert list(t.find_slot(2, cont=True)) == [2, 3]
    with pytest.raises(CacheFullError):
        t.find_slot(4, cont=True)
    assert list(t.find_slot(5)) == [7, 0, 2, 3, 5]


def test_full_cache_raises_and_leaves_the_table_alone():
    t = CellTable(4, 2)
    fill(t, 0, [0, 1, 2])
    before = t.to_bytes()
    with pytest.raises(CacheFullError):
        t.find_slot(2)
    with pytest.raises(CacheFullError):
        t.find_slot(5)
    assert t.to_bytes() == before
    assert issubclass(CacheFullError, KVCellsError)


def test_swa_cells_are_reused_for_the_oldest_positions():
    # standard window 4: with seq_pos_max 5, positions <= 2 are masked for pos 6
    t = CellTable(6, 2, n_swa=4, swa_type="standard")
    fill(t, 0, [0, 1, 2, 3, 4, 5])
    assert list(t.find_slot(3)) == [0, 1, 2]
    with pytest.raises(CacheFullError):
        t.find_slot(4)
    t.apply_ubatch([0], [6], [0])
    assert (t.seq_pos_min(0), t.seq_pos_max(0), t.head) == (1, 6, 1)
    # a cell shared by two sequences is never reused
    t.seq_cp(0, 1, 1, 2)
    assert list(t.find_slot(2)) == [2, 3]


def test_overwriting_purges_older_positions_of_that_sequence():
    t = CellTable(8, 2)
    t.apply_ubatch([0, 1, 2, 3], [0, 1, 2, 3], [0, 0, 0, 0])
    t.apply_ubatch([4], [0], [1])
    # overwrite the cell of seq 0 at pos 2: its positions 0..2 go, 3 stays
    t.apply_ubatch([2], [0], [1])
    assert [t.pos(i) for i in range(5)] == [-1, -1, 0, 3, 0]
    assert t.seqs(2) == frozenset({1})
    assert (t.seq_pos_min(0), t.seq_pos_max(0)) == (3, 3)
    idxs, pos = t.seq_cells(1)
    assert list(idxs) == [2, 4] and list(pos) == [0, 0]
    assert t.head == 3
    t.check()


def test_multi_sequence_tokens():
    t = CellTable(4, 3)
    t.apply_ubatch(np.array([0, 1], np.int32), np.array([0, 1], np.int32), [[0, 2], {1}])
    assert t.seqs(0) == frozenset({0, 2}) and t.seqs(1) == frozenset({1})
    idxs, pos = t.seq_cells(2)
    assert list(idxs) == [0] and list(pos) == [0]
    mins, maxs = t.seq_pos_bounds()
    assert list(mins) == [0, 1, 0] and list(maxs) == [0, 1, 0]
    assert t.occupancy() == "M1.."


# ---------------------------------------------------------------- sequence operations


def test_seq_rm_cp_keep():
    t = CellTable(6, 3)
    fill(t, 0, [0, 1, 2, 3])
    t.seq_cp(0, 1, 1, 3)
    assert t.occupancy() == "0MM0.."
    assert t.seq_rm(0, 2) is True  # p1 = -1: to infinity
    assert t.occupancy() == "0M1..."
    assert t.head == 3
    t.seq_rm(-1, 1, 2)  # every sequence
    assert t.occupancy() == "0.1..."
    assert t.head == 1
    t.seq_cp(1, 2)
    t.seq_keep(2)
    assert t.occupancy() == "..2..."
    assert t.head == 0


def test_seq_add_shifts_frees_and_sets_head():
    t = CellTable(6)
    fill(t, 0, [0, 1, 2, 3, 4])
    t.seq_add(0, 2, -1, -3)  # 2,3,4 -> -1,0,1: cell 2 is freed
    assert list(t.positions()) == [0, 1, -1, 0, 1, -1]
    assert t.head == 2 and t.has_shift
    assert list(t.take_shifts()) == [0, 0, 0, -3, -3, 0]
    assert not t.has_shift and not t.take_shifts().any()
    t.seq_add(0, 0, 1, 5)  # nothing freed: head -> 0
    assert t.head == 0 and list(t.positions()) == [5, 1, -1, 5, 1, -1]


def test_seq_div_records_how_far_positions_moved():
    t = CellTable(4)
    fill(t, 0, [0, 3, 7, 9])
    t.seq_div(0, 1, 9, 2)
    assert list(t.positions()) == [0, 1, 3, 9]
    assert list(t.take_shifts()) == [0, -2, -4, 0]


def test_seq_add_and_div_no_ops_keep_head():
    t = CellTable(4)
    fill(t, 0, [0, 1])
    t.seq_add(0, 0, -1, 0)
    t.seq_add(0, 3, 3, 5)
    t.seq_div(0, 0, -1, 1)
    assert t.head == 2 and not t.has_shift


def test_defrag_moves_last_cells_into_first_holes():
    t = CellTable(8, 2)
    t.apply_ubatch([0, 2, 3, 5, 7], [0, 1, 2, 3, 4], [0, 0, [0, 1], 0, 1])
    moves = t.defrag()
    assert moves.dtype == np.int32 and moves.tolist() == [[7, 1], [5, 4]]
    assert list(t.positions()) == [0, 4, 1, 2, 3, -1, -1, -1]
    assert t.seqs(1) == frozenset({1}) and t.seqs(3) == frozenset({0, 1})
    assert (t.head, t.used_max_p1) == (5, 5)
    idxs, pos = t.seq_cells(0)
    assert list(idxs) == [0, 2, 3, 4] and list(pos) == [0, 1, 2, 3]
    assert t.defrag().shape == (0, 2)
    t.check()


# ---------------------------------------------------------------- kq_mask


@pytest.mark.parametrize("swa_type,n_swa,visible", [
    ("none", 0, [0, 1, 2, 3, 4, 5]),
    ("standard", 3, [3, 4, 5]),        # p1 - p0 < 3
    ("chunked", 4, [4, 5]),            # chunk of 5 starts at 4
    ("symmetric", 4, [3, 4, 5]),       # |p1 - p0| <= 2, and causal
])
def test_kq_mask_swa_types(swa_type, n_swa, visible):
    t = CellTable(8, 2, n_swa=n_swa, swa_type=swa_type)
    fill(t, 0, [0, 1, 2, 3, 4, 5, 6])
    t.apply_ubatch([7], [0], [1])
    m = t.kq_mask([5, 0], [[0, 1], 1], 8)
    assert m.dtype == np.float32 and m.shape == (2, 8)
    assert [j for j in range(8) if m[0, j] == 0.0] == visible
    assert (m[0] == 0.0).sum() + (m[0] == INF).sum() == 8
    assert [j for j in range(8) if m[1, j] == 0.0] == [7]
    assert t.kq_mask([5], [0], 4).shape == (1, 4)


# ---------------------------------------------------------------- state


def test_to_bytes_round_trip_is_exact():
    t = CellTable(10, 70, n_swa=3, swa_type="chunked")
    t.apply_ubatch([1, 2, 6], [0, 1, 2], [[0, 69], 65, 3])
    t.seq_add(65, 0, -1, 4)
    b = t.to_bytes()
    u = CellTable.from_bytes(b)
    u.check()
    assert u.to_bytes() == b
    assert (u.n_cells, u.n_seq_max, u.n_swa, u.swa_type) == (10, 70, 3, "chunked")
    assert (u.head, u.used, u.has_shift) == (t.head, t.used, True)
    assert list(u.take_shifts()) == list(t.take_shifts())
    assert pickle.loads(pickle.dumps(u)).to_bytes() == u.to_bytes()
    c = copy.deepcopy(u)
    assert c.to_bytes() == u.to_bytes()
    d = u.copy()
    d.seq_rm(-1)
    d.check()
    assert u.used == 3 and d.used == 0


def fnv1a(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) % 2**64
    return h


def reseal(body):
    return body + struct.pack("<Q", fnv1a(body))


def test_corrupt_states_raise_state_error():
    t = CellTable(4, 2)
    t.apply_ubatch([0, 1], [0, 1], [0, 1])
    good = t.to_bytes()
    body = good[:-8]
    assert reseal(body) == good  # the format is as docs/cells.md describes
    cell1 = 32 + 16  # cell 1: pos, shift, one word of sequence bits
    bad = [
        b"",
        good[:-1],
        good + b"\0",
        b"XXXX" + good[4:],
        good[:40] + bytes([good[40] ^ 1]) + good[41:],                      # checksum
        reseal(body[:4] + struct.pack("<I", 2) + body[8:]),                 # version
        reseal(body[:8] + struct.pack("<i", 0) + body[12:]),                # n_cells
        reseal(body[:12] + struct.pack("<i", 300) + body[16:]),             # n_seq_max
        reseal(body[:20] + struct.pack("<i", 7) + body[24:]),               # swa_type
        reseal(body[:24] + struct.pack("<i", 5) + body[28:]),               # head
        reseal(body[:28] + struct.pack("<i", 2) + body[32:]),               # has_shift
        reseal(body[:cell1] + struct.pack("<i", -2) + body[cell1 + 4:]),    # pos < -1
        reseal(body[:cell1 + 4] + struct.pack("<i", 1) + body[cell1 + 8:]),  # shift, flag off
        reseal(body[:cell1 + 8] + struct.pack("<Q", 4) + body[cell1 + 16:]),  # seq 2 >= n_seq_max
        reseal(body[:cell1 + 8] + struct.pack("<Q", 0) + body[cell1 + 16:]),  # used, no sequence
        reseal(body[:cell1 + 64] + struct.pack("<Q", 1) + body[cell1 + 72:]),  # empty cell 3 with a seq
    ]
    for b in bad:
        with pytest.raises(StateError):
            CellTable.from_bytes(b)
    for b in ["text", 12, None]:
        with pytest.raises(StateError):
            CellTable.from_bytes(b)
    assert issubclass(StateError, ValueError)



def test_checksum_alone_refuses_a_valid_looking_change():
    """A change every other check accepts (cell 1 also in sequence 0, and at
    position 5): refused with the old checksum, loaded once resealed."""
    t = CellTable(4, 2)
    t.apply_ubatch([0, 1], [0, 1], [0, 1])
    body = t.to_bytes()[:-8]
    cell1 = 32 + 16
    changed = body[:cell1] + struct.pack("<i", 5) + body[cell1 + 4:cell1 + 8] + \
        struct.pack("<Q", 3) + body[cell1 + 16:]
    with pytest.raises(StateError, match="checksum"):
        CellTable.from_bytes(changed + t.to_bytes()[-8:])
    u = CellTable.from_bytes(reseal(changed))
    assert (u.pos(1), u.seqs(1)) == (5, {0, 1})


# ---------------------------------------------------------------- error rows


def busy_table():
    t = CellTable(8, 3, n_swa=2, swa_type="standard")
    t.apply_ubatch([0, 1, 2, 3], [0, 1, 2, 3], [0, [0, 1], 1, 2])
    t.seq_add(2, 0, -1, 1)
    return t


def unchanged(call, exc=ValueError):
    t = busy_table()
    before = t.to_bytes()
    with pytest.raises(exc):
        call(t)
    assert t.to_bytes() == before
    t.check()


@pytest.mark.parametrize("kwargs", [
    dict(n_cells=0), dict(n_cells=-1), dict(n_cells=2**40), dict(n_cells=1.5),
    dict(n_cells=4, n_seq_max=0), dict(n_cells=4, n_seq_max=257),
    dict(n_cells=4, swa_type="sliding"), dict(n_cells=4, n_swa=-1),
    dict(n_cells=4, n_swa=0, swa_type="standard"), dict(n_cells=4, n_swa=0, swa_type="chunked"),
])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        CellTable(**kwargs)


BAD_CALLS = {
    "seq_rm seq -2": lambda t: t.seq_rm(-2),
    "seq_rm seq n_seq_max": lambda t: t.seq_rm(3),
    "seq_cp src": lambda t: t.seq_cp(3, 0),
    "seq_cp dst": lambda t: t.seq_cp(0, -1),
    "seq_keep": lambda t: t.seq_keep(-1),
    "seq_add seq": lambda t: t.seq_add(5, 0, -1, 1),
    "seq_add overflow": lambda t: t.seq_add(0, 0, -1, 2**31 - 1),
    "seq_add p0 not int32": lambda t: t.seq_add(0, 2**40, -1, 1),
    "seq_div seq": lambda t: t.seq_div(-1, 0, -1, 2),
    "seq_div by zero": lambda t: t.seq_div(0, 0, -1, 0),
    "seq_div negative": lambda t: t.seq_div(0, 0, -1, -2),
    "seq_pos_min": lambda t: t.seq_pos_min(3),
    "seq_pos_max": lambda t: t.seq_pos_max(-1),
    "seq_cells": lambda t: t.seq_cells(99),
    "pos index": lambda t: t.pos(8),
    "seqs index": lambda t: t.seqs(-1),
    "find_slot zero": lambda t: t.find_slot(0),
    "find_slot negative": lambda t: t.find_slot(-3),
    "find_slot float": lambda t: t.find_slot(2.0),
    "apply lengths": lambda t: t.apply_ubatch([4, 5], [4], [0, 0]),
    "apply seq lengths": lambda t: t.apply_ubatch([4, 5], [4, 5], [0]),
    "apply empty": lambda t: t.apply_ubatch([], [], []),
    "apply duplicate cell": lambda t: t.apply_ubatch([4, 5, 4], [4, 5, 6], [0, 0, 0]),
    "apply cell range": lambda t: t.apply_ubatch([4, 8], [4, 5], [0, 0]),
    "apply negative cell": lambda t: t.apply_ubatch([4, -1], [4, 5], [0, 0]),
    "apply shared cell": lambda t: t.apply_ubatch([4, 1], [4, 5], [0, 0]),
    "apply negative pos": lambda t: t.apply_ubatch([4, 5], [4, -1], [0, 0]),
    "apply seq range": lambda t: t.apply_ubatch([4, 5], [4, 5], [0, 3]),
    "apply seq range multi": lambda t: t.apply_ubatch([4, 5], [4, 5], [[0], [1, 3]]),
    "apply no seq": lambda t: t.apply_ubatch([4, 5], [4, 5], [[0], []]),
    "apply seq twice": lambda t: t.apply_ubatch([4, 5], [4, 5], [[0], [1, 1]]),
    "apply float pos": lambda t: t.apply_ubatch([4], np.array([4.0]), [0]),
    "apply 2-D idxs": lambda t: t.apply_ubatch([[4]], [4], [0]),
    "apply pos not int32": lambda t: t.apply_ubatch([4], [2**33], [0]),
    "apply seq not iterable": lambda t: t.apply_ubatch([4, 5], [4, 5], [[0], 1.5]),
    "visible seq": lambda t: t.visible([1], [3], 8, *buffers(1)),
    "visible pos": lambda t: t.visible([-1], [0], 8, *buffers(1)),
    "visible lengths": lambda t: t.visible([1, 2], [0], 8, *buffers(2)),
    "visible segment": lambda t: t.visible([1], [0], 0, *buffers(1)),
    "visible short lo": lambda t: t.visible([1, 2], [0, 0], 8, *buffers(1)),
    "visible float cells": lambda t: t.visible([1], [0], 8, np.zeros(99, np.float32),
                                               *buffers(1)[1:]),
    "visible read-only": lambda t: t.visible([1], [0], 8, *read_only(buffers(1))),
    "kq_mask n_kv": lambda t: t.kq_mask([1], [0], 9),
    "kq_mask negative n_kv": lambda t: t.kq_mask([1], [0], -1),
    "kq_mask seq": lambda t: t.kq_mask([1], [3], 8),
    "kq_mask pos": lambda t: t.kq_mask([-1], [0], 8),
    "kq_mask lengths": lambda t: t.kq_mask([1, 2], [0], 8),
    "kq_mask no seq": lambda t: t.kq_mask([1], [[]], 8),
    "occupancy width": lambda t: t.occupancy(0),
}


def buffers(n, room=99):
    return np.zeros(room, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)


def read_only(arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_arguments_raise_value_error_and_change_nothing(name):
    unchanged(BAD_CALLS[name])


@pytest.mark.parametrize("name", sorted(k for k in BAD_CALLS if k.startswith("apply")))
def test_check_ubatch_refuses_what_apply_ubatch_refuses(name):
    unchanged(lambda t: BAD_CALLS[name](CheckOnly(t)))


class CheckOnly:
    """A table whose apply_ubatch only checks."""

    def __init__(self, t):
        self.apply_ubatch = t.check_ubatch


def test_cache_full_changes_nothing():
    def full(t):
        t.find_slot(6)  # 4 empty cells and cell 0, whose position the window masks
    unchanged(full, CacheFullError)


def test_check_passes_on_a_busy_table():
    t = busy_table()
    t.check()
    t.defrag()
    t.check()
    t.clear()
    t.check()
    assert (t.used, t.head, t.used_max_p1, t.has_shift) == (0, 0, 0, False)


def test_exported_from_package():
    assert kvcells.CellTable is CellTable


@pytest.mark.parametrize("call", [
    lambda: CellTable(8, 2).kq_mask([0], [[0, 99]], 4),       # an invalid second sequence
    lambda: CellTable(8, 2, n_swa=2, swa_type=[]),
    lambda: CellTable(True),
    lambda: CellTable(8, 2).apply_ubatch([0], [0], None),
    lambda: CellTable(8, 2).apply_ubatch([0], [0], [True]),
    lambda: CellTable(8, 2).apply_ubatch([0, 1], [0, 1], [1, True]),
    lambda: CellTable(8, 2).seq_rm(False),
])
def test_wrong_kinds_of_argument_are_value_errors(call):
    with pytest.raises(ValueError):
        call()



# ---------------------------------------------------------------- what a ubatch attends


def visible_in_numpy(t, pos, first, segment):
    """The list and ranges of CellTable.visible, from seq_cells and kq_mask:
    per first sequence in ascending order, cell-0 padding that puts the
    sequence's lowest position at an index = its position modulo segment,
    then its cells by position; a token's range: the run of its sequence's
    cells that kq_mask lets it see (which must be one run, ending at its
    position)."""
    mask = t.kq_mask(pos, first, t.n_cells) == 0
    lo, hi = np.zeros(len(pos), np.int64), np.zeros(len(pos), np.int64)
    cells = []
    for s in sorted(set(first)):
        idxs, cpos = t.seq_cells(s)
        if len(cpos):
            cells += [0] * ((int(cpos[0]) - len(cells)) % segment)
        for i in np.flatnonzero(np.asarray(first) == s):
            seen = np.flatnonzero(mask[i, idxs])
            end = np.searchsorted(cpos, pos[i], side="right")
            assert np.array_equal(seen, np.arange(end - len(seen), end))
            lo[i], hi[i] = len(cells) + end - len(seen), len(cells) + end
        cells += list(idxs)
    return np.array(cells, np.int64), lo, hi


@st.composite
def tables_and_ubatches(draw):
    """A table after random ubatches (several sequences per token at
    times), removals and shifts (gapped positions), and a ubatch of tokens
    to ask about, some at positions their sequence does not hold."""
    swa_type = draw(st.sampled_from(["none", "standard", "chunked", "symmetric"]))
    n_swa = draw(st.integers(1, 12)) if swa_type != "none" else 0
    n_seq = draw(st.integers(1, 4))
    t = CellTable(draw(st.integers(4, 40)), n_seq, n_swa=n_swa, swa_type=swa_type)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["add", "add", "rm", "shift"]))
        s = draw(st.integers(0, n_seq - 1))
        if op == "add":
            n = draw(st.integers(1, 6))
            seqs = [draw(st.lists(st.integers(0, n_seq - 1), min_size=1, max_size=n_seq,
                                  unique=True)) for _ in range(n)]
            start = draw(st.integers(0, 30))
            try:
                t.apply_ubatch(t.find_slot(n), np.arange(start, start + n), seqs)
            except CacheFullError:
                pass
        elif op == "rm":
            p0 = draw(st.integers(0, 30))
            t.seq_rm(s, p0, p0 + draw(st.integers(1, 5)))
        else:
            t.seq_add(s, draw(st.integers(0, 20)), -1, draw(st.integers(-5, 9)))
    n = draw(st.integers(1, 8))
    pos = draw(st.lists(st.integers(0, 45), min_size=n, max_size=n))
    first = draw(st.lists(st.integers(0, n_seq - 1), min_size=n, max_size=n))
    return t, pos, first, draw(st.sampled_from([1, 3, 8, 2048]))


@settings(max_examples=300, deadline=None)
@given(tables_and_ubatches())
def test_visible_equals_a_numpy_recomputation(case):
    t, pos, first, segment = case
    before = t.to_bytes()
    want_cells, want_lo, want_hi = visible_in_numpy(t, pos, first, segment)
    cells, lo, hi = buffers(len(pos), t.n_seq_max * (t.n_cells + segment - 1))
    n = t.visible(pos, first, segment, cells, lo, hi)
    assert n == len(want_cells)
    assert np.array_equal(cells[:n], want_cells)
    assert np.array_equal(lo, want_lo) and np.array_equal(hi, want_hi)
    assert t.to_bytes() == before
    # exactly the room it needs is enough; with one entry less it writes nothing
    exact = np.zeros(n, np.int32)
    assert t.visible(pos, first, segment, exact, lo, hi) == n and np.array_equal(exact, cells[:n])
    if n:
        short, lo2, hi2 = buffers(len(pos), n - 1)
        assert t.visible(pos, first, segment, short, lo2, hi2) == n
        assert not short.any() and not lo2.any() and not hi2.any()


@settings(max_examples=200, deadline=None)
@given(tables_and_ubatches(), st.data())
def test_check_ubatch_accepts_exactly_what_apply_ubatch_applies(case, data):
    t, pos, first, _ = case
    idxs = data.draw(st.lists(st.integers(0, t.n_cells - 1), min_size=len(pos),
                              max_size=len(pos)))
    before = t.to_bytes()
    ok = succeeds(t.check_ubatch, idxs, pos, first)
    assert t.to_bytes() == before
    applied = succeeds(t.apply_ubatch, idxs, pos, first)
    assert ok == applied
    if not applied:
        assert t.to_bytes() == before


def succeeds(call, *args):
    try:
        call(*args)
    except ValueError:
        return False
    return True
