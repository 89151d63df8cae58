"""The K/V memory protocol: what a Context, the model's forward pass,
generate and the runner use of a cache. KVCache (one cell table) and
ISWACache (a full-attention and a sliding-window KVCache) implement it."""
from abc import ABC, abstractmethod

from . import native


class Memory(ABC):
    """K/V rows of a model's layers on cell tables. `n_threads`: the
    threads of this memory's attention and of the matmuls of a forward pass
    through it (None: the process default, kvcells.set_num_threads).
    `lock`: a re-entrant lock every public method holds while it runs;
    calls that must happen together (prepare, apply, store, attend of one
    ubatch) run with it held around them, as Context.decode does."""

    n_threads = None
    _layer_views = None
    table = None   # the cell table of the full-attention layers
    swa = None     # the KVCache of the sliding-window layers, where they are apart

    @property
    @abstractmethod
    def kv_bytes(self):
        """Bytes of K/V storage."""

    @abstractmethod
    def prepare(self, ubatches):
        """A slot for each (pos, seq_ids) ubatch, as if placed one after
        another, without changing anything; CacheFullError if one does not fit."""

    @abstractmethod
    def apply(self, slot, pos, seq_ids):
        """Place a ubatch in the slot prepare() gave it."""

    @abstractmethod
    def store(self, layer, k, v):
        """Write the applied ubatch's K/V rows of a layer."""

    @abstractmethod
    def attend(self, layer, q, scale):
        """Attention output of the applied ubatch's queries in a layer."""

    @abstractmethod
    def layer_kv(self, layer):
        """A layer's K/V rows and the applied ubatch for the forward pass's C
        block (native.LayerKV, native.UbatchView), which stores and attends
        in one call."""

    def layer_views(self, n_layer):
        """layer_kv of the layers 0 .. n_layer - 1 at once, as the C forward
        pass takes them (native.LayerViews); made on first use, then kept
        (the views follow the memory's applied ubatch)."""
        views = self._layer_views
        if views is None or views.n_layer != n_layer:
            views = self._layer_views = native.LayerViews(
                [self.layer_kv(il) for il in range(n_layer)])
        return views

    @abstractmethod
    def seq_rm(self, seq_id, p0=-1, p1=-1):
        """Remove a sequence's positions in [p0, p1); llama.cpp's semantics."""

    @abstractmethod
    def seq_cp(self, seq_id_src, seq_id_dst, p0=-1, p1=-1):
        """Add seq_id_dst to the cells of seq_id_src in [p0, p1) (no copy)."""

    @abstractmethod
    def seq_keep(self, seq_id):
        """Drop every other sequence."""

    @abstractmethod
    def seq_add(self, seq_id, p0, p1, delta):
        """Shift positions in [p0, p1) by delta (K rows re-rotated)."""

    @abstractmethod
    def seq_div(self, seq_id, p0, p1, d):
        """Divide positions in [p0, p1) by d (K rows re-rotated)."""

    @abstractmethod
    def seq_pos_min(self, seq_id):
        """Smallest position of a sequence, -1 when it is empty."""

    @abstractmethod
    def seq_pos_max(self, seq_id):
        """Largest position of a sequence, -1 when it is empty."""

    @abstractmethod
    def holds_prefix(self, seq_id, n):
        """Whether a token at position n of the sequence, once the sequence is
        cut back to [0, n), finds every position it attends still held (a
        sliding-window cache reuses the cells that fell out of every window)."""

    @abstractmethod
    def clear(self):
        """Empty every cell."""

    @abstractmethod
    def defrag(self):
        """Compact the used cells; returns the number of cells moved."""

    @abstractmethod
    def state_bytes(self, seq_id=None):
        """The whole memory, or one sequence, as bytes (docs/api.md, "State")."""

    @abstractmethod
    def load_state_bytes(self, b, seq_id=None):
        """Load state_bytes(); StateError and no change when it cannot be."""

    @abstractmethod
    def occupancy(self):
        """A text picture of which sequence holds each cell."""
