"""Gemma 3: embeddings scaled by sqrt(n_embd), RMSNorm weights as stored in
the GGUF (the converter already added Gemma's +1), per-head RMSNorm on Q and
K before NEOX RoPE (base rope_base on global layers, rope_base_swa on
sliding-window ones), post-attention and post-FFN norms, GELU(tanh)-gated
feed-forward, output = token embeddings unless the file has its own, logits
soft-capped when the file says so."""
import math

import numpy as np

from ..rope import NEOX
from . import blocks, run, stack

ROPE_MODE = NEOX
WEIGHTS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm",
           "attn_output", "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up",
           "ffn_down", "post_ffw_norm")
OPTIONAL = ()
SWA_PERIOD = 6  # the last layer of every 6 is full attention unless the file says otherwise
N_LAYER_27B = 62


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


class Gemma3:
    def __init__(self, file):
        hp = file.hparams
        # RoPE table 0 for the global layers, 1 for the sliding-window ones
        rotations = [(hp.rope_base, hp.rope_freq_scale),
                     (hp.rope_base_swa, hp.rope_freq_scale_swa)]
        self.stack = stack(file, blocks(file, WEIGHTS, "gelu_tanh"), np.sqrt(hp.n_embd),
                           [int(swa) for swa in hp.swa_layers], rotations)

    def forward(self, tokens, pos, output_rows, mem, scratch):
        return run(self.stack, tokens, pos, output_rows, mem, scratch)


FORWARD = Gemma3
