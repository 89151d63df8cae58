"""Write tiny random-weight GGUF models (llama, gemma3) for tests.

Same metadata keys, tensor names and tokenizer layout as real files, tiny
dimensions. Usable from tests (`from make_tiny_gguf import write_tiny_gguf`)
and from the shell:

    python tools/make_tiny_gguf.py --arch gemma3 --type q8_0 -o out.gguf
"""
import argparse
import sys

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

# Weight types a file can use for its 2-D matrices. "Q4_K_M" is the mix of
# the real Gemma 3 270M Q4_K_M file; every other name uses one type.
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
         "Q4_K", "Q5_K", "Q6_K", "Q4_K_M")
Q4_K_M_MIX = {"token_embd": "Q8_0", "output": "Q6_K", "attn_q": "Q5_0",
              "attn_k": "Q5_0", "attn_v": "Q8_0", "attn_output": "Q4_K",
              "ffn_gate": "Q5_0", "ffn_up": "Q5_0", "ffn_down": "Q6_K"}

# token types as llama.cpp numbers them
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6

PIECES = ("▁", "▁t", "he", "▁the", "in", "▁a", "er", "an", "on", "at", "en",
          "▁s", "or", "es", "is", "ll", "▁w", "ing", "▁is", "▁of", "▁and",
          "▁to", "▁in", "▁c", "re", "it", "ar", "▁Hello", "▁world", "lo",
          "▁1", "23", "▁▁", "▁▁▁▁", ".", ",", "!", "?", "'", "-", ":")
LETTERS = tuple("abcdefghijklmnopqrstuvwxyzHTW0123456789")


def tiny_vocab(arch):
    """(tokens, scores, token_types, special ids) in the real file's layout."""
    if arch == "gemma3":
        head = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL),
                ("<unk>", CONTROL), ("<mask>", CONTROL),
                ("[multimodal]", USER_DEFINED), ("<start_of_turn>", CONTROL),
                ("<end_of_turn>", CONTROL), ("\n", USER_DEFINED),
                ("\n\n", USER_DEFINED)]
        special = {"bos": 2, "eos": 1, "unk": 3, "pad": 0}
    else:
        head = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)]
        special = {"bos": 1, "eos": 2, "unk": 0}
    tokens = [t for t, _ in head]
    types = [k for _, k in head]
    scores = [-1000.0 if k == CONTROL or k == USER_DEFINED else 0.0 for k in types]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    scores += [0.0] * 256
    # normal pieces: more frequent (merged earlier) pieces score higher
    for rank, piece in enumerate(PIECES + LETTERS):
        tokens.append(piece)
        types.append(NORMAL)
        scores.append(-float(rank))
    return tokens, scores, types, special


def default_dims(arch, qtype):
    """Tiny dims; K-quant rows need multiples of 256 elements."""
    big = qtype == "Q4_K_M" or GGML_QUANT_SIZES[QT[qtype]][0] == 256
    n_embd = 256 if big else 64
    # gemma3 heads are wider than n_embd / n_head, as in the real model
    head_dim = n_embd // 4 * (2 if arch == "gemma3" else 1)
    return dict(n_embd=n_embd, head_dim=head_dim, n_ff=2 * n_embd,
                n_layer=6 if arch == "gemma3" else 2)


def random_blocks(rng, qtype, n_out, n_in, amp):
    """Valid random K-quant blocks (gguf-py cannot quantise these types) with
    values within about +-amp."""
    n_blocks = n_out * n_in // 256
    type_size = GGML_QUANT_SIZES[QT[qtype]][1]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    f16 = lambda v: np.full((n_blocks, 1), v, np.float16).view(np.uint8)  # noqa: E731
    if qtype == "Q6_K":      # ql, qh, int8 scales, d: x = d * scale * (q - 32)
        blocks[:, -2:] = f16(amp / (128 * 32))
    else:                    # d, dmin, scales, ...: x = d * sc * q - dmin * m
        q_max = 15 if qtype == "Q4_K" else 31
        blocks[:, 0:2] = f16(amp / (63 * q_max))
        blocks[:, 2:4] = f16(amp / 2 / 63)
    return blocks.reshape(n_out, n_in // 256 * type_size)


def encode_matrix(rng, qtype, n_out, n_in):
    """A random (n_out, n_in) matrix in `qtype`: (array for GGUFWriter, raw_dtype)."""
    std = 1.0 / np.sqrt(n_in)
    block = GGML_QUANT_SIZES[QT[qtype]][0]
    if n_in % block:
        raise ValueError(f"{qtype} needs rows of a multiple of {block} elements, got {n_in}")
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        return random_blocks(rng, qtype, n_out, n_in, 2 * std), QT[qtype]
    w = (rng.standard_normal((n_out, n_in)) * std).astype(np.float32)
    if qtype == "F32":
        return w, None
    return gguf.quants.quantize(w, QT[qtype]), QT[qtype]


def write_tiny_gguf(path, arch="llama", qtype="F32", *, n_layer=None, n_embd=None,
                    n_head=4, n_head_kv=2, head_dim=None, n_ff=None,
                    n_ctx_train=1024, n_swa=8, swa_pattern=None, tied=True,
                    rope_base=None, norm_eps=1e-6, alignment=None, seed=0):
    """Write a tiny random model and return `path`.

    gemma3: n_swa > 0 makes a sliding-window model (n_swa 0: none);
    swa_pattern None leaves the key out (llama.cpp then uses period 6: every
    6th layer global), else it is written as given (int period or bool list).
    tied=False adds a separate output.weight; alignment (a power of two)
    writes general.alignment and aligns the tensor data to it.
    """
    if arch not in ("llama", "gemma3"):
        raise ValueError(f"unknown arch {arch!r}")
    qtype = qtype.upper()
    if qtype not in TYPES:
        raise ValueError(f"unknown type {qtype!r} (one of {', '.join(TYPES)})")
    dims = default_dims(arch, qtype)
    n_layer = n_layer or dims["n_layer"]
    n_embd = n_embd or dims["n_embd"]
    head_dim = head_dim or dims["head_dim"]
    n_ff = n_ff or dims["n_ff"]
    rng = np.random.default_rng(seed)
    tokens, scores, types, special = tiny_vocab(arch)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch} {qtype}")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(norm_eps)
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_freq_base(rope_base or 1e6)
        if n_swa:
            w.add_sliding_window(n_swa)
        if swa_pattern is not None:
            w.add_sliding_window_pattern(swa_pattern)
    else:
        if head_dim != n_embd // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(rope_base or 10000.0)
    w.add_tokenizer_model("llama")
    if arch == "gemma3":
        w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(special["bos"])
    w.add_eos_token_id(special["eos"])
    w.add_unk_token_id(special["unk"])
    if "pad" in special:
        w.add_pad_token_id(special["pad"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if arch == "gemma3":
        w.add_add_space_prefix(False)
    w.add_quantization_version(2)

    def matrix(name, kind, n_out, n_in):
        t = Q4_K_M_MIX[kind] if qtype == "Q4_K_M" else qtype
        data, raw_dtype = encode_matrix(rng, t, n_out, n_in)
        w.add_tensor(name, data, raw_dtype=raw_dtype)

    def norm(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    n_vocab = len(tokens)
    matrix("token_embd.weight", "token_embd", n_vocab, n_embd)
    norm("output_norm.weight", n_embd)
    if not tied:
        matrix("output.weight", "output", n_vocab, n_embd)
    for i in range(n_layer):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight", n_embd)
        matrix(b + "attn_q.weight", "attn_q", n_head * head_dim, n_embd)
        matrix(b + "attn_k.weight", "attn_k", n_head_kv * head_dim, n_embd)
        matrix(b + "attn_v.weight", "attn_v", n_head_kv * head_dim, n_embd)
        matrix(b + "attn_output.weight", "attn_output", n_embd, n_head * head_dim)
        norm(b + "ffn_norm.weight", n_embd)
        matrix(b + "ffn_gate.weight", "ffn_gate", n_ff, n_embd)
        matrix(b + "ffn_up.weight", "ffn_up", n_ff, n_embd)
        matrix(b + "ffn_down.weight", "ffn_down", n_embd, n_ff)
        if arch == "gemma3":
            norm(b + "attn_q_norm.weight", head_dim)
            norm(b + "attn_k_norm.weight", head_dim)
            norm(b + "post_attention_norm.weight", n_embd)
            norm(b + "post_ffw_norm.weight", n_embd)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("llama", "gemma3"), default="llama")
    p.add_argument("--type", default="F32", help=", ".join(TYPES))
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--layers", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-swa", type=int, default=8, help="gemma3 sliding window (0: none)")
    p.add_argument("--untied", action="store_true", help="separate output.weight")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        write_tiny_gguf(a.output, a.arch, a.type, n_layer=a.layers, n_embd=a.n_embd,
                        n_swa=a.n_swa, tied=not a.untied, seed=a.seed)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(a.output)


if __name__ == "__main__":
    main()
