"""A decoding context: a model, its KV memory, and decode()."""
import struct

import numpy as np

from . import native
from .errors import StateError
from .native import I32_MAX, KV_TYPES, as_int

STATE_MAGIC = b"KVCELLS-CTX\0"
STATE_VERSION = 1


class Context:
    """A model with its K/V memory (docs/api.md, "Decoding"). n_threads: the
    threads of this context's matmuls and attention; None uses the process
    default, kvcells.get_num_threads(). Safe to call from several threads:
    decode, state_save/state_load and the memory's methods (ctx.memory.seq_rm,
    ...) each hold the memory's lock, so calls run one after another."""

    def __init__(self, model, n_ctx=4096, n_seq_max=1, n_ubatch=512,
                 type_k="f16", type_v="f16", n_threads=None):
        n_ctx, n_ubatch = as_int(n_ctx, "n_ctx", 1), as_int(n_ubatch, "n_ubatch", 1)
        n_seq_max = as_int(n_seq_max, "n_seq_max", 1, 256)
        for t in (type_k, type_v):
            if t not in KV_TYPES:
                raise ValueError(f"unknown KV cache type {t!r}; one of {KV_TYPES}")
        if n_threads is not None:
            n_threads = native.check_threads(n_threads)
        self.model = model
        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self.n_ubatch = n_ubatch
        self.n_vocab = model.hparams.n_vocab
        try:
            self.memory = model.make_memory(n_ctx, n_seq_max, n_ubatch, type_k, type_v)
        except MemoryError:
            need = model.kv_bytes(n_ctx, n_seq_max, n_ubatch, type_k, type_v)
            raise MemoryError(f"a KV cache of {n_ctx} cells needs {need / 2**30:.1f} GiB "
                              f"({type_k} K, {type_v} V) and could not be allocated") from None
        self.memory.n_threads = n_threads
        self.scratch = model.make_scratch(n_ubatch)

    @property
    def kv_bytes(self):
        return self.memory.kv_bytes

    def decode(self, batch):
        """Run the batch through the model; logits of the flagged tokens in
        batch order. CacheFullError leaves the cache as it was."""
        with self.memory.lock:
            return self._decode(batch)

    def _decode(self, batch):
        self.check_batch(batch)
        ubatches = list(batch.split(self.n_ubatch))
        slots = self.memory.prepare([(pos, seqs) for _, pos, seqs, _ in ubatches])
        logits = []
        for (tokens, pos, seqs, rows), slot in zip(ubatches, slots):
            self.memory.apply(slot, pos, seqs)
            # the model's own pass: check_batch and split did Model.forward's checks
            logits.append(self.model.impl.forward(tokens, pos, rows, self.memory, self.scratch))
        return logits[0] if len(logits) == 1 else np.concatenate(logits)

    def check_batch(self, batch):
        """llama.cpp's rules: known tokens and sequences, and each sequence's
        positions continue its cached ones without a gap."""
        if len(batch) == 0:
            raise ValueError("empty batch")
        tokens = batch.tokens
        if not all(type(t) is int for t in tokens) or min(tokens) < 0 \
                or max(tokens) >= self.n_vocab:
            raise ValueError(f"token ids must be ints in [0, {self.n_vocab})")
        if max(batch.pos) > I32_MAX:
            raise ValueError(f"position {max(batch.pos)} beyond the largest, {I32_MAX}")
        positions = {}
        for p, seqs in zip(batch.pos, batch.seq_ids):
            for s in seqs:
                if not 0 <= s < self.n_seq_max:
                    raise ValueError(f"sequence id {s} outside [0, {self.n_seq_max})")
                positions.setdefault(s, []).append(p)
        for s, ps in positions.items():
            first = self.memory.seq_pos_max(s) + 1
            if sorted(ps) != list(range(first, first + len(ps))):
                raise ValueError(
                    f"positions of sequence {s} must continue at {first} without gaps or repeats")

    def fingerprint(self):
        h = self.model.hparams
        arch = self.model.arch.encode()
        return struct.pack("<I", len(arch)) + arch + struct.pack(
            "<6q", h.n_layer, h.n_embd, h.n_head, h.n_head_kv, h.head_dim, h.n_vocab)

    def state_save(self, path, seq_id=None):
        """Save one sequence, or the whole cache, bit-exactly."""
        body = self.memory.state_bytes(seq_id)   # one locked call: a consistent image
        with open(path, "wb") as f:
            f.write(STATE_MAGIC + struct.pack("<I", STATE_VERSION) + self.fingerprint() + body)

    def state_load(self, path, seq_id=None):
        """Load a state written by state_save; StateError and no change when
        it is corrupt or made for another model."""
        with open(path, "rb") as f:
            data = f.read()
        head = STATE_MAGIC + struct.pack("<I", STATE_VERSION)
        if not data.startswith(head):
            raise StateError(f"{path}: not a kvcells state file of version {STATE_VERSION}")
        fp = self.fingerprint()
        if data[len(head):len(head) + len(fp)] != fp:
            raise StateError(f"{path}: the state was saved for another model")
        self.memory.load_state_bytes(data[len(head) + len(fp):], seq_id)
