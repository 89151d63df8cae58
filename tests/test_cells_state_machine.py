"""CellTable against the plain reference model, driven by hypothesis.

Random placement (find_slot + apply_ubatch, one or several sequences per
token, cont both ways), writes anywhere, sequence operations, shifts,
defrag, clear, copies and byte round trips, on tiny tables (full-cache paths,
wraparound) with every SWA type and n_seq_max from 1 to 256. After every step
all observables are compared and check() is called.

Weighted to run tables near full: a run starts with the table half to
wholly full, `place` puts up to three ubatches per step, `decode_step` the
next token of every sequence, `prompts` one ubatch of several sequences'
prompts opening with shared tokens. The rules that empty whole tables run
only on full (clear) or fuller tables: clear only on a full table, which it
checks empty and fills again; seq_keep on a table three quarters full,
mostly keeping a sequence it holds; seq_rm of every sequence on a half-full
one. Hypothesis turns rules off at random in each run (swarm testing), so
the several placing rules also keep a run that lost one of them filled.
Each run reports its mean occupancy, its share of steps on an empty table,
whether cells were shared and whether the search wrapped around the ring
(pytest --hypothesis-show-statistics; figures in docs/testing.md).

KVCELLS_HYPOTHESIS=long explores far more.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from cells_reference import INT32_MAX, RefCells
from kvcells import CacheFullError, CellTable

LONG = os.environ.get("KVCELLS_HYPOTHESIS") == "long"

SWA = st.one_of(
    st.just(("none", 0)),
    st.tuples(st.sampled_from(["standard", "chunked", "symmetric"]), st.integers(1, 10)),
)
N_CELLS = st.one_of(st.integers(1, 8), st.integers(9, 40))
N_SEQ_MAX = st.one_of(st.integers(1, 4), st.sampled_from([63, 64, 65, 130, 256]))
OFFSET = st.integers(0, 40)
BASES = st.sampled_from([0, INT32_MAX - 47])  # small positions, or up against int32's end
FILL = st.integers(50, 100)  # percent of the cells placed when a run starts or after a clear


class CellTableMachine(RuleBasedStateMachine):
    @initialize(n_cells=N_CELLS, n_seq_max=N_SEQ_MAX, swa=SWA, base=BASES, data=st.data())
    def create(self, n_cells, n_seq_max, swa, base, data):
        swa_type, n_swa = swa
        self.base = base
        self.t = CellTable(n_cells, n_seq_max, n_swa=n_swa, swa_type=swa_type)
        self.ref = RefCells(n_cells, n_seq_max, n_swa, swa_type)
        self.steps, self.empty_steps, self.occupancy, self.wrapped = 0, 0, 0.0, False
        self.fill(data)

    def fill(self, data):
        """Place ubatches until the table is a drawn fraction (half or more) full."""
        fill = data.draw(FILL)
        while 100 * self.ref.used < fill * self.ref.n_cells and self.place_one(data, False):
            pass

    def pos(self, data):
        return self.base + data.draw(OFFSET)

    def bound(self, data):
        """a range end; -1 means open"""
        return data.draw(st.one_of(st.just(-1), OFFSET.map(lambda x: self.base + x)))

    def seq(self, data):
        n = self.ref.n_seq_max
        return data.draw(st.one_of(st.integers(0, min(n, 3) - 1), st.integers(0, n - 1)))

    def seq_list(self, data):
        if data.draw(st.integers(0, 3)):
            return [self.seq(data)]
        return sorted({self.seq(data) for _ in range(data.draw(st.integers(1, 3)))})

    def ubatch(self, data, n_tokens):
        """positions and sequence lists for n_tokens, mostly each sequence's next positions."""
        seqs = [self.seq_list(data) for _ in range(n_tokens)]
        if data.draw(st.integers(0, 3)) == 0:
            return [self.pos(data) for _ in seqs], seqs
        nxt, pos = {}, []
        for token in seqs:
            p = max(nxt.get(s, max(self.ref.seq_pos_max(s) + 1, self.base)) for s in token)
            if p > INT32_MAX:
                p = self.pos(data)
            pos.append(p)
            nxt.update((s, p + 1) for s in token)
        return pos, seqs

    def apply_both(self, data, idxs, pos, seqs):
        self.ref.apply_ubatch(idxs, pos, seqs)
        form = data.draw(st.sampled_from(["numpy", "lists", "iterables"]))
        if all(len(s) == 1 for s in seqs) and form != "iterables":
            flat = [s[0] for s in seqs]
            if form == "numpy":
                self.t.apply_ubatch(np.array(idxs, np.int32), np.array(pos, np.int64),
                                    np.array(flat, np.int32))
            else:
                self.t.apply_ubatch(list(idxs), pos, flat)
        else:
            self.t.apply_ubatch(idxs, pos, [tuple(s) for s in seqs])

    # ------------------------------------------------------------ placement

    def find_slot(self, n_tokens, cont):
        """the C table's find_slot, checked against the reference; None when full."""
        want = self.ref.find_slot(n_tokens, cont)
        if want is None:
            before = self.t.to_bytes()
            with pytest.raises(CacheFullError):
                self.t.find_slot(n_tokens, cont=cont)
            assert self.t.to_bytes() == before
            return None
        assert self.t.find_slot(n_tokens, cont=cont).tolist() == want
        self.wrapped |= want[0] < self.ref.head or want != sorted(want)
        return want

    def place_one(self, data, cont):
        """find_slot and apply one ubatch; False when the table is full."""
        n_tokens = data.draw(st.integers(1, min(self.ref.n_cells, 12) + 1))
        idxs = self.find_slot(n_tokens, cont)
        if idxs is None:
            return False
        pos, seqs = self.ubatch(data, n_tokens)
        self.apply_both(data, idxs, pos, seqs)
        return True

    @rule(data=st.data(), cont=st.booleans(), n_ubatches=st.integers(1, 3))
    def place(self, data, cont, n_ubatches):
        for _ in range(n_ubatches):
            if not self.place_one(data, cont):
                return

    @rule(data=st.data())
    def decode_step(self, data):
        """One token for each sequence in the table, at its next position."""
        active = sorted({s for seqs in self.ref.seq for s in seqs})[:12]
        nxt = [self.ref.seq_pos_max(s) + 1 for s in active]
        if not active or max(nxt) > INT32_MAX:
            return
        idxs = self.find_slot(len(active), False)
        if idxs is not None:
            self.apply_both(data, idxs, nxt, [[s] for s in active])

    @rule(data=st.data(), cont=st.booleans())
    def prompts(self, data, cont):
        """One ubatch of several sequences' prompts, opening with tokens they all share."""
        group = sorted({self.seq(data) for _ in range(data.draw(st.integers(1, 4)))})
        start = max(max(self.ref.seq_pos_max(s) + 1, self.base) for s in group)
        n_shared = data.draw(st.integers(0, 3))
        pos, seqs = list(range(start, start + n_shared)), [group] * n_shared
        for s in group:
            n = data.draw(st.integers(1, 3))
            pos += range(start + n_shared, start + n_shared + n)
            seqs += [[s]] * n
        pos, seqs = pos[:self.ref.n_cells], seqs[:self.ref.n_cells]
        if max(pos) > INT32_MAX:
            return
        idxs = self.find_slot(len(pos), cont)
        if idxs is not None:
            self.apply_both(data, idxs, pos, seqs)

    @rule(data=st.data())
    def write_anywhere(self, data):
        r = self.ref
        free = [i for i in range(r.n_cells) if len(r.seq[i]) <= 1]
        if not free:
            return
        idxs = data.draw(st.lists(st.sampled_from(free), min_size=1, max_size=6, unique=True))
        pos, seqs = self.ubatch(data, len(idxs))
        self.apply_both(data, idxs, pos, seqs)

    # ------------------------------------------------------------ sequence operations

    @rule(data=st.data())
    def seq_rm(self, data):
        p0, p1 = self.bound(data), self.bound(data)
        s = -1 if data.draw(st.integers(0, 5)) == 0 and 2 * self.ref.used >= self.ref.n_cells \
            else self.seq(data)
        assert self.t.seq_rm(s, p0, p1) is True
        self.ref.seq_rm(s, p0, p1)

    @rule(data=st.data())
    def seq_cp(self, data):
        p0, p1 = self.bound(data), self.bound(data)
        src, dst = self.seq(data), self.seq(data)
        self.t.seq_cp(src, dst, p0, p1)
        self.ref.seq_cp(src, dst, p0, p1)

    @precondition(lambda self: 4 * self.ref.used >= 3 * self.ref.n_cells)
    @rule(data=st.data())
    def seq_keep(self, data):
        held = sorted(set().union(*self.ref.seq))
        s = data.draw(st.sampled_from(held)) if data.draw(st.integers(0, 3)) else self.seq(data)
        self.t.seq_keep(s)
        self.ref.seq_keep(s)

    @rule(data=st.data(), delta=st.integers(-20, 20))
    def seq_add(self, data, delta):
        p0, p1, s = self.bound(data), self.bound(data), self.seq(data)
        lo, hi = max(p0, 0), (INT32_MAX + 1 if p1 < 0 else p1)
        if lo != hi and any(lo <= p < hi and p + delta > INT32_MAX for _, p in self.ref.seq_cells(s)):
            before = self.t.to_bytes()
            with pytest.raises(ValueError):
                self.t.seq_add(s, p0, p1, delta)
            assert self.t.to_bytes() == before
            return
        self.t.seq_add(s, p0, p1, delta)
        self.ref.seq_add(s, p0, p1, delta)

    @rule(data=st.data(), d=st.integers(1, 4))
    def seq_div(self, data, d):
        p0, p1, s = self.bound(data), self.bound(data), self.seq(data)
        self.t.seq_div(s, p0, p1, d)
        self.ref.seq_div(s, p0, p1, d)

    # ------------------------------------------------------------ maintenance

    @rule()
    def take_shifts(self):
        assert self.t.take_shifts().tolist() == self.ref.take_shifts()

    @rule()
    def defrag(self):
        assert self.t.defrag().tolist() == [list(m) for m in self.ref.defrag()]

    @precondition(lambda self: self.ref.used == self.ref.n_cells)
    @rule(data=st.data())
    def clear(self, data):
        """Clear a full table, check it empty, and fill it again as a new run would."""
        self.t.clear()
        self.ref.clear()
        self.compare()
        self.fill(data)

    @rule()
    def round_trip(self):
        b = self.t.to_bytes()
        self.t = CellTable.from_bytes(b)
        assert self.t.to_bytes() == b

    @rule()
    def copy(self):
        old = self.t
        self.t = old.copy()
        old.clear()  # the copy shares nothing with it

    @rule(data=st.data())
    def kq_mask(self, data):
        n_tokens = data.draw(st.integers(0, 4))
        pos = [self.pos(data) for _ in range(n_tokens)]
        seqs = [self.seq_list(data) for _ in range(n_tokens)]
        n_kv = data.draw(st.integers(0, self.ref.n_cells))
        self.compare_mask(pos, seqs, n_kv)

    @rule(data=st.data())
    def bad_call_changes_nothing(self, data):
        r, t = self.ref, self.t
        shared = [i for i in range(r.n_cells) if len(r.seq[i]) > 1]
        reached = max((p for _, p in r.seq_cells(0)), default=-1)
        calls = [
            lambda: t.seq_rm(r.n_seq_max),
            lambda: t.seq_cp(0, -1),
            lambda: t.seq_add(0, 0, -1, 2**31 - 1) if reached >= 1 else t.seq_keep(-1),
            lambda: t.seq_div(0, 0, -1, 0),
            lambda: t.apply_ubatch([0, 0], [1, 2], [0, 0]),
            lambda: t.apply_ubatch([r.n_cells - 1, r.n_cells], [0, 1], [0, 0]),
            lambda: t.apply_ubatch([shared[0] if shared else -1], [0], [0]),
            lambda: t.apply_ubatch([0], [0], [[0, 0]]),
            lambda: t.kq_mask([0], [0], r.n_cells + 1),
            lambda: t.find_slot(0),
        ]
        before = t.to_bytes()
        with pytest.raises(ValueError):
            data.draw(st.sampled_from(calls))()
        assert t.to_bytes() == before

    # ------------------------------------------------------------ comparison

    def compare_mask(self, pos, seqs, n_kv):
        got = self.t.kq_mask(pos, seqs, n_kv)
        want = self.ref.kq_mask(pos, [s[0] for s in seqs], n_kv)
        assert got.shape == (len(pos), n_kv)
        assert ((got == 0.0) == np.array(want, bool).reshape(len(pos), n_kv)).all()
        assert np.isin(got, [0.0, -np.inf]).all()

    @invariant()
    def same_as_reference(self):
        self.compare()
        r = self.ref
        self.steps += 1
        self.empty_steps += r.used == 0
        self.occupancy += r.used / r.n_cells
        self.shared = getattr(self, "shared", False) or any(len(s) > 1 for s in r.seq)

    def compare(self):
        """every observable of the C table against the reference, and check()."""
        t, r = self.t, self.ref
        assert t.positions().tolist() == r.pos
        held = np.zeros((r.n_cells, r.n_seq_max), bool)
        for i, seqs in enumerate(r.seq):
            held[i, list(seqs)] = True
        assert (t.seq_matrix() == held).all()
        assert (t.used, t.head, t.used_max_p1, t.has_shift) == (
            r.used, r.head, r.used_max_p1, r.has_shift)
        mins, maxs = t.seq_pos_bounds()
        active = np.flatnonzero(held.any(axis=0)).tolist()
        for s in range(r.n_seq_max):
            if s not in active:
                assert mins[s] == maxs[s] == -1
        for s in set(active) | {0, r.n_seq_max - 1}:
            assert (mins[s], maxs[s]) == (r.seq_pos_min(s), r.seq_pos_max(s))
            assert (t.seq_pos_min(s), t.seq_pos_max(s)) == (mins[s], maxs[s])
            idxs, pos = t.seq_cells(s)
            assert list(zip(idxs.tolist(), pos.tolist())) == r.seq_cells(s)
        if active:
            pos = [min(r.seq_pos_max(s) + k, INT32_MAX) for s in active for k in (0, 1)]
            self.compare_mask(pos, [[s] for s in active for k in (0, 1)], r.n_cells)
        t.check()

    def teardown(self):
        if not getattr(self, "steps", 0):
            return
        bucket = lambda x: f"{min(int(x * 4), 3) * 25}-{min(int(x * 4), 3) * 25 + 25}%"  # noqa: E731
        event(f"mean occupancy {bucket(self.occupancy / self.steps)}")
        event(f"steps on an empty table {bucket(self.empty_steps / self.steps)}")
        event(f"{min(self.steps // 10, 5) * 10}+ steps")
        if self.shared:
            event("cells shared by several sequences")
        if self.wrapped:
            event("the search wrapped around the ring")


CellTableMachine.TestCase.settings = settings(
    max_examples=4000 if LONG else 400,
    stateful_step_count=80 if LONG else 50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
TestCellTable = CellTableMachine.TestCase
