"""Benchmark of the C cell table against the plain Python reference model.

    python tools/bench_cells.py

(a) one decode step of bookkeeping: 64 sequences, one token each, on 32,768
    cells (16,384 already used): find_slot + apply_ubatch + seq_pos_max of
    every sequence;
(b) ranged seq_cp, seq_rm and seq_pos_max, 64 positions in the middle of a
    sequence that fills the table, at 4,096 and 65,536 cells, and the ratio;
(c) defrag of a 32,768-cell table with every other cell empty;
(d) kq_mask for 64 tokens (one per sequence) over 32,768 cells;
(e) the same workloads on tests/cells_reference.py, with the speedup.
Times are the best of several runs.
"""
import pathlib
import sys
import time

import numpy as np

from kvcells import CellTable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from cells_reference import RefCells  # noqa: E402


def timed_us(op, setup=lambda: None, repeat=5):
    """Best time of op() in microseconds; setup() runs untimed before each."""
    best = None
    for _ in range(repeat):
        setup()
        t0 = time.perf_counter_ns()
        op()
        dt = time.perf_counter_ns() - t0
        best = dt if best is None else min(best, dt)
    return best / 1e3


def apply(t, idxs, pos, seqs):
    if isinstance(t, CellTable):
        t.apply_ubatch(np.asarray(idxs, np.int32), np.asarray(pos, np.int32), np.asarray(seqs, np.int32))
    else:
        t.apply_ubatch(list(map(int, idxs)), list(map(int, pos)), [[int(s)] for s in seqs])


def make(cls, n_cells, n_seq, per_seq):
    """n_seq sequences holding positions 0..per_seq-1, interleaved from cell 0."""
    t = CellTable(n_cells, n_seq) if cls is CellTable else RefCells(n_cells, n_seq)
    n = n_seq * per_seq
    apply(t, np.arange(n), np.repeat(np.arange(per_seq), n_seq), np.tile(np.arange(n_seq), per_seq))
    return t


def row(name, c_us, ref_us, note=""):
    print(f"{name:<44} C {c_us:10.1f} us   reference {ref_us:12.0f} us   "
          f"speedup {ref_us / c_us:8.0f}x  {note}")


# ---------------------------------------------------------------- (a) and (d)

def decode_step_c(t, seqs):
    idxs = t.find_slot(len(seqs))
    t.apply_ubatch(idxs, t.seq_pos_bounds()[1] + 1, seqs)
    return t.seq_pos_bounds()[1]


def decode_step_ref(r, seqs):
    idxs = r.find_slot(len(seqs))
    r.apply_ubatch(idxs, [r.seq_pos_max(s) + 1 for s in seqs], [[s] for s in seqs])
    return [r.seq_pos_max(s) for s in seqs]


def bench_decode_and_mask():
    n_cells, n_seq = 32768, 64
    seqs = np.arange(n_seq, dtype=np.int32)
    t, r = make(CellTable, n_cells, n_seq, 256), make(RefCells, n_cells, n_seq, 256)
    c_us = timed_us(lambda: decode_step_c(t, seqs), repeat=200)
    ref_us = timed_us(lambda: decode_step_ref(r, seqs.tolist()), repeat=3)
    row("(a) decode step, 64 seqs x 1 token, 32768 cells", c_us, ref_us, "(target <= 50 us)")
    each = timed_us(lambda: [t.seq_pos_max(s) for s in range(n_seq)], repeat=50)
    print(f"    the 64 seq_pos_max as 64 Python calls instead of one seq_pos_bounds(): {each:.1f} us")

    pos = t.seq_pos_bounds()[1] + 1
    n_kv = n_cells
    c_us = timed_us(lambda: t.kq_mask(pos, seqs, n_kv), repeat=20)
    ref_us = timed_us(lambda: r.kq_mask(pos.tolist(), seqs.tolist(), n_kv), repeat=1)
    row(f"(d) kq_mask, 64 tokens x {n_kv} cells", c_us, ref_us)


# ---------------------------------------------------------------- (b)

def ranged(cls, n_cells):
    t = CellTable(n_cells, 2) if cls is CellTable else RefCells(n_cells, 2)
    apply(t, np.arange(n_cells), np.arange(n_cells), np.zeros(n_cells))  # sequence 0 fills it
    cp = (n_cells // 4, n_cells // 4 + 64)
    lo, hi = n_cells // 2, n_cells // 2 + 64
    span = np.arange(lo, hi)
    repeat = 200 if cls is CellTable else 3
    t.seq_rm(0, lo, hi)
    return {
        "seq_cp": timed_us(lambda: t.seq_cp(0, 1, *cp), lambda: t.seq_rm(1, *cp), repeat),
        "seq_rm": timed_us(lambda: t.seq_rm(0, lo, hi), lambda: apply(t, span, span, [0] * 64), repeat),
        "seq_pos_max": timed_us(lambda: t.seq_pos_max(0), repeat=repeat),
    }


def bench_ranged():
    small, large = 4096, 65536
    c = {n: ranged(CellTable, n) for n in (small, large)}
    ref = {n: ranged(RefCells, n) for n in (small, large)}
    for op in ("seq_cp", "seq_rm", "seq_pos_max"):
        for n in (small, large):
            what = op if op == "seq_pos_max" else f"{op} of 64 positions"
            row(f"(b) {what}, {n} cells", c[n][op], ref[n][op])
        print(f"    {op}: {large} vs {small} cells: C x{c[large][op] / c[small][op]:.2f} "
              f"(target <= 2), reference x{ref[large][op] / ref[small][op]:.1f}")


# ---------------------------------------------------------------- (c)

def bench_defrag():
    n_cells = 32768

    def fragmented(cls):
        t = make(cls, n_cells, 2, n_cells // 2)  # cells alternate between sequences 0 and 1
        t.seq_rm(1)
        return t

    tables = {}

    def fresh(cls):
        tables[cls] = fragmented(cls)

    c_us = timed_us(lambda: tables[CellTable].defrag(), lambda: fresh(CellTable), repeat=10)
    ref_us = timed_us(lambda: tables[RefCells].defrag(), lambda: fresh(RefCells), repeat=2)
    row(f"(c) defrag, {n_cells} cells, every other empty", c_us, ref_us)


if __name__ == "__main__":
    bench_decode_and_mask()
    bench_ranged()
    bench_defrag()
