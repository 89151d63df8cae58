"""A batch of tokens to decode, as llama.cpp's llama_batch: per token its
id, position, sequences and whether its logits are wanted."""
import numbers

import numpy as np


def _is_int(x):
    """An integer that is not a bool (True is not token 1)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


class Batch:
    def __init__(self):
        self.tokens = []
        self.pos = []
        self.seq_ids = []
        self.logits = []

    def add(self, token, pos, seq_ids, logits=False):
        if not _is_int(token) or token < 0:
            raise ValueError(f"token must be a non-negative int, got {token!r}")
        if not _is_int(pos) or pos < 0:
            raise ValueError(f"pos must be a non-negative int, got {pos!r}")
        seqs = [seq_ids] if isinstance(seq_ids, numbers.Integral) else list(seq_ids)
        if not seqs or not all(_is_int(s) for s in seqs):
            raise ValueError("seq_ids must be an int or a non-empty iterable of ints")
        if len(set(seqs)) != len(seqs):
            raise ValueError("seq_ids of one token must be distinct")
        self.tokens.append(int(token))
        self.pos.append(int(pos))
        self.seq_ids.append([int(s) for s in seqs])
        self.logits.append(bool(logits))

    def clear(self):
        self.__init__()

    def __len__(self):
        return len(self.tokens)

    @property
    def n_outputs(self):
        return sum(self.logits)

    def split(self, n_ubatch):
        """Consecutive ubatches of at most n_ubatch tokens:
        (tokens, pos, seq_ids, output_rows) with rows local to the ubatch."""
        for start in range(0, len(self), n_ubatch):
            end = min(start + n_ubatch, len(self))
            flags = self.logits[start:end]
            yield (np.array(self.tokens[start:end], np.int32),
                   np.array(self.pos[start:end], np.int32),
                   self.seq_ids[start:end],
                   np.flatnonzero(flags).astype(np.int32))
