"""Where a one-token decode step's time goes (issue 13's "nothing between
the layers"): total, matmuls, attention and everything else, per step.

    python tools/bench_step.py [--threads 1 2] [--steps 40] [--model PATH]

One context per thread count; a 40-token prompt, then --steps decode steps
of one token. Matmul and attention seconds are counted inside the C core
(the context's scratch, native.Scratch.times); "other" is the rest of the
step's wall time: Python, the cell table, embeddings, norms, RoPE, K/V
stores, activations.
"""
import argparse
import time

import kvcells
from kvcells.cli import default_model_path

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


def one_step(ctx, token, pos):
    batch = kvcells.Batch()
    batch.add(token, pos, [0], True)
    ctx.decode(batch)


def measure(model, n_threads, steps):
    ctx = kvcells.Context(model, n_ctx=1024, n_threads=n_threads)
    toks = model.tokenizer.encode(PROMPT)
    batch = kvcells.Batch()
    for i, t in enumerate(toks):
        batch.add(t, i, [0], i == len(toks) - 1)
    ctx.decode(batch)
    one_step(ctx, toks[-1], len(toks))   # warm
    mm0, att0 = ctx.scratch.times()
    t0 = time.perf_counter()
    for s in range(steps):
        one_step(ctx, toks[-1], len(toks) + 1 + s)
    total = (time.perf_counter() - t0) / steps
    mm1, att1 = ctx.scratch.times()
    mm, att = (mm1 - mm0) / steps, (att1 - att0) / steps
    return total, mm, att, total - mm - att


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--model", help="GGUF file (default: the bundled Gemma 3 270M)")
    args = p.parse_args()
    model = kvcells.Model.load(args.model or default_model_path())
    print(f"{model.path}: one-token decode steps, ms per step")
    print(f"{'threads':>7} {'total':>8} {'matmul':>8} {'attention':>9} {'other':>8}")
    for nt in args.threads:
        total, mm, att, other = measure(model, nt, args.steps)
        print(f"{nt:>7} {1e3 * total:8.2f} {1e3 * mm:8.2f} {1e3 * att:9.2f} {1e3 * other:8.2f}")


if __name__ == "__main__":
    main()
