"""A plain dense forward pass for llama and gemma3, straight from a GGUF file.

The tests' independent truth: it shares no code with kvcells. Metadata and
tensors are read with the `gguf` package's reader and dequantised with its
quant code; one sequence at positions 0..n-1 is run with no cache, every
token attending its earlier tokens (within the sliding window on SWA layers)
through an explicit (n, n) mask.
"""
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def read_gguf(path):
    reader = GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            continue
        meta[key] = field.contents()
    tensors = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))
        tensors[t.name] = np.asarray(w, dtype=np.float32).reshape(shape)
    return meta, tensors


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate(x, base, neox, freq_scale=1.0):
    """RoPE for x (n, heads, d) at positions 0..n-1, written out pair by pair."""
    n, _, d = x.shape
    out = x.copy()
    for i in range(d // 2):
        theta = np.arange(n) * freq_scale * base ** (-2.0 * i / d)
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        a, b = (i, i + d // 2) if neox else (2 * i, 2 * i + 1)
        out[:, :, a] = x[:, :, a] * c - x[:, :, b] * s
        out[:, :, b] = x[:, :, a] * s + x[:, :, b] * c
    return out


def causal_mask(n, window=0):
    """0 where query i may see key j (j <= i, and i - j < window if window)."""
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    ok = j <= i
    if window:
        ok &= (i - j) < window
    return np.where(ok, 0.0, -np.inf)


def attention(q, k, v, mask, scale):
    """q (n, H, d), k/v (n, Hkv, d): grouped-query attention, dense."""
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k).astype(np.float64) * scale + mask
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    s /= s.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", s, v.astype(np.float64)).astype(np.float32)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x / (1.0 + np.exp(-x))


class ReferenceModel:
    def __init__(self, path):
        self.meta, self.t = read_gguf(path)
        self.arch = self.meta["general.architecture"]
        if self.arch not in ("llama", "gemma3"):
            raise ValueError(f"reference: unsupported arch {self.arch}")

    def key(self, name, default=None):
        return self.meta.get(f"{self.arch}.{name}", default)

    def swa_flags(self, n_layer):
        if self.arch != "gemma3" or not self.key("attention.sliding_window", 0):
            return [False] * n_layer
        pattern = self.key("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):
            return [bool(p) for p in pattern]
        return [pattern == 0 or il % pattern < pattern - 1 for il in range(n_layer)]

    def logits(self, tokens):
        """Logits (n, n_vocab) for tokens at positions 0..n-1 of one sequence."""
        t, gemma = self.t, self.arch == "gemma3"
        n_layer = self.key("block_count")
        n_embd = self.key("embedding_length")
        n_head = self.key("attention.head_count")
        n_head_kv = self.key("attention.head_count_kv", n_head)
        head_dim = self.key("attention.key_length", n_embd // n_head)
        eps = self.key("attention.layer_norm_rms_epsilon")
        base = self.key("rope.freq_base", 10000.0)
        base_swa = self.key("rope.freq_base_swa", 10000.0)
        freq_scale = 1.0
        if self.key("rope.scaling.type") == "linear":
            freq_scale = 1.0 / self.key("rope.scaling.factor")
        window = self.key("attention.sliding_window", 0)
        swa = self.swa_flags(n_layer)
        n = len(tokens)

        x = t["token_embd.weight"][np.asarray(tokens)]
        if gemma:
            x = x * np.float32(np.sqrt(n_embd))
        for il in range(n_layer):
            p = f"blk.{il}."
            h = rms_norm(x, t[p + "attn_norm.weight"], eps)
            q = (h @ t[p + "attn_q.weight"].T).reshape(n, n_head, head_dim)
            k = (h @ t[p + "attn_k.weight"].T).reshape(n, n_head_kv, head_dim)
            v = (h @ t[p + "attn_v.weight"].T).reshape(n, n_head_kv, head_dim)
            if gemma:
                q = rms_norm(q, t[p + "attn_q_norm.weight"], eps)
                k = rms_norm(k, t[p + "attn_k_norm.weight"], eps)
                b = base_swa if swa[il] else base
                q, k = rotate(q, b, True), rotate(k, b, True)
            else:
                q, k = rotate(q, base, False, freq_scale), rotate(k, base, False, freq_scale)
            mask = causal_mask(n, window if swa[il] else 0)
            a = attention(q, k, v, mask, 1.0 / np.sqrt(head_dim)).reshape(n, -1)
            a = a @ t[p + "attn_output.weight"].T
            if gemma:
                a = rms_norm(a, t[p + "post_attention_norm.weight"], eps)
            x = x + a
            h = rms_norm(x, t[p + "ffn_norm.weight"], eps)
            gate = h @ t[p + "ffn_gate.weight"].T
            up = h @ t[p + "ffn_up.weight"].T
            f = (gelu_tanh(gate) if gemma else silu(gate)) * up
            f = f @ t[p + "ffn_down.weight"].T
            if gemma:
                f = rms_norm(f, t[p + "post_ffw_norm.weight"], eps)
            x = x + f
        x = rms_norm(x, t["output_norm.weight"], eps)
        out = t.get("output.weight", t["token_embd.weight"])
        logits = x @ out.T
        cap = self.key("final_logit_softcapping", 0.0) if gemma else 0.0
        if cap:
            logits = cap * np.tanh(logits / cap)
        return logits.astype(np.float32)


# kvcells.matmul rounds the activations of quantised-weight matmuls to int8
# per 32 values, as llama.cpp does; against this reference's f32 activations
# the tiny random models' logits (within about +-6) then move by 0.02-0.21
# (measured), while the wrong RoPE layout moves them by 3.5, Gemma's +1 on
# the norm weights by 7.7, a window one token wider by 2.1.
QUANT_TOL = 0.3


def decode_ubatch(model, mem, tokens, pos, seq_ids, output_rows=None):
    """Place one ubatch in a kvcells memory and run model.forward on it, as
    Context.decode does (seq_ids: one int per token; all rows by default)."""
    pos = np.asarray(pos, dtype=np.int32)
    seq_ids = [[s] if np.ndim(s) == 0 else list(s) for s in seq_ids]
    if output_rows is None:
        output_rows = np.arange(len(tokens))
    (slot,) = mem.prepare([(pos, seq_ids)])
    mem.apply(slot, pos, seq_ids)
    return model.forward(np.asarray(tokens), pos, seq_ids, output_rows, mem,
                         model.make_scratch(len(tokens)))


def decode_one_by_one(model, tokens, *, n_ctx=64, n_ubatch=16, first=6, type_kv="f32"):
    """A fresh kvcells memory; the first tokens in one ubatch, then one token
    per ubatch; the logits of every token."""
    mem = model.make_memory(n_ctx, 1, n_ubatch, type_kv, type_kv)
    rows = [decode_ubatch(model, mem, tokens[:first], np.arange(first), [0] * first)]
    for p in range(first, len(tokens)):
        rows.append(decode_ubatch(model, mem, tokens[p:p + 1], [p], [0]))
    return np.concatenate(rows)


def compare_decoding(model, path, tokens):
    """(max |one-by-one cached - one-ubatch recompute|, max |one-by-one
    cached - dense reference|) over the logits of every token."""
    cached = decode_one_by_one(model, tokens, n_ctx=2 * len(tokens))
    mem = model.make_memory(2 * len(tokens), 1, len(tokens), "f32", "f32")
    recomputed = decode_ubatch(model, mem, tokens, np.arange(len(tokens)), [0] * len(tokens))
    reference = ReferenceModel(path).logits(tokens)
    return np.abs(cached - recomputed).max(), np.abs(cached - reference).max()
