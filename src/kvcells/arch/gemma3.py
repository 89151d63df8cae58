"""Gemma 3: embeddings scaled by sqrt(n_embd), RMSNorm weights as stored in
the GGUF (the converter already added Gemma's +1), per-head RMSNorm on Q and
K before NEOX RoPE (base rope_base on global layers, rope_base_swa on
sliding-window ones), post-attention and post-FFN norms, GELU(tanh)-gated
feed-forward, output = token embeddings unless the file has its own."""
import math

import numpy as np

from ..rope import NEOX, rope_tables
from . import layer_weights, output_logits, rms_norm, rms_norm_rope_neox

ROPE_MODE = NEOX
WEIGHTS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm",
           "attn_output", "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up",
           "ffn_down", "post_ffw_norm")
OPTIONAL = ()
SWA_PERIOD = 6  # the last layer of every 6 is full attention unless the file says otherwise
N_LAYER_27B = 62
GELU_C = np.float32(np.sqrt(2.0 / np.pi))
GELU_C3 = np.float32(np.sqrt(2.0 / np.pi) * 0.044715)


def read_hparams(meta, hp):
    """Sliding window on 5 of every 6 layers, a final logit soft cap, and
    the 27B model's attention scale (by the model width, as gemma_pytorch)."""
    hp.n_swa = meta.get("attention.sliding_window", "int", 0)
    if hp.n_swa < 0:
        meta.fail(f"negative sliding window {hp.n_swa}")
    if hp.n_swa > 0:
        hp.swa_type = "standard"
        hp.swa_layers = meta.swa_pattern("attention.sliding_window_pattern", hp.n_layer,
                                         SWA_PERIOD)
    hp.logit_softcap = meta.get("final_logit_softcapping", "float", 0.0)
    if hp.n_layer == N_LAYER_27B:
        hp.attn_scale = 1.0 / math.sqrt(hp.n_embd // hp.n_head)


def gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in place on one temporary."""
    t = x * x
    t *= GELU_C3
    t += GELU_C
    t *= x
    np.tanh(t, out=t)
    t += 1.0
    t *= x
    t *= np.float32(0.5)
    return t


class Gemma3:
    def __init__(self, file):
        self.file = file
        self.hp = file.hparams
        self.layers = [layer_weights(file, il, WEIGHTS) for il in range(self.hp.n_layer)]

    def forward(self, tokens, pos, output_rows, mem):
        hp, eps = self.hp, self.hp.norm_eps
        nt = mem.n_threads  # this memory's threads (None: the default)
        n, H, Hkv, d = len(tokens), hp.n_head, hp.n_head_kv, hp.head_dim
        x = self.file.tensors["token_embd.weight"].rows(tokens) * np.float32(np.sqrt(hp.n_embd))
        rot = {swa: rope_tables(pos, hp.rope_base_swa if swa else hp.rope_base, d,
                                hp.rope_freq_scale_swa if swa else hp.rope_freq_scale)
               for swa in set(hp.swa_layers)}
        for il, w in enumerate(self.layers):
            h = rms_norm(x, w["attn_norm"], eps)
            cos, sin = rot[hp.swa_layers[il]]
            q = rms_norm_rope_neox(w["attn_q"].matmul(h, nt).reshape(n, H, d),
                                   w["attn_q_norm"], eps, cos, sin)
            k = rms_norm_rope_neox(w["attn_k"].matmul(h, nt).reshape(n, Hkv, d),
                                   w["attn_k_norm"], eps, cos, sin)
            mem.store(il, k, w["attn_v"].matmul(h, nt).reshape(n, Hkv, d))
            a = mem.attend(il, q, hp.attn_scale).reshape(n, H * d)
            if il == hp.n_layer - 1:  # only the requested rows go further
                a, x = a[output_rows], x[output_rows]
            x = x + rms_norm(w["attn_output"].matmul(a, nt), w["post_attention_norm"], eps)
            h = rms_norm(x, w["ffn_norm"], eps)
            f = gelu_tanh(w["ffn_gate"].matmul(h, nt)) * w["ffn_up"].matmul(h, nt)
            x = x + rms_norm(w["ffn_down"].matmul(f, nt), w["post_ffw_norm"], eps)
        x = rms_norm(x, self.file.tensors["output_norm.weight"], eps)
        logits = output_logits(self.file, x, nt)
        if hp.logit_softcap:
            logits = np.tanh(logits / hp.logit_softcap) * hp.logit_softcap
        return logits


FORWARD = Gemma3
