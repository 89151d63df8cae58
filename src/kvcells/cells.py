"""CellTable: the KV cell table of csrc/cells.c (docs/api.md, "Cell table").

Which position and which sequences each KV cell holds, placed and edited with
llama.cpp's rules for one stream. Arrays go in and out as numpy int32; every
argument is checked (in C as well), and an error leaves the table unchanged.
"""
import numbers

import numpy as np

from .errors import StateError
from .native import I32_MAX, I32_MIN, as_int, check, ffi, int32s, lib

SWA_TYPES = {"none": lib.KVC_SWA_NONE, "standard": lib.KVC_SWA_STANDARD,
             "chunked": lib.KVC_SWA_CHUNKED, "symmetric": lib.KVC_SWA_SYMMETRIC}
_SWA_NAMES = {v: k for k, v in SWA_TYPES.items()}

# occupancy(): '.' empty, 'M' several sequences, else one character per sequence id
_SEQ_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"
_LABELS = np.frombuffer(
    ("M." + _SEQ_CHARS + "+" * (256 - len(_SEQ_CHARS))).encode(), dtype=np.uint8)


def _int32_array(a, name):
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional")
    if arr.size == 0:
        return np.empty(0, np.int32)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype != np.int32:
        if arr.min() < I32_MIN or arr.max() > I32_MAX:
            raise ValueError(f"{name} has values outside int32")
        arr = arr.astype(np.int32)
    return np.ascontiguousarray(arr)


def _seq_lists(seq_ids, n_tokens):
    """seq_ids as (flat int32 ids, int32 offsets or None for one id per token)."""
    if not isinstance(seq_ids, np.ndarray):
        try:
            items = list(seq_ids)
        except TypeError:
            raise ValueError(f"seq_ids must be a sequence, got {seq_ids!r}") from None
        if not all(isinstance(x, numbers.Integral) for x in items):
            try:
                lists = [[x] if isinstance(x, numbers.Integral) else list(x) for x in items]
            except TypeError:
                raise ValueError("seq_ids: each entry must be an int or an iterable of ints") from None
            if len(lists) != n_tokens:
                raise ValueError(f"seq_ids has {len(lists)} entries for {n_tokens} tokens")
            offsets = np.zeros(n_tokens + 1, np.int64)
            np.cumsum([len(x) for x in lists], out=offsets[1:])
            if offsets[-1] > I32_MAX:
                raise ValueError("seq_ids: too many entries")
            flat = [s for x in lists for s in x]
            if any(isinstance(s, bool) for s in flat):
                raise ValueError("seq_ids must be integers, not bools")
            flat = _int32_array(flat, "seq_ids")
            return flat, offsets.astype(np.int32)
        if any(isinstance(s, bool) for s in items):
            raise ValueError("seq_ids must be integers, not bools")
        seq_ids = items
    flat = _int32_array(seq_ids, "seq_ids")
    if len(flat) != n_tokens:
        raise ValueError(f"seq_ids has {len(flat)} entries for {n_tokens} tokens")
    return flat, None


class CellTable:
    """llama.cpp's KV cell table for one stream; see docs/api.md and docs/cells.md."""

    def __init__(self, n_cells, n_seq_max=1, *, n_swa=0, swa_type="none"):
        n_cells = as_int(n_cells, "n_cells", 1, lib.KVC_MAX_CELLS)
        n_seq_max = as_int(n_seq_max, "n_seq_max", 1, lib.KVC_MAX_SEQ)
        n_swa = as_int(n_swa, "n_swa", 0)
        if not isinstance(swa_type, str) or swa_type not in SWA_TYPES:
            raise ValueError(f"unknown swa_type {swa_type!r}; one of {sorted(SWA_TYPES)}")
        if swa_type != "none" and n_swa < 1:
            raise ValueError(f"swa_type {swa_type!r} needs n_swa >= 1")
        out = ffi.new("kvc_table **")
        check(lib.kvc_new(n_cells, n_seq_max, n_swa, SWA_TYPES[swa_type], out))
        self._own(out[0])

    def _own(self, ptr):
        self._t = ffi.gc(ptr, lib.kvc_free)
        self.n_cells = lib.kvc_n_cells(ptr)
        self.n_seq_max = lib.kvc_n_seq_max(ptr)
        self.n_swa = lib.kvc_n_swa(ptr)
        self.swa_type = _SWA_NAMES[lib.kvc_swa_type(ptr)]

    @classmethod
    def _wrap(cls, ptr):
        t = cls.__new__(cls)
        t._own(ptr)
        return t

    def _seq(self, seq_id, name="seq_id", allow_all=False):
        return as_int(seq_id, name, -1 if allow_all else 0, self.n_seq_max - 1)

    # ------------------------------------------------------------ properties

    @property
    def used(self):
        return lib.kvc_used(self._t)

    @property
    def head(self):
        return lib.kvc_head(self._t)

    @property
    def used_max_p1(self):
        return lib.kvc_used_max_p1(self._t)

    @property
    def has_shift(self):
        return bool(lib.kvc_has_shift(self._t))

    # ------------------------------------------------------------ placement

    def find_slot(self, n_tokens, *, cont=False):
        """The cells llama.cpp's find_slot would give a ubatch of n_tokens (no change)."""
        n_tokens = as_int(n_tokens, "n_tokens", 1)
        # C fails before writing when n_tokens > n_cells, so this room is enough
        out = np.empty(min(n_tokens, self.n_cells), np.int32)
        check(lib.kvc_find_slot(self._t, n_tokens, bool(cont), int32s(out)))
        return out

    def apply_ubatch(self, idxs, pos, seq_ids):
        """Write a ubatch into cells idxs: positions pos, seq_ids one int per token
        or one iterable of ints per token."""
        check(lib.kvc_apply_ubatch(self._t, *self._ubatch_args(idxs, pos, seq_ids)))

    def check_ubatch(self, idxs, pos, seq_ids):
        """The error apply_ubatch would raise, without changing the table."""
        check(lib.kvc_check_ubatch(self._t, *self._ubatch_args(idxs, pos, seq_ids)))

    def _ubatch_args(self, idxs, pos, seq_ids):
        idxs = _int32_array(idxs, "idxs")
        pos = _int32_array(pos, "pos")
        if len(idxs) != len(pos):
            raise ValueError(f"idxs has {len(idxs)} entries, pos {len(pos)}")
        if len(idxs) == 0:
            raise ValueError("a ubatch needs at least one token")
        flat, offsets = _seq_lists(seq_ids, len(idxs))
        return (len(idxs), int32s(idxs), int32s(pos), len(flat), int32s(flat),
                ffi.NULL if offsets is None else int32s(offsets))

    def visible(self, pos, seq_ids, segment, cells, lo, hi):
        """What a ubatch's tokens attend (kvc_visible in csrc/cells.h): token
        i, at position pos[i] of sequence seq_ids[i] (its first one), sees
        cells[lo[i]:hi[i]], its sequence's cells from its window start to
        pos[i]; each sequence's part of the list is padded with cell 0 so
        that position p falls at an index = p modulo segment. cells, lo, hi:
        writable int32 vectors the results go into; returns the list's
        length, and writes nothing when that exceeds len(cells)."""
        pos = _int32_array(pos, "pos")
        seq_ids = _int32_array(seq_ids, "seq_ids")
        if len(seq_ids) != len(pos):
            raise ValueError(f"seq_ids has {len(seq_ids)} entries for {len(pos)} tokens")
        for name, a, n in (("cells", cells, 0), ("lo", lo, len(pos)), ("hi", hi, len(pos))):
            if not isinstance(a, np.ndarray) or a.dtype != np.int32 or a.ndim != 1 \
                    or not a.flags.c_contiguous or not a.flags.writeable or len(a) < n:
                raise ValueError(f"{name} must be a writable contiguous int32 vector "
                                 f"of at least {n} entries")
        n = ffi.new("int64_t *")
        check(lib.kvc_visible(self._t, len(pos), int32s(pos), int32s(seq_ids),
                              as_int(segment, "segment", 1), int32s(cells), len(cells), n,
                              int32s(lo), int32s(hi)))
        return n[0]

    # ------------------------------------------------------------ cells

    def pos(self, i):
        """Position of cell i, -1 when empty."""
        out = ffi.new("int32_t *")
        check(lib.kvc_cell_pos(self._t, as_int(i, "cell index"), out))
        return out[0]

    def seqs(self, i):
        """The sequences of cell i."""
        buf = ffi.new("int32_t[]", self.n_seq_max)
        n = ffi.new("int32_t *")
        check(lib.kvc_cell_seqs(self._t, as_int(i, "cell index"), buf, n))
        return frozenset(buf[k] for k in range(n[0]))

    def positions(self):
        """Positions of all cells (int32, -1 = empty)."""
        out = np.empty(self.n_cells, np.int32)
        lib.kvc_positions(self._t, int32s(out))
        return out

    def seq_matrix(self):
        """bool (n_cells, n_seq_max): whether cell i holds sequence s."""
        out = np.empty((self.n_cells, self.n_seq_max), np.uint8)
        lib.kvc_seq_matrix(self._t, ffi.from_buffer("uint8_t[]", out))
        return out.view(bool)

    def occupancy(self, width=64):
        """llama.cpp's debug picture: '.' empty, the sequence for one ('0'-'9',
        then 'a'-'z', '+' above 35), 'M' for several; `width` cells a line."""
        width = as_int(width, "width", 1)
        labels = np.empty(self.n_cells, np.int32)
        lib.kvc_cell_labels(self._t, int32s(labels))
        text = _LABELS[labels + 2].tobytes().decode()
        return "\n".join(text[k:k + width] for k in range(0, len(text), width))

    # ------------------------------------------------------------ sequences

    def seq_rm(self, seq_id, p0=-1, p1=-1):
        """Remove seq_id (-1: every sequence) from cells with position in [p0, p1)."""
        check(lib.kvc_seq_rm(self._t, self._seq(seq_id, allow_all=True),
                                  as_int(p0, "p0"), as_int(p1, "p1")))
        return True

    def seq_cp(self, src, dst, p0=-1, p1=-1):
        """Add dst to the cells of src with position in [p0, p1)."""
        check(lib.kvc_seq_cp(self._t, self._seq(src, "src"), self._seq(dst, "dst"),
                                  as_int(p0, "p0"), as_int(p1, "p1")))

    def seq_keep(self, seq_id):
        """Drop every sequence but seq_id."""
        check(lib.kvc_seq_keep(self._t, self._seq(seq_id)))

    def seq_add(self, seq_id, p0, p1, delta):
        """Add delta to the positions of seq_id in [p0, p1); cells pushed below 0 are freed."""
        check(lib.kvc_seq_add(self._t, self._seq(seq_id), as_int(p0, "p0"), as_int(p1, "p1"),
                                   as_int(delta, "delta")))

    def seq_div(self, seq_id, p0, p1, d):
        """Integer-divide the positions of seq_id in [p0, p1) by d >= 1."""
        check(lib.kvc_seq_div(self._t, self._seq(seq_id), as_int(p0, "p0"), as_int(p1, "p1"),
                                   as_int(d, "d", 1)))

    def seq_pos_min(self, seq_id):
        out = ffi.new("int32_t *")
        check(lib.kvc_seq_pos_min(self._t, self._seq(seq_id), out))
        return out[0]

    def seq_pos_max(self, seq_id):
        out = ffi.new("int32_t *")
        check(lib.kvc_seq_pos_max(self._t, self._seq(seq_id), out))
        return out[0]

    def seq_pos_bounds(self):
        """(mins, maxs): seq_pos_min and seq_pos_max of every sequence, int32 arrays."""
        mins = np.empty(self.n_seq_max, np.int32)
        maxs = np.empty(self.n_seq_max, np.int32)
        lib.kvc_seq_pos_bounds(self._t, int32s(mins), int32s(maxs))
        return mins, maxs

    def seq_cells(self, seq_id):
        """(idxs, pos) of the sequence's cells, ordered by position."""
        seq_id = self._seq(seq_id)
        n = ffi.new("int32_t *")
        check(lib.kvc_seq_count(self._t, seq_id, n))
        idxs = np.empty(n[0], np.int32)
        pos = np.empty(n[0], np.int32)
        check(lib.kvc_seq_cells(self._t, seq_id, int32s(idxs), int32s(pos)))
        return idxs, pos

    # ------------------------------------------------------------ maintenance

    def take_shifts(self):
        """Per-cell position shifts accumulated since the last call (int32), then reset."""
        out = np.empty(self.n_cells, np.int32)
        lib.kvc_take_shifts(self._t, int32s(out))
        return out

    def defrag(self):
        """Compact the used cells to [0, used); returns the (src, dst) moves, int32 (k, 2)."""
        moves = np.empty((self.n_cells, 2), np.int32)
        n = ffi.new("int32_t *")
        lib.kvc_defrag(self._t, ffi.from_buffer("int32_t[]", moves), n)
        return moves[:n[0]].copy()

    def kq_mask(self, pos, seq_ids, n_kv):
        """float32 (n_tokens, n_kv): 0 where a token (its first sequence) may attend a cell."""
        pos = _int32_array(pos, "pos")
        n_kv = as_int(n_kv, "n_kv", 0, self.n_cells)
        flat, offsets = _seq_lists(seq_ids, len(pos))
        if offsets is not None:
            if np.any(offsets[1:] == offsets[:-1]):
                raise ValueError("kq_mask: a token has no sequence")
            if np.any((flat < 0) | (flat >= self.n_seq_max)):   # C sees only the first ids
                raise ValueError(f"kq_mask: sequence id outside [0, {self.n_seq_max})")
            flat = np.ascontiguousarray(flat[offsets[:-1]])
        out = np.empty((len(pos), n_kv), np.float32)
        check(lib.kvc_kq_mask(self._t, len(pos), int32s(pos), int32s(flat), n_kv,
                                   ffi.from_buffer("float[]", out)))
        return out

    def clear(self):
        lib.kvc_clear(self._t)

    # ------------------------------------------------------------ state

    def to_bytes(self):
        size = lib.kvc_state_size(self._t)
        buf = bytearray(size)
        check(lib.kvc_state_write(self._t, ffi.from_buffer(buf), size))
        return bytes(buf)

    @classmethod
    def from_bytes(cls, data):
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise StateError(f"a cell table state must be bytes, got {type(data).__name__}") from None
        out = ffi.new("kvc_table **")
        check(lib.kvc_state_read(ffi.from_buffer(view), len(view), out), "cell table state: ")
        return cls._wrap(out[0])

    def copy(self):
        out = ffi.new("kvc_table **")
        check(lib.kvc_clone(self._t, out))
        return self._wrap(out[0])

    def __reduce__(self):
        return CellTable.from_bytes, (self.to_bytes(),)

    def check(self):
        """Verify every internal invariant; KVCellsError names the broken one."""
        check(lib.kvc_check(self._t), "cell table invariant broken: ")

    def __repr__(self):
        return (f"CellTable(n_cells={self.n_cells}, n_seq_max={self.n_seq_max}, "
                f"n_swa={self.n_swa}, swa_type={self.swa_type!r}, used={self.used}, "
                f"head={self.head})")
