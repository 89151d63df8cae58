"""Forward passes, one module per architecture, and the pieces they share."""
import numpy as np

from .. import native
from ..errors import GGUFError


def build(file):
    """The forward pass object for a loaded GGUF model file."""
    from .gemma3 import Gemma3
    from .llama import Llama
    archs = {"llama": Llama, "gemma3": Gemma3}
    if file.arch not in archs:
        raise GGUFError(f"{file.path}: unsupported architecture {file.arch!r}")
    return archs[file.arch](file)


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
