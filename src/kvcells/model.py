"""kvcells.Model: a GGUF model ready to run through a KV cache."""
import numpy as np

from . import arch, kv_quant, native
from .cache import ISWACache, KVCache, swa_cells
from .errors import GGUFError
from .gguf_model import load_gguf
from .tokenizer import Tokenizer


class Model:
    """Weights, hyperparameters, tokenizer and the forward pass of one model."""

    def __init__(self, file):
        hp = file.hparams
        if hp.head_dim_v != hp.head_dim:
            raise GGUFError(f"{file.path}: value head size {hp.head_dim_v} differs from "
                            f"key head size {hp.head_dim}; not supported")
        self.path = file.path
        self.arch = file.arch
        self.hparams = hp
        self.metadata = file.metadata
        self.tensors = file.tensors
        self.tokenizer = Tokenizer.from_metadata(file.metadata)
        self.impl = arch.build(file)

    @classmethod
    def load(cls, path):
        """Load a GGUF v2/v3 file (llama or gemma3); GGUFError if it is not usable."""
        return cls(load_gguf(path))

    def __repr__(self):
        return f"Model({self.path!r}, arch={self.arch!r})"

    def make_memory(self, n_ctx, n_seq_max=1, n_ubatch=512, type_k="f16", type_v="f16"):
        """The KV memory this model runs on: an ISWACache when some layers use a
        sliding window, else one KVCache over all layers."""
        hp = self.hparams
        if any(hp.swa_layers):
            return ISWACache(n_ctx, n_seq_max, n_ubatch, hp.swa_layers, hp.n_head_kv,
                             hp.head_dim, type_k, type_v, n_swa=hp.n_swa,
                             swa_type=hp.swa_type, rope_base=hp.rope_base,
                             rope_base_swa=hp.rope_base_swa, rope_mode=hp.rope_mode,
                             rope_freq_scale=hp.rope_freq_scale,
                             rope_freq_scale_swa=hp.rope_freq_scale_swa)
        layers = list(range(hp.n_layer))
        return KVCache(n_ctx, n_seq_max, layers, hp.n_head_kv, hp.head_dim, type_k, type_v,
                       rope_base={il: hp.rope_base for il in layers},
                       rope_mode=hp.rope_mode, rope_freq_scale=hp.rope_freq_scale)

    def kv_bytes(self, n_ctx, n_seq_max=1, n_ubatch=512, type_k="f16", type_v="f16"):
        """The bytes make_memory would allocate for K and V."""
        hp = self.hparams
        n_swa_cells = swa_cells(n_ctx, n_seq_max, n_ubatch, hp.n_swa) if any(hp.swa_layers) else 0
        row = sum(kv_quant.row_bytes(t, hp.n_head_kv * hp.head_dim) for t in (type_k, type_v))
        return sum(row * (n_swa_cells if swa else n_ctx) for swa in hp.swa_layers)

    def make_scratch(self, n_tokens):
        """The buffers of a forward pass of up to n_tokens tokens (a
        Context makes one, for its n_ubatch)."""
        return native.Scratch(self.impl.stack.blocks[0], n_tokens)

    def forward(self, tokens, pos, seq_ids, output_rows, mem, scratch):
        """Run one ubatch, already applied to `mem` (mem.apply), through the
        model, its intermediate rows in `scratch` (make_scratch); logits
        float32 (len(output_rows), n_vocab) of those rows."""
        tokens = np.asarray(tokens, dtype=np.int64)
        pos = np.ascontiguousarray(pos, dtype=np.int32)
        output_rows = np.ascontiguousarray(output_rows, dtype=np.int32)
        n = len(tokens)
        if tokens.ndim != 1 or n == 0:
            raise ValueError("forward: tokens must be a non-empty 1-D sequence")
        if pos.shape != (n,) or len(seq_ids) != n:
            raise ValueError(f"forward: {n} tokens need {n} positions and {n} sequence id lists")
        if tokens.min() < 0 or tokens.max() >= self.hparams.n_vocab:
            raise ValueError(f"forward: token id outside [0, {self.hparams.n_vocab})")
        if output_rows.ndim != 1 or (output_rows.size and (output_rows.min() < 0
                                                           or output_rows.max() >= n)):
            raise ValueError(f"forward: output rows must lie in [0, {n})")
        if len(np.unique(output_rows)) != len(output_rows):
            raise ValueError("forward: output rows must be distinct")
        if n > scratch.n_tokens:
            raise ValueError(f"forward: {n} tokens, the scratch holds {scratch.n_tokens}")
        return self.impl.forward(tokens.astype(np.int32), pos, output_rows, mem, scratch)

