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


def layer_weights(file, il, names):
    """{short name: tensor} for layer il, e.g. "attn_q" -> blk.{il}.attn_q.weight."""
    return {name: file.tensors[f"blk.{il}.{name}.weight"] for name in names}


def rms_norm(x, w, eps):
    """x / rms(x) * w over the last axis, in float32 (a fused C loop: a decode
    step makes ~110 of these calls, where numpy's per-call overhead dominated)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[-1]
    if n < 1 or w.dtype != np.float32 or w.shape != (n,) or not w.flags.c_contiguous:
        raise ValueError(f"rms_norm: weight must be float32 ({n},), got {w.dtype} {w.shape}")
    y = np.empty_like(x)
    native.rms_norm(x, w, y, eps)
    return y


def rms_norm_rope_neox(x, w, eps, cos, sin):
    """rope.apply_rope(rms_norm(x, w, eps), cos, sin, NEOX) in one C pass, for
    x (n_tokens, n_heads, head_dim) and rope.rope_tables' cos, sin."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, _, d = x.shape
    if w.dtype != np.float32 or w.shape != (d,) or not w.flags.c_contiguous:
        raise ValueError(f"rms_norm_rope_neox: weight must be float32 ({d},)")
    cos = np.ascontiguousarray(cos, dtype=np.float32)
    sin = np.ascontiguousarray(sin, dtype=np.float32)
    if d < 2 or d % 2 or cos.size != n * (d // 2) or sin.size != cos.size:
        raise ValueError(f"rms_norm_rope_neox: need an even head_dim and {n} x {d // 2} cos/sin")
    y = np.empty_like(x)
    native.rms_norm_rope_neox(x, w, cos, sin, y, eps)
    return y


def output_logits(file, x, n_threads=None):
    """Logits for the final hidden rows x: the output matrix, or the token
    embeddings when the model ties them."""
    out = file.tensors.get("output.weight", file.tensors["token_embd.weight"])
    return out.matmul(x, n_threads)
