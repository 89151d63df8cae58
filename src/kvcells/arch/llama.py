"""llama: RMSNorm, RoPE in the NORM layout, grouped-query attention through
the KV cache, SwiGLU feed-forward, tied or separate output matrix."""
import numpy as np

from ..errors import GGUFError
from ..rope import NORM, apply_rope, rope_tables
from . import layer_weights, output_logits, rms_norm

ROPE_MODE = NORM
WEIGHTS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
           "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
OPTIONAL = ("rope_freqs",)


def read_hparams(meta, hp):
    """llama has no rules beyond the common ones."""


class Llama:
    def __init__(self, file):
        if "rope_freqs.weight" in file.tensors:
            raise GGUFError(f"{file.path}: per-frequency RoPE factors (rope_freqs.weight) "
                            "are not supported")
        self.file = file
        self.hp = file.hparams
        self.layers = [layer_weights(file, il, WEIGHTS) for il in range(self.hp.n_layer)]

    def forward(self, tokens, pos, output_rows, mem):
        hp, nt = self.hp, mem.n_threads  # nt: this memory's threads (None: the default)
        n, H, Hkv, d = len(tokens), hp.n_head, hp.n_head_kv, hp.head_dim
        x = self.file.tensors["token_embd.weight"].rows(tokens)
        cos, sin = rope_tables(pos, hp.rope_base, d, hp.rope_freq_scale)
        for il, w in enumerate(self.layers):
            h = rms_norm(x, w["attn_norm"], hp.norm_eps)
            q = apply_rope(w["attn_q"].matmul(h, nt).reshape(n, H, d), cos, sin, NORM)
            k = apply_rope(w["attn_k"].matmul(h, nt).reshape(n, Hkv, d), cos, sin, NORM)
            mem.store(il, k, w["attn_v"].matmul(h, nt).reshape(n, Hkv, d))
            a = mem.attend(il, q, hp.attn_scale).reshape(n, H * d)
            if il == hp.n_layer - 1:  # only the requested rows go further
                a, x = a[output_rows], x[output_rows]
            x = x + w["attn_output"].matmul(a, nt)
            h = rms_norm(x, w["ffn_norm"], hp.norm_eps)
            g = w["ffn_gate"].matmul(h, nt)
            silu = g * (0.5 + 0.5 * np.tanh(0.5 * g))  # g * sigmoid(g), no overflow
            x = x + w["ffn_down"].matmul(silu * w["ffn_up"].matmul(h, nt), nt)
        x = rms_norm(x, self.file.tensors["output_norm.weight"], hp.norm_eps)
        return output_logits(self.file, x, nt)


FORWARD = Llama
