"""The K/V memory: K and V rows per layer on a cell table, attention through
the cells, K-shift, defrag, state; ISWA as a pair of caches.

Storage: for each layer, K and V are uint8 arrays (n_cells, row_bytes), one
row per cell holding n_head_kv x head_dim values in the cache's element type
(kv_quant). A ubatch is placed with the table's find_slot/apply_ubatch, its
K/V rows are written into its cells, and each token attends the cells of its
first sequence that it may see (kq_mask semantics), listed per sequence by
the table (CellTable.visible), so a sequence never pays for the length of
another.
"""
import functools
import numbers
import struct
import threading
import zlib

import numpy as np

from . import kv_quant, native
from .cells import SWA_TYPES, CellTable
from .errors import CacheFullError, KVCellsError, StateError
from .memory import Memory
from .native import KV_TYPES, as_int
from .rope import NEOX, NORM

STATE_MAGIC = b"KVCSTATE"
ISWA_STATE_MAGIC = b"KVCISWA\0"
STATE_VERSION = 1
ISWA_STATE_VERSION = 2   # version 1 had a CRC-32 over both halves besides their own
_WHOLE, _SEQUENCE = 0, 1


def _seq_lists(seq_ids):
    try:
        return [list(s) if type(s) is list and all(type(x) is int for x in s) else
                [as_int(s, "sequence id", 0, None)] if np.ndim(s) == 0 else
                [as_int(x, "sequence id", 0, None) for x in s] for s in seq_ids]
    except TypeError:
        raise ValueError(f"seq_ids must be a sequence of ids or of lists of ids, "
                         f"got {seq_ids!r}") from None


def _finite_positive(x, name):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real) \
            or not 0 < float(x) < float("inf"):
        raise ValueError(f"{name} must be a finite positive number, got {x!r}")
    return float(x)


def _locked(method):
    """Run the method holding the memory's lock (see the class docstrings)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return run


def _window_start(p1, n_swa, swa_type):
    """Smallest position a token at p1 may see in a sliding-window cache."""
    if swa_type == "standard":
        return p1 - n_swa + 1
    if swa_type == "chunked":
        return (p1 // n_swa) * n_swa
    if swa_type == "symmetric":
        return p1 - n_swa // 2
    return np.zeros_like(p1)


class KVCache(Memory):
    """K/V rows of the given layers on one cell table.

    Every public method holds `lock` (a re-entrant lock) while it runs, so
    one cache may be used from several threads; a caller that needs several
    calls to happen together (prepare, apply, store, attend of one ubatch)
    holds `lock` around them, as Context.decode does."""

    def __init__(self, n_cells, n_seq_max, layers, n_head_kv, head_dim,
                 type_k="f16", type_v="f16", *, n_swa=0, swa_type="none",
                 rope_base=10000.0, rope_mode=NEOX, rope_freq_scale=1.0):
        if np.ndim(layers) == 0:
            layers = range(as_int(layers, "layers", 0, None))
        self.layers = [as_int(il, "layer id", 0, None) for il in layers]
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("layer ids must be distinct")
        n_head_kv = as_int(n_head_kv, "n_head_kv", 1, None)
        head_dim = as_int(head_dim, "head_dim", 1, None)
        if rope_mode not in (NEOX, NORM):
            raise ValueError(f"unknown RoPE mode {rope_mode!r}")
        for t in (type_k, type_v):
            kv_quant.check_type(t)
            if t.startswith("q") and head_dim % kv_quant.BLOCK:
                raise ValueError(f"{t} needs head_dim divisible by {kv_quant.BLOCK}")
        if isinstance(rope_base, dict):
            if any(il not in rope_base for il in self.layers):
                raise ValueError("rope_base needs a base for every layer of the cache")
            self.rope_base = {il: _finite_positive(rope_base[il], "rope_base") for il in self.layers}
        else:
            self.rope_base = {il: _finite_positive(rope_base, "rope_base") for il in self.layers}
        self.table = CellTable(n_cells, n_seq_max, n_swa=n_swa, swa_type=swa_type)
        self.n_cells, self.n_seq_max = self.table.n_cells, self.table.n_seq_max
        self.n_swa, self.swa_type = self.table.n_swa, self.table.swa_type
        self.n_head_kv, self.head_dim = n_head_kv, head_dim
        self.type_k, self.type_v = type_k, type_v
        self.rope_mode = rope_mode
        self.rope_freq_scale = _finite_positive(rope_freq_scale, "rope_freq_scale")
        self.n_threads = None   # attention threads; None: native.get_num_threads()
        self.row_k = kv_quant.row_bytes(type_k, n_head_kv * head_dim)
        self.row_v = kv_quant.row_bytes(type_v, n_head_kv * head_dim)
        self.k = {il: np.zeros((n_cells, self.row_k), np.uint8) for il in self.layers}
        self.v = {il: np.zeros((n_cells, self.row_v), np.uint8) for il in self.layers}
        self._layer_kv = {il: native.LayerKV(native.kv_type_id(type_k), self.k[il],
                                             native.kv_type_id(type_v), self.v[il],
                                             n_head_kv * head_dim) for il in self.layers}
        # the applied ubatch, in buffers made once (the list grows when a
        # ubatch needs more): token t's K/V rows go to cell slots[t], it
        # attends cells[lo[t]:hi[t]] (CellTable.visible)
        self._slots, self._lo, self._hi = (np.zeros(n_cells, np.int32) for _ in range(3))
        self._cells = np.zeros(n_cells + native.KV_SEGMENT, np.int32)
        self._view = native.UbatchView(self._slots, self._cells, self._lo, self._hi)
        self._ubatch = None   # (n_tokens, n_list) of the applied ubatch
        self.lock = threading.RLock()

    @property
    @_locked
    def kv_bytes(self):
        return sum(self.k[il].nbytes + self.v[il].nbytes for il in self.layers)

    # ---- placing a ubatch ----

    @_locked
    def prepare(self, ubatches):
        """One slot (the cells) per ubatch, as if placed one after another;
        the table itself is not touched. CacheFullError if one does not fit."""
        ubatches = [(pos, self._checked_seqs(pos, seq_ids)) for pos, seq_ids in ubatches]
        if len(ubatches) == 1:   # find_slot is a pure query: no copy of the table
            return [self.table.find_slot(len(ubatches[0][0]))]
        sim = self.table.copy()
        slots = []
        for pos, seq_lists in ubatches:
            try:
                idxs = sim.find_slot(len(pos))
            except CacheFullError:
                n = sum(len(p) for p, _ in ubatches)
                raise CacheFullError(f"no room for a batch of {n} tokens: {self.table.used} of "
                                     f"{self.n_cells} cells in use") from None
            sim.apply_ubatch(idxs, pos, seq_lists)
            slots.append(idxs)
        return slots

    def _checked_seqs(self, pos, seq_ids):
        seq_lists = _seq_lists(seq_ids)
        if len(seq_lists) != len(pos) or not all(seq_lists):
            raise ValueError("a ubatch needs one non-empty list of sequence ids per position")
        if not all(0 <= s < self.n_seq_max for ss in seq_lists for s in ss):
            raise ValueError(f"sequence id outside [0, {self.n_seq_max})")
        return seq_lists

    @_locked
    def apply(self, slot, pos, seq_ids):
        """Place a ubatch in the cells prepare() gave it; store() and attend()
        then work on it."""
        self._apply(slot, pos, self._table_seqs(pos, seq_ids))

    def _table_seqs(self, pos, seq_ids):
        """seq_ids checked, as the table takes them: an int32 vector when
        every token has one sequence (the table's quick path), else lists."""
        seq_lists = self._checked_seqs(pos, seq_ids)
        if all(len(s) == 1 for s in seq_lists):
            return np.array([s[0] for s in seq_lists], np.int32)
        return seq_lists

    def _apply(self, slot, pos, seqs):
        self._forget()
        self.table.apply_ubatch(slot, pos, seqs)
        n = len(pos)
        self._slots[:n] = slot
        first = seqs if isinstance(seqs, np.ndarray) else np.array([s[0] for s in seqs], np.int32)
        n_list = self.table.visible(pos, first, native.KV_SEGMENT, self._cells, self._lo,
                                    self._hi)
        if n_list > len(self._cells):
            self._cells = np.zeros(max(n_list, 2 * len(self._cells)), np.int32)
            self.table.visible(pos, first, native.KV_SEGMENT, self._cells, self._lo, self._hi)
            self._view.set(0, 0, self._cells)
        self._ubatch = n, n_list
        self._view.set(n, n_list)

    def _forget(self):
        """No ubatch applied (the cells changed since)."""
        self._ubatch = None
        self._view.set(0, 0)

    def _check(self, layer, arr, n_heads, what):
        """The applied ubatch's cells, after checking layer and arr's shape."""
        if self._ubatch is None:
            raise KVCellsError("no ubatch applied (or the cache changed since apply)")
        if layer not in self.k:
            raise ValueError(f"layer {layer} is not in this cache")
        idxs = self._slots[:self._ubatch[0]]
        shape = (len(idxs), n_heads, self.head_dim)
        if arr.shape != shape:
            raise ValueError(f"{what} must have shape {shape}, got {arr.shape}")
        return idxs

    @_locked
    def store(self, layer, k, v):
        """Write the K/V rows (n_tokens, n_head_kv, head_dim) of the applied ubatch."""
        k = np.ascontiguousarray(k, dtype=np.float32)
        v = np.ascontiguousarray(v, dtype=np.float32)
        idxs = self._check(layer, k, self.n_head_kv, "k")
        self._check(layer, v, self.n_head_kv, "v")
        n = self.n_head_kv * self.head_dim
        native.kv_store(native.kv_type_id(self.type_k), self.k[layer], n, idxs, k)
        native.kv_store(native.kv_type_id(self.type_v), self.v[layer], n, idxs, v)

    @_locked
    def attend(self, layer, q, scale):
        """Attention output (n_tokens, n_head, head_dim) for the applied ubatch."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        n_head = q.shape[1] if q.ndim == 3 else 0
        if n_head == 0 or n_head % self.n_head_kv:
            raise ValueError(f"q must be (n_tokens, n_head, {self.head_dim}) with n_head "
                             f"a multiple of n_head_kv = {self.n_head_kv}")
        self._check(layer, q, n_head, "q")
        n, n_list = self._ubatch
        out = np.empty_like(q)
        native.kv_attend(native.kv_type_id(self.type_k), self.k[layer],
                         native.kv_type_id(self.type_v), self.v[layer], self.n_cells,
                         self.n_head_kv, self.head_dim, self._cells[:n_list], self._lo[:n],
                         self._hi[:n], q, scale, out, self.n_threads or native.get_num_threads())
        return out

    @_locked
    def layer_kv(self, layer):
        """A layer's K/V rows and the applied ubatch as the C block takes them
        (native.LayerKV, native.UbatchView): it stores and attends in one call.
        The view is the cache's own and follows it: it holds no tokens while
        no ubatch is applied, so a forward pass through it fails in C."""
        if layer not in self.k:
            raise ValueError(f"layer {layer} is not in this cache")
        return self._layer_kv[layer], self._view

    # ---- sequence operations (docs/api.md semantics) ----

    @_locked
    def seq_rm(self, seq_id, p0=-1, p1=-1):
        self._forget()
        return self.table.seq_rm(seq_id, p0, p1)

    @_locked
    def seq_cp(self, seq_id_src, seq_id_dst, p0=-1, p1=-1):
        self._forget()
        self.table.seq_cp(seq_id_src, seq_id_dst, p0, p1)

    @_locked
    def seq_keep(self, seq_id):
        self._forget()
        self.table.seq_keep(seq_id)

    @_locked
    def seq_add(self, seq_id, p0, p1, delta):
        self._forget()
        self.table.seq_add(seq_id, p0, p1, delta)
        self._shift_k()

    @_locked
    def seq_div(self, seq_id, p0, p1, d):
        self._forget()
        self.table.seq_div(seq_id, p0, p1, d)
        self._shift_k()

    @_locked
    def seq_pos_min(self, seq_id):
        return self.table.seq_pos_min(seq_id)

    @_locked
    def seq_pos_max(self, seq_id):
        return self.table.seq_pos_max(seq_id)

    @_locked
    def clear(self):
        self._forget()
        self.table.clear()

    @_locked
    def holds_prefix(self, seq_id, n):
        _, held = self.table.seq_cells(seq_id)
        lo = max(0, n - self.n_swa) if self.n_swa else 0   # a window lies within n_swa
        return bool(np.isin(np.arange(lo, n), held).all())

    @_locked
    def occupancy(self):
        return "cells:\n" + self.table.occupancy()

    def _shift_k(self):
        """Re-rotate the K rows of shifted cells by their shift, in place in
        their type (kv_rope_shift): RoPE by p then by delta equals RoPE by
        p + delta. Layers with the same base go in one call, so the angles
        are computed once per cell."""
        if not self.table.has_shift:
            return
        shifts = self.table.take_shifts()
        cells = np.nonzero(shifts)[0].astype(np.int32)
        if len(cells) == 0:
            return
        delta = np.ascontiguousarray(shifts[cells], dtype=np.int32)
        for base in set(self.rope_base.values()):
            layers = [self.k[il] for il in self.layers if self.rope_base[il] == base]
            native.kv_rope_shift(native.kv_type_id(self.type_k), layers, self.n_cells,
                                 self.n_head_kv, self.head_dim, cells, delta, base,
                                 self.rope_freq_scale, self.rope_mode == NEOX)

    @_locked
    def defrag(self):
        """Compact the used cells to [0, used); K and V rows follow their
        cells. Returns the number of cells moved."""
        self._forget()
        moves = self.table.defrag()
        src, dst = moves[:, 0], moves[:, 1]
        for il in self.layers:
            self.k[il][dst] = self.k[il][src]
            self.v[il][dst] = self.v[il][src]
        return len(moves)

    # ---- state ----

    def _shape(self):
        """What a saved sequence must agree on with the cache it loads into."""
        return struct.pack(f"<7i{len(self.layers)}i", self.n_swa, SWA_TYPES[self.swa_type],
                           KV_TYPES.index(self.type_k), KV_TYPES.index(self.type_v), self.n_head_kv,
                           self.head_dim, len(self.layers), *self.layers)

    def _header(self, kind):
        return (struct.pack("<8sIIii", STATE_MAGIC, STATE_VERSION, kind, self.n_cells,
                            self.n_seq_max) + self._shape())

    @_locked
    def state_bytes(self, seq_id=None):
        """The whole cache, or one sequence's cells, positions and K/V rows."""
        return self._state_bytes(seq_id)

    def _state_bytes(self, seq_id, horizon=None):
        if seq_id is None:
            body = self._header(_WHOLE)
            table = self.table.to_bytes()
            rows = np.arange(self.table.used_max_p1)
            body += struct.pack("<q", len(table)) + table
        else:
            body = self._header(_SEQUENCE)
            rows, pos = self._saved_cells(seq_id, horizon)
            body += struct.pack("<ii", seq_id, len(rows)) + pos.astype("<i4").tobytes()
        parts = [body]
        for il in self.layers:
            parts += [self.k[il][rows].tobytes(), self.v[il][rows].tobytes()]
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    def _saved_cells(self, seq_id, horizon=None):
        """The sequence's cells by position, without those its window has
        left behind for good (as llama.cpp saves a sequence): below the
        window of `horizon`, by default its largest position + 1."""
        idxs, pos = self.table.seq_cells(seq_id)
        if self.swa_type != "none" and len(pos):
            if horizon is None:
                horizon = pos.max() + 1
            keep = pos >= _window_start(horizon, self.n_swa, self.swa_type)
            idxs, pos = idxs[keep], pos[keep]
        return idxs, pos

    @_locked
    def load_state_bytes(self, b, seq_id=None):
        """Load a state_bytes() image. A sequence image loads into free cells
        (find_slot) under seq_id (default: its own id), replacing that
        sequence; a whole image replaces everything. StateError (or
        CacheFullError) and no change when it cannot be loaded."""
        self._plan_load(b, seq_id)[0]()

    def _plan_load(self, b, seq_id):
        """Check and stage a load; returns the function that commits it,
        the new table and the sequence it loads (None: a whole image)."""
        r = _Reader(_unseal(b))
        magic, version, kind, n_cells, n_seq_max = struct.unpack("<8sIIii", r.take(24))
        if magic != STATE_MAGIC or version != STATE_VERSION:
            raise StateError("not a kvcells cache state of this version")
        if r.take(len(self._shape())) != self._shape():
            raise StateError("the state was saved from a cache of another type or shape")
        if kind == _WHOLE:
            if (n_cells, n_seq_max) != (self.n_cells, self.n_seq_max):
                raise StateError(f"the state was saved from a cache of {n_cells} cells and "
                                 f"{n_seq_max} sequences, this one has {self.n_cells} and "
                                 f"{self.n_seq_max}")
            if seq_id is not None:
                raise StateError("a whole-cache state cannot be loaded as one sequence")
            table = CellTable.from_bytes(r.take(r.int("<q")))
            if (table.n_cells, table.n_seq_max, table.n_swa, table.swa_type) != (
                    self.n_cells, self.n_seq_max, self.n_swa, self.swa_type):
                raise StateError("the saved cell table does not match the state's header")
            rows = np.arange(table.used_max_p1)
        elif kind == _SEQUENCE:
            saved_id, n = r.int("<i"), r.int("<i")
            dest = saved_id if seq_id is None else seq_id
            if not 0 <= dest < self.n_seq_max:
                raise (StateError if seq_id is None else ValueError)(
                    f"sequence id {dest} outside [0, {self.n_seq_max})")
            if n < 0:
                raise StateError(f"negative cell count {n}")
            if n > self.n_cells:
                raise CacheFullError(f"a sequence of {n} cells does not fit {self.n_cells} cells")
            pos = np.frombuffer(r.take(4 * n), "<i4").astype(np.int32)
            if np.any(pos < 0):
                raise StateError("negative position in a saved sequence")
            if np.any(np.diff(pos) < 0):
                raise StateError("the positions of a saved sequence are not in order")
            table = self.table.copy()
            table.seq_rm(dest)
            rows = table.find_slot(n) if n else np.zeros(0, np.int32)
            if n:
                table.apply_ubatch(rows, pos, [[dest]] * n)
        else:
            raise StateError(f"unknown state kind {kind}")
        data = [(r.rows(len(rows), self.row_k), r.rows(len(rows), self.row_v)) for _ in self.layers]
        r.finish()

        def commit():
            self._forget()
            self.table = table
            for il, (k, v) in zip(self.layers, data):
                self.k[il][rows] = k
                self.v[il][rows] = v
        return commit, table, (None if kind == _WHOLE else dest)


def _unseal(b):
    """A state image without its trailing CRC-32, once that is checked."""
    b = bytes(b)
    if len(b) < 4 or zlib.crc32(b[:-4]) != struct.unpack("<I", b[-4:])[0]:
        raise StateError("state checksum mismatch: the data is corrupt or truncated")
    return b[:-4]


class _Reader:
    """Reads a state image field by field."""

    def __init__(self, b):
        self.b, self.off = bytes(b), 0

    def take(self, n):
        if n < 0 or self.off + n > len(self.b):
            raise StateError("state truncated")
        self.off += n
        return self.b[self.off - n:self.off]

    def int(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def rows(self, n, row_bytes):
        return np.frombuffer(self.take(n * row_bytes), np.uint8).reshape(n, row_bytes)

    def finish(self):
        if self.off != len(self.b):
            raise StateError("state has trailing bytes")


def swa_cells(n_ctx, n_seq_max, n_ubatch, n_swa):
    """llama.cpp's size of a sliding-window cache: the window of every
    sequence plus one ubatch, padded to 256."""
    return min(n_ctx, -(-(n_swa * n_seq_max + n_ubatch) // 256) * 256)


class ISWACache(Memory):
    """Interleaved sliding-window attention: full-attention layers in one
    cache, sliding-window layers in a smaller one whose cells are reused once
    the window has passed them. Both always hold the same ubatches. One
    lock, shared with both halves, guards it as KVCache's guards a cache."""

    def __init__(self, n_ctx, n_seq_max, n_ubatch, swa_layers, n_head_kv, head_dim,
                 type_k="f16", type_v="f16", *, n_swa, swa_type="standard",
                 rope_base=10000.0, rope_base_swa=10000.0, rope_mode=NEOX,
                 rope_freq_scale=1.0, rope_freq_scale_swa=None):
        n_ctx, n_seq_max = as_int(n_ctx, "n_ctx", 1, None), as_int(n_seq_max, "n_seq_max", 1, None)
        n_ubatch, n_swa = as_int(n_ubatch, "n_ubatch", 1, None), as_int(n_swa, "n_swa", 1, None)
        if swa_type == "none":
            raise ValueError("ISWACache needs a sliding-window type")
        self.swa_layers = [bool(x) for x in swa_layers]
        full = [il for il, s in enumerate(self.swa_layers) if not s]
        swa = [il for il, s in enumerate(self.swa_layers) if s]
        n_swa_cells = swa_cells(n_ctx, n_seq_max, n_ubatch, n_swa)
        if rope_freq_scale_swa is None:
            rope_freq_scale_swa = rope_freq_scale
        common = dict(n_head_kv=n_head_kv, head_dim=head_dim, type_k=type_k, type_v=type_v,
                      rope_mode=rope_mode)
        self.base = KVCache(n_ctx, n_seq_max, full, rope_base=rope_base,
                            rope_freq_scale=rope_freq_scale, **common)
        self.swa = KVCache(n_swa_cells, n_seq_max, swa, n_swa=n_swa, swa_type=swa_type,
                           rope_base=rope_base_swa, rope_freq_scale=rope_freq_scale_swa,
                           **common)
        self.halves = (self.base, self.swa)
        self.lock = self.base.lock = self.swa.lock = threading.RLock()

    @property
    def table(self):
        return self.base.table

    def _half(self, layer):
        if not 0 <= layer < len(self.swa_layers):
            raise ValueError(f"layer {layer} is not in this cache")
        return self.swa if self.swa_layers[layer] else self.base

    @property
    @_locked
    def kv_bytes(self):
        return self.base.kv_bytes + self.swa.kv_bytes

    @property
    def n_threads(self):
        return self.base.n_threads

    @n_threads.setter
    def n_threads(self, n):
        for h in self.halves:
            h.n_threads = None if n is None else native.check_threads(n)

    @_locked
    def prepare(self, ubatches):
        ubatches = list(ubatches)
        return list(zip(self.base.prepare(ubatches), self.swa.prepare(ubatches)))

    @_locked
    def apply(self, slot, pos, seq_ids):
        # check the window half first: a stale slot then fails before
        # either half has changed
        seqs = self.swa._table_seqs(pos, seq_ids)
        self.swa.table.check_ubatch(slot[1], pos, seqs)
        self.base._apply(slot[0], pos, seqs)
        self.swa._apply(slot[1], pos, seqs)

    @_locked
    def store(self, layer, k, v):
        self._half(layer).store(layer, k, v)

    @_locked
    def attend(self, layer, q, scale):
        return self._half(layer).attend(layer, q, scale)

    @_locked
    def layer_kv(self, layer):
        return self._half(layer).layer_kv(layer)

    @_locked
    def seq_rm(self, seq_id, p0=-1, p1=-1):
        return all([h.seq_rm(seq_id, p0, p1) for h in self.halves])

    @_locked
    def seq_cp(self, seq_id_src, seq_id_dst, p0=-1, p1=-1):
        for h in self.halves:
            h.seq_cp(seq_id_src, seq_id_dst, p0, p1)

    @_locked
    def seq_keep(self, seq_id):
        for h in self.halves:
            h.seq_keep(seq_id)

    @_locked
    def seq_add(self, seq_id, p0, p1, delta):
        for h in self.halves:
            h.seq_add(seq_id, p0, p1, delta)

    @_locked
    def seq_div(self, seq_id, p0, p1, d):
        for h in self.halves:
            h.seq_div(seq_id, p0, p1, d)

    # as llama.cpp: the SWA cache holds a subset of the positions of the full one
    @_locked
    def seq_pos_min(self, seq_id):
        return self.swa.seq_pos_min(seq_id)

    @_locked
    def seq_pos_max(self, seq_id):
        return self.swa.seq_pos_max(seq_id)

    @_locked
    def clear(self):
        for h in self.halves:
            h.clear()

    @_locked
    def defrag(self):
        return sum(h.defrag() for h in self.halves)

    @_locked
    def holds_prefix(self, seq_id, n):
        return self.base.holds_prefix(seq_id, n) and self.swa.holds_prefix(seq_id, n)

    @_locked
    def occupancy(self):
        return (f"full-attention cells:\n{self.base.table.occupancy()}\n"
                f"sliding-window cells:\n{self.swa.table.occupancy()}")

    @_locked
    def state_bytes(self, seq_id=None):
        """Both halves' images, each with its own CRC-32 (none around them).
        A sequence's window cells are those the full half's next position sees."""
        base = self.base.state_bytes(seq_id)
        horizon = None if seq_id is None else self.base.seq_pos_max(seq_id) + 1
        swa = self.swa._state_bytes(seq_id, horizon)
        return ISWA_STATE_MAGIC + struct.pack("<Iq", ISWA_STATE_VERSION, len(base)) + base + swa

    @_locked
    def load_state_bytes(self, b, seq_id=None):
        r = _Reader(b)
        if r.take(8) != ISWA_STATE_MAGIC:
            raise StateError("not a kvcells ISWA cache state")
        version = r.int("<I")
        if version != ISWA_STATE_VERSION:
            raise StateError(f"ISWA cache state of format version {version}; this kvcells "
                             f"reads version {ISWA_STATE_VERSION}")
        base = r.take(r.int("<q"))
        swa = r.take(len(r.b) - r.off)
        commit_base, base_table, base_seq = self.base._plan_load(base, seq_id)
        commit_swa, swa_table, swa_seq = self.swa._plan_load(swa, seq_id)
        if base_seq != swa_seq:
            raise StateError("the two halves of the ISWA state hold different sequences")
        if base_seq is not None:
            self._check_window(base_table, swa_table, base_seq)
        commit_base()
        commit_swa()

    def _check_window(self, base, swa, seq_id):
        """A saved sequence's window cells lie in the window of the full
        half's next position (state_bytes saves no others). Nothing else
        ties the halves: seq_add on a cell the window half no longer shares
        moves a position in one half only, so a live cache's halves may
        hold different positions and sequences (docs/testing.md)."""
        full = base.seq_cells(seq_id)[1]
        window = swa.seq_cells(seq_id)[1]
        if len(window):
            horizon = full.max() + 1 if len(full) else 0
            if window.min() < _window_start(horizon, self.swa.n_swa, self.swa.swa_type):
                raise StateError(f"the sliding-window half holds position {window.min()} of "
                                 f"sequence {seq_id}, outside the window of position {horizon}")
