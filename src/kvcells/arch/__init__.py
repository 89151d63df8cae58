"""Forward passes, one module per architecture, and the pieces they share."""
import numpy as np

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
    """x / rms(x) * w over the last axis, in float32."""
    ms = np.einsum("...i,...i->...", x, x)[..., None] / np.float32(x.shape[-1])
    return x * (1.0 / np.sqrt(ms + np.float32(eps))) * w


def output_logits(file, x):
    """Logits for the final hidden rows x: the output matrix, or the token
    embeddings when the model ties them."""
    out = file.tensors.get("output.weight", file.tensors["token_embd.weight"])
    return out.matmul(x)
