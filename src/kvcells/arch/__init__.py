"""The architectures, one module each, and the pieces they share.

An architecture module declares what the GGUF reader needs to know about it:
ROPE_MODE, WEIGHTS (the tensors blk.{il}.<name>.weight of every layer),
OPTIONAL (global tensors it may have), read_hparams(meta, hp) (its own
hyperparameter rules, applied to the common ones), and its forward pass
class FORWARD.
"""
import numpy as np

from .. import native
from ..errors import GGUFError
from ..rope import NEOX, inv_freq

NAMES = ("llama", "gemma3")


def spec(arch):
    """The module of architecture `arch`, None when it is not supported."""
    from . import gemma3, llama
    return {"llama": llama, "gemma3": gemma3}.get(arch)


def build(file):
    """The forward pass object for a loaded GGUF model file."""
    module = spec(file.arch)
    if module is None:
        raise GGUFError(f"{file.path}: unsupported architecture {file.arch!r}")
    return module.FORWARD(file)


def tensor_shapes(hp):
    """The shape of each tensor an architecture may name: (n_out, n_in) for
    a matrix, (n,) for a vector."""
    e, hd, ff = hp.n_embd, hp.head_dim, hp.n_ff
    q, kv, v = hp.n_head * hd, hp.n_head_kv * hd, hp.n_head_kv * hp.head_dim_v
    return {"token_embd": (hp.n_vocab, e), "output_norm": (e,), "output": (hp.n_vocab, e),
            "rope_freqs": (hd // 2,),
            "attn_norm": (e,), "attn_q": (q, e), "attn_k": (kv, e), "attn_v": (v, e),
            "attn_q_norm": (hd,), "attn_k_norm": (hd,),
            "attn_output": (e, hp.n_head * hp.head_dim_v), "post_attention_norm": (e,),
            "ffn_norm": (e,), "ffn_gate": (ff, e), "ffn_up": (ff, e), "ffn_down": (e, ff),
            "post_ffw_norm": (e,)}


def blocks(file, names, act):
    """native.Block of each layer: the tensors blk.{il}.<name>.weight for
    names (those of the block the architecture lacks stay None), and the
    gating activation act."""
    hp = file.hparams
    memory = native.HugePages()   # for the matrices' regrouped copies
    out = []
    for il in range(hp.n_layer):
        tensors = {}
        for name in names:
            t = file.tensors[f"blk.{il}.{name}.weight"]
            if not isinstance(t, np.ndarray):   # a vector is float32 already
                t = native.Matrix(t.type, t.raw, *t.shape, memory=memory)
            tensors[name] = t
        out.append(native.Block(hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff, act,
                                hp.rope_mode == NEOX, hp.norm_eps, hp.attn_scale, tensors))
    return out


def stack(file, blocks, embd_scale, rope, rotations):
    """native.Stack of the model: its token embeddings (times embd_scale),
    the blocks (rope: per layer, the index of its (base, freq_scale) among
    rotations) and the head: the final norm and the output matrix, or the
    token embeddings when the model ties them; logits soft-capped when the
    model says so."""
    hp = file.hparams
    embd = file.tensors["token_embd.weight"]
    w = file.tensors.get("output.weight", embd)
    return native.Stack(native.Matrix(embd.type, embd.raw, *embd.shape), embd_scale, blocks,
                        rope, [(inv_freq(base, hp.head_dim), fs) for base, fs in rotations],
                        file.tensors["output_norm.weight"], hp.norm_eps,
                        native.Matrix(w.type, w.raw, *w.shape), hp.logit_softcap)


def run(stack, tokens, pos, output_rows, mem, scratch):
    """Logits of the rows output_rows of the ubatch through the stack, on
    mem's applied ubatch, in one C call on the threads of mem (its own, else
    the default)."""
    return native.stack_run(stack, mem.layer_views(stack.n_layer), scratch, tokens, pos,
                            output_rows, mem.n_threads or native.get_num_threads())
