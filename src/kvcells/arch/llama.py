"""llama: RMSNorm, RoPE in the NORM layout, grouped-query attention through
the KV cache, SwiGLU feed-forward, tied or separate output matrix."""
from ..errors import GGUFError
from ..rope import NORM
from . import blocks, run, stack

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
        hp = file.hparams
        self.stack = stack(file, blocks(file, WEIGHTS, "silu"), 1.0, [0] * hp.n_layer,
                           [(hp.rope_base, hp.rope_freq_scale)])

    def forward(self, tokens, pos, output_rows, mem, scratch):
        return run(self.stack, tokens, pos, output_rows, mem, scratch)


FORWARD = Llama
